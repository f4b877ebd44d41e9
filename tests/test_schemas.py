"""The generated schemas: the OpenRPC document describes every method from its annotations."""

from __future__ import annotations

import json
import re

import taskd.methods  # noqa: F401 - registers every method
from taskd.rpc import REGISTRY
from taskd.schemas import WIRE_TYPES, openrpc_document, wire_schemas


def test_every_method_is_described_from_its_annotations() -> None:
    """Each method's params and result come from its annotations, refer to named components
    that exist, and no param is left without a schema."""
    document = openrpc_document()
    components = document["components"]["schemas"]
    referenced = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert referenced <= set(components)
    assert set(WIRE_TYPES) <= set(components)
    # a name made of a module path means two types share a name
    assert [name for name in components if not name.isidentifier() or "__" in name] == []
    methods = {entry["name"]: entry for entry in document["methods"]}
    assert set(methods) == {info.name for info in REGISTRY.values()}
    create = methods["task_create_task"]
    assert [(p["name"], p["required"]) for p in create["params"]] == [
        ("token", True),
        ("target_uuid", True),
        ("task_type", True),
        ("queue_ttl_ms", False),
    ]
    assert create["params"][2]["schema"] == {"$ref": "#/components/schemas/TaskEventType"}
    assert create["result"]["schema"] == {"$ref": "#/components/schemas/IdReply"}
    assert methods["task_query_task"]["result"]["schema"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/TaskRecord"},
    }
    undescribed = [
        (entry["name"], param["name"])
        for entry in document["methods"]
        for param in entry["params"]
        if not param["schema"]
    ]
    assert undescribed == []


def test_wire_type_files_are_self_contained() -> None:
    """Each wire type's own schema resolves every reference inside itself."""
    for name, schema in wire_schemas().items():
        defined = set(schema.get("$defs", {}))
        referenced = set(re.findall(r'"#/\$defs/([^"]+)"', json.dumps(schema)))
        assert referenced <= defined, name
