"""JSON Schemas of the wire types and the OpenRPC document of every method, generated.

``taskd schemas`` writes them to ``schemas/``; ``rpc.discover`` serves the
OpenRPC document. Both are generated from the types the server works with: the
wire types, and each method's param and return annotations (the same ones its
params are parsed by and its reply is built from).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from taskd import __version__, protocol
from taskd.rpc import REGISTRY, MethodInfo

WIRE_TYPES: dict[str, Any] = {
    "TaskEventType": protocol.TaskEventType,
    "TaskEventResult": protocol.TaskEventResult,
    "TaskResponse": protocol.TaskResponse,
    "TaskPush": protocol.TaskPush,
    "TaskRecord": protocol.TaskRecord,
    "TaskEventResponse": protocol.TaskEventResponse,
    "TaskQueryCondition": protocol.TaskQueryCondition,
    "CronType": protocol.CronType,
    "CronResultCondition": protocol.CronResultCondition,
    "Limit": protocol.Limit,
}
"""The wire types that get a file of their own in ``schemas/`` (all are OpenRPC components)."""

_REF = "#/components/schemas/{model}"


def wire_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each wire type, self-contained (definitions under ``$defs``)."""
    return {name: TypeAdapter(annotation).json_schema() for name, annotation in WIRE_TYPES.items()}


def _methods() -> list[MethodInfo]:
    """Every registered method once (aliases aside), by name."""
    return sorted({id(info): info for info in REGISTRY.values()}.values(), key=lambda i: i.name)


@cache
def openrpc_document() -> dict[str, Any]:
    """The OpenRPC 1.2 description of every method, from its param and result annotations.

    It describes the methods registered when it is first called: the server and
    ``taskd schemas`` import ``taskd.methods`` first.
    """
    methods = _methods()
    inputs: list[tuple[tuple[str, str], JsonSchemaMode, TypeAdapter[Any]]] = [
        (("wire", name), "validation", TypeAdapter(annotation))
        for name, annotation in WIRE_TYPES.items()
    ]
    for info in methods:
        inputs += [
            ((info.name, param.name), "validation", TypeAdapter(param.annotation))
            for param in info.params
        ]
        inputs.append(((info.name, ""), "validation", TypeAdapter(info.result)))
    schemas, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    components = definitions.get("$defs", {})
    for name in WIRE_TYPES:  # each under its own name, whatever pydantic calls it
        components.setdefault(name, schemas[("wire", name), "validation"])
    entries = []
    for info in methods:
        entry: dict[str, Any] = {
            "name": info.name,
            "summary": info.summary,
            "paramStructure": "either",
            "params": [
                {
                    "name": param.name,
                    "required": param.required,
                    "schema": schemas[(info.name, param.name), "validation"],
                }
                for param in info.params
            ],
            "result": {"name": "result", "schema": schemas[(info.name, ""), "validation"]},
        }
        if info.aliases:
            entry["x-aliases"] = list(info.aliases)
        if info.websocket_only:
            entry["x-websocket-only"] = True
        entries.append(entry)
    return {
        "openrpc": "1.2.6",
        "info": {"title": "taskd", "version": __version__},
        "methods": entries,
        "components": {"schemas": dict(sorted(components.items()))},
    }


def rendered() -> dict[str, bytes]:
    """File name → contents of everything ``schemas/`` should hold."""
    files = {
        f"{name}.json": orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
        for name, schema in wire_schemas().items()
    }
    files["openrpc.json"] = (
        orjson.dumps(openrpc_document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
    return files


def write(directory: Path) -> list[str]:
    """Write the schemas; return the names of files that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, content in rendered().items():
        path = directory / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
            changed.append(name)
    return changed


def stale(directory: Path) -> list[str]:
    """Names of files in ``directory`` that differ from what the code generates."""
    return [
        name
        for name, content in rendered().items()
        if not (directory / name).exists() or (directory / name).read_bytes() != content
    ]
