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
_TARGET = {"type": "string", "minLength": 1, "description": "a token's key or username"}
_LIMITS = {"type": "array", "items": {"$ref": "#/components/schemas/Limit"}}
_PASSWORD = {"type": "string", "minLength": 6, "maxLength": 256}
_USERNAME = {"type": ["string", "null"], "minLength": 1, "maxLength": 128}
_MS = {"type": ["integer", "null"], "minimum": 0}
_DESCRIPTION = {"type": ["string", "null"], "maxLength": 256}
_MAX_USES = {"type": ["integer", "null"], "minimum": 1}
TOKEN_CREATION = {
    "type": "object",
    "properties": {
        "token_limit": _LIMITS,
        "username": _USERNAME,
        "password": {**_PASSWORD, "type": ["string", "null"]},
        "timestamp_from": _MS,
        "timestamp_to": _MS,
        "version": {"type": ["integer", "null"], "description": "ignored: always 1"},
        "description": _DESCRIPTION,
        "max_uses": _MAX_USES,
    },
    "required": ["token_limit"],
}
_KV_NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 128}
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
    "father_token": _TOKEN,
    "supertoken": {**_TOKEN, "description": "KEY:SECRET or USERNAME|PASSWORD of a token reader"},
    "token_creation": {"$ref": "#/components/schemas/TokenCreation"},
    "target_token": _TARGET,
    "limit": _LIMITS,
    "new_password": _PASSWORD,
    "username": _USERNAME,
    "timestamp_from": _MS,
    "timestamp_to": _MS,
    "description": _DESCRIPTION,
    "max_uses": _MAX_USES,
    "agent_uuid": _UUID,
    "namespace": _KV_NAMESPACE,
    "key": {"type": "string", "minLength": 1, "maxLength": 512, "description": "no '*'"},
    "value": {"description": "any JSON value, up to 1 MiB"},
    "namespace_key": {
        "type": "array",
        "maxItems": 10_000,
        "items": {
            "type": "object",
            "properties": {
                "namespace": _KV_NAMESPACE,
                "key": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 512,
                    "description": "a key, or a prefix ending in '*'",
                },
            },
            "required": ["namespace", "key"],
        },
    },
}
_SUCCESS = {
    "type": "object",
    "properties": {"success": {"type": "boolean", "const": True}},
    "required": ["success"],
}
_ID = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
_ISSUED = {
    "type": "object",
    "properties": {"key": {"type": "string"}, "secret": {"type": "string"}},
    "required": ["key", "secret"],
}
_TOKEN_INFO = {
    "type": "object",
    "properties": {
        "version": {"type": "integer", "const": 1},
        "token_key": {"type": "string"},
        "timestamp_from": {"type": ["integer", "null"]},
        "timestamp_to": {"type": ["integer", "null"]},
        "token_limit": _LIMITS,
        "username": {"type": ["string", "null"], "description": "root for the super token"},
        "is_super": {"type": "boolean"},
        "description": {"type": ["string", "null"]},
        "max_uses": {"type": ["integer", "null"]},
        "uses": {"type": "integer"},
        "created_at": {"type": "integer"},
        "updated_at": {"type": "integer"},
    },
    "required": [
        "version",
        "token_key",
        "timestamp_from",
        "timestamp_to",
        "token_limit",
        "username",
    ],
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
    "token_list_all_tokens": {
        "type": "object",
        "properties": {"tokens": {"type": "array", "items": _TOKEN_INFO}},
        "required": ["tokens"],
    },
    "token_edit": {
        "type": "object",
        "properties": {
            "success": {"type": "boolean"},
            "id": {"type": "integer"},
            "token_key": {"type": "string"},
        },
        "required": ["success", "id", "token_key"],
    },
    "token_delete": {
        "type": "object",
        "properties": {
            "message": {"type": "string"},
            "rows_affected": {"type": "integer"},
            "matched_by": {"enum": ["token_key", "username"]},
        },
        "required": ["message", "rows_affected", "matched_by"],
    },
    "token_roll_token_secret": _ISSUED,
    "token_change_password": {
        "type": "object",
        "properties": {"success": {"type": "boolean"}, "message": {"type": "string"}},
        "required": ["success"],
    },
    "agent_enroll": {
        "type": "object",
        "properties": {"uuid": _UUID, "token": {"type": "string"}},
        "required": ["uuid", "token"],
    },
    "server_version": {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "binary_type": {"const": "Server"},
            "cargo_version": {"type": "string", "description": "the taskd version"},
        },
        "additionalProperties": {"type": "string"},
        "required": ["version", "binary_type", "cargo_version"],
    },
    "nodeget-server_list_all_agent_uuid": {
        "type": "object",
        "properties": {"uuids": {"type": "array", "items": _UUID}},
        "required": ["uuids"],
    },
    "agent-uuid_list_all": {"type": "array", "items": _UUID},
    "agent-uuid_list_all_with_agent_mode": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"uuid": _UUID, "soft_delete": {"type": "boolean"}},
            "required": ["uuid", "soft_delete"],
        },
    },
    "agent-uuid_delete": {
        "type": "object",
        "properties": {"success": {"type": "boolean"}, "message": {"type": "string"}},
        "required": ["success", "message"],
    },
    "kv_create": {
        "type": "object",
        "properties": {"namespace": _KV_NAMESPACE, "kv": {"type": "object"}},
        "required": ["namespace", "kv"],
    },
    "kv_list_all_namespace": {"type": "array", "items": _KV_NAMESPACE},
    "kv_get_value": {"description": "the JSON value, null if the key does not exist"},
    "kv_get_multi_value": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"namespace": _KV_NAMESPACE, "key": {"type": "string"}, "value": {}},
            "required": ["namespace", "key", "value"],
        },
    },
    "kv_set_value": _SUCCESS,
    "kv_delete_key": _SUCCESS,
    "kv_get_all_keys": {"type": "array", "items": {"type": "string"}},
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
    components["TokenCreation"] = TOKEN_CREATION
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
