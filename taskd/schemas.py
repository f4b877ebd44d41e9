"""JSON Schemas of every wire type and the OpenRPC document of every method.

``taskd schemas`` writes them to ``schemas/``; ``rpc.discover`` serves the
OpenRPC document. Both come from the same pydantic types the server validates with.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter

import taskd.methods  # noqa: F401 - registers every method
from taskd import __version__, protocol
from taskd.rpc import REGISTRY

WIRE_TYPES: dict[str, Any] = {
    "TaskEventType": protocol.TaskEventType,
    "TaskEventResult": protocol.TaskEventResult,
    "TaskResponse": protocol.TaskResponse,
    "TaskPush": protocol.TaskPush,
    "TaskRecord": protocol.TaskRecord,
    "TaskEventResponse": protocol.TaskEventResponse,
    "TaskQueryCondition": protocol.TaskCondition,
    "CronType": protocol.CronType,
    "CronResultCondition": protocol.CronResultCondition,
    "Limit": protocol.Limit,
}

_UUID = {"type": "string", "format": "uuid"}
_TOKEN = {"type": "string", "description": "KEY:SECRET or USERNAME|PASSWORD"}
_QUERY = {
    "type": "object",
    "properties": {
        "condition": {"type": "array", "items": {"$ref": "#/components/schemas/TaskQueryCondition"}}
    },
    "required": ["condition"],
}
PARAMS: dict[str, dict[str, Any]] = {
    "token": _TOKEN,
    "target_uuid": _UUID,
    "uuid": _UUID,
    "task_type": {"$ref": "#/components/schemas/TaskEventType"},
    "queue_ttl_ms": {"type": "integer", "minimum": 1},
    "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 300000},
    "task_data_query": _QUERY,
    "conditions": {"type": "array", "items": {"$ref": "#/components/schemas/TaskQueryCondition"}},
    "subscription_id": {"type": "integer"},
    "task_response": {"$ref": "#/components/schemas/TaskResponse"},
    "name": {"type": "string", "minLength": 1, "maxLength": 128},
    "cron_expression": {"type": "string"},
    "cron_type": {"$ref": "#/components/schemas/CronType"},
    "enable": {"type": "boolean"},
    "query": {
        "type": "object",
        "properties": {
            "condition": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/CronResultCondition"},
            }
        },
        "required": ["condition"],
    },
    "limits": {"type": "array", "items": {"$ref": "#/components/schemas/Limit"}},
    "key": {"type": "string", "minLength": 1, "maxLength": 64},
    "username": {"type": ["string", "null"], "maxLength": 128, "pattern": "^[^:|]+$"},
    "password": {"type": "string", "minLength": 8, "maxLength": 256, "pattern": "^[^:]*$"},
    "timestamp_from": {"type": ["integer", "null"], "minimum": 0},
    "timestamp_to": {"type": ["integer", "null"], "minimum": 0},
    "description": {"type": ["string", "null"], "maxLength": 256},
    "max_uses": {"type": ["integer", "null"], "minimum": 1},
}
_ID = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
_SUCCESS = {"type": "object", "properties": {"success": {"type": "boolean"}}}
_ISSUED = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "secret": {"type": "string"},
        "token": {"type": "string", "description": "KEY:SECRET, shown once"},
    },
    "required": ["key", "secret", "token"],
}
_TOKEN_INFO = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "username": {"type": ["string", "null"]},
        "is_super": {"type": "boolean"},
        "limits": {"type": "array", "items": {"$ref": "#/components/schemas/Limit"}},
        "timestamp_from": {"type": ["integer", "null"]},
        "timestamp_to": {"type": ["integer", "null"]},
        "max_uses": {"type": ["integer", "null"]},
        "uses": {"type": "integer"},
        "description": {"type": ["string", "null"]},
        "created_at": {"type": "integer"},
        "updated_at": {"type": "integer"},
    },
}
RESULTS: dict[str, dict[str, Any]] = {
    "task_create_task": _ID,
    "task_create_task_blocking": {"$ref": "#/components/schemas/TaskEventResponse"},
    "task_query_task": {"type": "array", "items": {"$ref": "#/components/schemas/TaskRecord"}},
    "task_delete_task": {
        "type": "object",
        "properties": {
            "success": {"type": "boolean"},
            "deleted": {"type": "integer"},
            "condition_count": {"type": "integer"},
        },
    },
    "task_register_task": {"type": "integer", "maximum": 2**53},
    "task_unregister_task": {"type": "boolean"},
    "task_upload_task_result": _ID,
    "server_uuid": _UUID,
    "server_hello": {"type": "string"},
    "token_create": _ISSUED,
    "token_get": _TOKEN_INFO,
    "token_list_all_tokens": {"type": "array", "items": _TOKEN_INFO},
    "token_edit": _TOKEN_INFO,
    "token_delete": _SUCCESS,
    "token_roll_token_secret": _ISSUED,
    "token_change_password": _SUCCESS,
    "agent_enroll": {
        "type": "object",
        "properties": {"uuid": _UUID, "token": {"type": "string"}},
        "required": ["uuid", "token"],
    },
}


def _schema_of(annotation: Any) -> dict[str, Any]:
    schema: dict[str, Any] = TypeAdapter(annotation).json_schema(
        ref_template="#/components/schemas/{model}"
    )
    return schema


def wire_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each wire type, self-contained (definitions under ``$defs``)."""
    return {name: TypeAdapter(annotation).json_schema() for name, annotation in WIRE_TYPES.items()}


@cache
def openrpc_document() -> dict[str, Any]:
    """The OpenRPC 1.2 description of every method."""
    components: dict[str, Any] = {}
    for name, annotation in WIRE_TYPES.items():
        schema = _schema_of(annotation)
        components.update(schema.pop("$defs", {}))
        components[name] = schema
    methods = []
    seen: set[str] = set()
    for _, info in sorted(REGISTRY.items()):
        if info.name in seen:
            continue
        seen.add(info.name)
        params = list(inspect.signature(info.fn).parameters.values())[1:]
        entry: dict[str, Any] = {
            "name": info.name,
            "summary": info.summary,
            "paramStructure": "either",
            "params": [
                {
                    "name": p.name,
                    "required": p.default is inspect.Parameter.empty,
                    "schema": PARAMS.get(p.name, {}),
                }
                for p in params
            ],
            "result": {"name": "result", "schema": RESULTS.get(info.name, {})},
        }
        if info.aliases:
            entry["x-aliases"] = list(info.aliases)
        if info.websocket_only:
            entry["x-websocket-only"] = True
        methods.append(entry)
    return {
        "openrpc": "1.2.6",
        "info": {"title": "taskd", "version": __version__},
        "methods": methods,
        "components": {"schemas": components},
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
