"""Adversarial input for R4, and the judge of what the server answers to it.

Inputs come in families: random bytes, truncated requests, deep nesting, huge
strings and numbers, 10,000-item batches, oversize bodies, and every method
of ``schemas/openrpc.json`` called with each field of its params (walked
through the JSON Schemas, ``$ref``s resolved) replaced by values of the other
JSON types — enumerated exhaustively, plus random JSON drawn by hypothesis
into every part of a request. ``expected_reply`` says whether a body must be
answered (only valid notifications go unanswered) and ``judge_reply`` checks
that an answer is well-formed JSON-RPC with the right ids.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from benchmarks.services import ROOT

MAX_MESSAGE = 10 * 1024 * 1024
MAX_BATCH = 10_000
NEVER_SOON = "0 0 0 1 1 * 2099"
ID_TYPES = (str, int, float, type(None))


@dataclass(frozen=True)
class Attack:
    """One input: its family, the raw body, and whether it may go over a WebSocket."""

    family: str
    body: bytes
    websocket: bool = True


def encode(value: Any) -> bytes:
    """Compact JSON (the standard encoder: it writes integers of any size)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def request(method: str, params: Any, request_id: Any = 1) -> dict[str, Any]:
    """A JSON-RPC request object."""
    return {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}


def raw_request(method: str, params: str, request_id: str = "1") -> bytes:
    """A request whose params and id are given as raw JSON text (which may be invalid)."""
    head = '{"jsonrpc":"2.0","method":"' + method + '","params":'
    return (head + params + ',"id":' + request_id + "}").encode()


# --------------------------------------------------------------------------- expectations


def _is_notification(item: Any) -> bool:
    """A valid request without an id: the server must not answer it."""
    return (
        isinstance(item, dict)
        and "id" not in item
        and item.get("jsonrpc") == "2.0"
        and isinstance(item.get("method"), str)
        and isinstance(item.get("params", []), list | dict)
        and not set(item) - {"jsonrpc", "method", "params"}
    )


def _reply_id(item: Any) -> Any:
    if not isinstance(item, dict):
        return None
    value = item.get("id")
    return None if isinstance(value, bool) or not isinstance(value, ID_TYPES) else value


def expected_reply(body: bytes) -> list[Any] | None:
    """The ids the replies must carry (one per reply; a list for a batch), or None for none."""
    if len(body) > MAX_MESSAGE:
        return [None]
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [None]
    if isinstance(parsed, list):
        if not parsed or len(parsed) > MAX_BATCH:
            return [None]
        ids = [_reply_id(item) for item in parsed if not _is_notification(item)]
        return ids or None
    if _is_notification(parsed):
        return None
    return [_reply_id(parsed)]


def _well_formed(reply: Any) -> str | None:
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0" or "id" not in reply:
        return f"not a JSON-RPC response: {str(reply)[:200]}"
    if not isinstance(reply["id"], ID_TYPES) or isinstance(reply["id"], bool):
        return f"bad id {reply['id']!r}"
    has_result, has_error = "result" in reply, "error" in reply
    if has_result == has_error:
        return f"needs exactly one of result/error: {str(reply)[:200]}"
    if set(reply) - {"jsonrpc", "id", "result", "error"}:
        return f"unknown members: {sorted(reply)}"
    if has_error:
        error = reply["error"]
        if (
            not isinstance(error, dict)
            or isinstance(error.get("code"), bool)
            or not isinstance(error.get("code"), int)
            or not isinstance(error.get("message"), str)
            or set(error) - {"code", "message", "data"}
        ):
            return f"malformed error object: {str(error)[:200]}"
        if "Traceback" in error["message"] or 'File "' in error["message"]:
            return f"error leaks internals: {error['message'][:200]}"
    return None


def judge_reply(body: bytes, reply: bytes | None) -> tuple[str | None, list[dict[str, Any]]]:
    """(what is wrong with the reply to ``body``, or None; the response objects)."""
    expected = expected_reply(body)
    if reply is None or reply == b"":
        return (None if expected is None else "no reply to a request that needs one"), []
    if expected is None:
        return f"a reply to a notification: {reply[:200]!r}", []
    try:
        parsed = orjson.loads(reply)
    except orjson.JSONDecodeError:
        return f"reply is not JSON: {reply[:200]!r}", []
    batch = isinstance(parsed, list)
    responses = parsed if batch else [parsed]
    if not responses:
        return "empty batch reply", []
    for response in responses:
        problem = _well_formed(response)
        if problem is not None:
            return problem, responses
    got = [response["id"] for response in responses]
    if sorted(map(repr, got)) != sorted(map(repr, expected)):
        return f"reply ids {got[:5]}... do not match request ids {expected[:5]}...", responses
    return None, responses


# --------------------------------------------------------------------------- schemas


class Schemas:
    """The methods and wire types of ``schemas/openrpc.json``."""

    def __init__(self, path: Path = ROOT / "schemas" / "openrpc.json") -> None:
        self.document = json.loads(path.read_text())
        self.components: dict[str, Any] = self.document["components"]["schemas"]
        self.methods: dict[str, list[dict[str, Any]]] = {
            m["name"]: m["params"] for m in self.document["methods"]
        }

    def resolve(self, schema: Any) -> Any:
        """Follow ``$ref`` (to components or a wire type's own ``$defs``)."""
        while isinstance(schema, dict) and "$ref" in schema:
            schema = self.components[schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    def types(self, schema: Any) -> set[str]:
        """Every JSON type a schema admits."""
        schema = self.resolve(schema)
        if not isinstance(schema, dict) or not schema:
            return {"null", "boolean", "integer", "number", "string", "array", "object"}
        found: set[str] = set()
        for key in ("anyOf", "oneOf"):
            for branch in schema.get(key, []):
                found |= self.types(branch)
        kind = schema.get("type")
        if isinstance(kind, str):
            found.add(kind)
        elif isinstance(kind, list):
            found.update(kind)
        if "const" in schema and not kind:
            found.add(_json_type(schema["const"]))
        if "enum" in schema and not kind:
            found.update(_json_type(v) for v in schema["enum"])
        if "number" in found:
            found.add("integer")
        return found or {"null", "boolean", "integer", "number", "string", "array", "object"}

    def examples(self, schema: Any, name: str = "", depth: int = 0) -> list[Any]:
        """Valid values of a schema: one per alternative at the top, the first one below."""
        schema = self.resolve(schema)
        if not isinstance(schema, dict):
            return [None]
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            chosen = branches if depth == 0 else branches[:1]
            values = []
            for branch in chosen:
                values.extend(self.examples(branch, name, depth + 1)[:1])
            return values or [None]
        if "const" in schema:
            return [schema["const"]]
        if "enum" in schema:
            return list(schema["enum"]) if depth == 0 else [schema["enum"][0]]
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            value = {}
            for key, sub in schema.get("properties", {}).items():
                if key in schema.get("required", []):
                    value[key] = self.examples(sub, key, depth + 1)[0]
            return [value]
        if kind == "array":
            if "prefixItems" in schema:
                return [[self.examples(s, name, depth + 1)[0] for s in schema["prefixItems"]]]
            count = max(1, schema.get("minItems", 1))
            return [[self.examples(schema.get("items", {}), name, depth + 1)[0]] * count]
        if kind == "string":
            return [HINTS.get(name, "uuid" if schema.get("format") == "uuid" else "x")]
        if kind == "integer":
            return [max(int(schema.get("minimum", 1)), 1)]
        if kind == "number":
            return [1.5]
        if kind == "boolean":
            return [True]
        return [None]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


HINTS: dict[str, str] = {
    "ping": "127.0.0.1",
    "tcp_ping": "127.0.0.1:9",
    "http_ping": "http://127.0.0.1:9/",
    "url": "http://127.0.0.1:9/",
    "method": "GET",
    "domain": "example.com",
    "dns_server": "127.0.0.1:53",
    "self_update": "v1.2.3",
    "cmd": "true",
    "cron_expression": NEVER_SOON,
    "name": "fx-cron",
    "password": "a long enough password",
    "username": "fx-user",
    "edit_config": "agent_uuid = 'auto_gen'\n",
}

WRONG: dict[str, list[Any]] = {
    "null": [None],
    "boolean": [True, False],
    "integer": [0, -1, 2**53, -(2**63), 2**64, 10**40],
    "number": [1.5, -0.0, 1e308, -1e-308],
    "string": ["", "x" * 300, "\u0000\ud7ff", "1", "null", "💥" * 10],
    "array": [[], [None], [[[[]]]], [1, "a", {}]],
    "object": [{}, {"": None}, {"a": {"b": {"c": [1]}}}],
}

HOSTILE_STRINGS = ["nul\x00byte", "\x00", "\u202eevil", "\x1b[31mred", "x" * 70_000, "%s%n{0}"]
"""Strings of the right type and the wrong content."""


def wrong_values(allowed: set[str], rng: random.Random, per_type: int = 2) -> list[Any]:
    """Values of every JSON type the schema does not admit (a few of each)."""
    values: list[Any] = []
    for kind, samples in WRONG.items():
        if kind in allowed:
            continue
        values.extend(rng.sample(samples, min(per_type, len(samples))))
    return values


def _paths(
    schemas: Schemas, value: Any, schema: Any, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every (path, schema) pair inside a valid value."""
    yield path, schema
    schema = schemas.resolve(schema)
    if not isinstance(schema, dict):
        return
    if isinstance(value, dict):
        branches = schema.get("anyOf") or schema.get("oneOf") or [schema]
        for branch in branches:
            branch = schemas.resolve(branch)
            properties = branch.get("properties", {}) if isinstance(branch, dict) else {}
            if set(value) <= set(properties):
                for key, item in value.items():
                    yield from _paths(schemas, item, properties[key], (*path, key))
                break
    elif isinstance(value, list):
        branches = schema.get("anyOf") or schema.get("oneOf") or [schema]
        for branch in branches:
            branch = schemas.resolve(branch)
            if isinstance(branch, dict) and branch.get("type") == "array":
                prefix = branch.get("prefixItems")
                for index, item in enumerate(value):
                    sub = prefix[index] if prefix and index < len(prefix) else branch.get("items")
                    yield from _paths(schemas, item, sub, (*path, index))
                break


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return copy


def _drop(value: Any, path: tuple[Any, ...]) -> Any:
    copy = json.loads(json.dumps(value))
    target = copy
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return copy


def wrong_typed_calls(
    schemas: Schemas, bases: dict[str, list[Any]], rng: random.Random
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every method called with each field of each param replaced by wrong-typed values.

    Also: hostile strings where strings belong (NUL, control and bidi characters,
    70,000 characters), each object member dropped, an unknown member added, and both
    the positional and the named form of the params. Yields (method, request).
    """
    ids = iter(range(1, 1 << 62))
    forms = iter(range(1 << 62))
    for method, params in schemas.methods.items():
        base = bases.get(method)
        if base is None:
            continue
        names = [p["name"] for p in params]
        for index, param in enumerate(params):
            if index >= len(base):
                break
            for example in [base[index], *schemas.examples(param["schema"], param["name"])]:
                for path, schema in _paths(schemas, example, param["schema"]):
                    allowed = schemas.types(schema)
                    mutations = wrong_values(allowed, rng)
                    if "string" in allowed:
                        mutations.append(rng.choice(HOSTILE_STRINGS))
                    if path and isinstance(path[-1], str):
                        mutations.append(_DROP)
                    for mutation in mutations:
                        if mutation is _DROP:
                            value = _drop(example, path)
                        else:
                            value = _replace(example, path, mutation)
                        args = [*base[:index], value, *base[index + 1 :]]
                        named = next(forms) % 2 == 0
                        sent: Any = dict(zip(names, args, strict=False)) if named else args
                        yield method, request(method, sent, next(ids))
                    if isinstance(example, dict):
                        extra = {**example, "unexpected_member": 1}
                        args = [*base[:index], extra, *base[index + 1 :]]
                        yield method, request(method, args, next(ids))


_DROP = object()


# --------------------------------------------------------------------------- hypothesis

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=25,
)


def hypothesis_requests(
    schemas: Schemas, bases: dict[str, list[Any]], count: int
) -> list[dict[str, Any]]:
    """Requests drawn by hypothesis: any JSON in the envelope, a param, or a deep field."""
    methods = sorted(bases)
    names = sorted({p["name"] for params in schemas.methods.values() for p in params})
    envelope = st.fixed_dictionaries(
        {
            "jsonrpc": st.just("2.0") | JSON_VALUES,
            "method": st.sampled_from(methods) | st.text(max_size=30),
            "id": st.integers(0, 2**40) | st.text(max_size=10),
        },
        optional={
            "params": st.lists(JSON_VALUES, max_size=6)
            | st.dictionaries(
                st.sampled_from(names) | st.text(max_size=10), JSON_VALUES, max_size=6
            )
        },
    )

    with_params = [m for m in methods if bases[m]]

    @st.composite
    def param_swap(draw: Any) -> dict[str, Any]:
        method = draw(st.sampled_from(with_params))
        args = list(bases[method])
        index = draw(st.integers(0, len(args) - 1))
        value = args[index]
        paths = [p for p, _ in _paths(schemas, value, schemas.methods[method][index]["schema"])]
        path = draw(st.sampled_from(paths))
        args[index] = _replace(value, path, draw(JSON_VALUES))
        return request(method, args, draw(st.integers(0, 2**40)))

    drawn: list[dict[str, Any]] = []

    @settings(
        max_examples=max(count, 1),
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(envelope | param_swap())
    def collect(value: dict[str, Any]) -> None:
        drawn.append(value)

    collect()
    return drawn[:count]


# --------------------------------------------------------------------------- families


def random_bytes(rng: random.Random, count: int) -> Iterator[Attack]:
    """Random bytes, random printable text and broken UTF-8."""
    for index in range(count):
        size = rng.choice((0, 1, 2, 7, 64, 500, 4000))
        if index % 3 == 0:
            body = rng.randbytes(size)
        elif index % 3 == 1:
            body = bytes(rng.choice(b'{}[]",:0123456789abcdefnulltrue \\') for _ in range(size))
        else:
            body = (
                b'{"jsonrpc":"2.0","method":"server_hello","id":"\xff\xfe'
                + rng.randbytes(8)
                + b'"}'
            )
        yield Attack("random bytes", body)


def truncated(rng: random.Random, samples: list[bytes], count: int) -> Iterator[Attack]:
    """Valid requests cut short at a random byte."""
    for _ in range(count):
        body = rng.choice(samples)
        yield Attack("truncated JSON", body[: rng.randrange(0, max(len(body), 1))])


def deep_nesting(token: str, offline: str) -> Iterator[Attack]:
    """Arrays and objects nested far beyond any real request, in and out of params."""
    for depth in (100, 1_000, 1_024, 1_025, 5_000, 100_000):
        yield Attack("deep nesting", b"[" * depth + b"]" * depth)
        yield Attack("deep nesting", b'{"a":' * depth + b"1" + b"}" * depth)
        nested = "[" * depth + "]" * depth
        body = raw_request("task_create_task", f'["{token}","{offline}",{nested}]')
        yield Attack("deep nesting", body)
    for depth in (30, 200, 300, 900):
        value: Any = "leaf"
        for _ in range(depth):
            value = {"k": value}
        nested_limit = {"token_limit": [value]}
        yield Attack("deep nesting", encode(request("token_create", [token, nested_limit], depth)))
        yield Attack(
            "deep nesting",
            encode(request("task_create_task", [token, offline, {"version": value}], depth)),
        )


def huge_values(token: str, offline: str) -> Iterator[Attack]:
    """Huge strings and numbers where small ones belong."""
    for size in (100_000, 1_000_000, 9_000_000):
        text = "x" * size
        yield Attack("huge values", encode(request("server_hello", [], text)))
        yield Attack("huge values", encode(request(text, [], 1)))
        yield Attack("huge values", encode(request("task_query_task", [text, {"condition": []}])))
        yield Attack(
            "huge values",
            encode(request("task_create_task", [token, offline, {"ping": text}])),
        )
    for number in (
        "1e400",
        "-1e400",
        "1" * 5_000,
        "18446744073709551616",
        "-9223372036854775809",
        "1e-400",
        "123456789012345678901234567890.5e300",
    ):
        yield Attack(
            "huge values", b'{"jsonrpc":"2.0","method":"server_hello","id":%s}' % number.encode()
        )
        query = f'["{token}",{{"condition":[{{"task_id":{number}}},{{"limit":{number}}}]}}]'
        yield Attack("huge values", raw_request("task_query_task", query, "2"))
        create = f'["{token}","{offline}","version",{number}]'
        yield Attack("huge values", raw_request("task_create_task", create, "3"))


def batches(token: str, bad_token: str, rng: random.Random) -> Iterator[Attack]:
    """10,000-item batches (cheap, invalid, notifications, mixed, authenticated) and beyond."""
    hello = {"jsonrpc": "2.0", "method": "server_hello"}
    yield Attack("10,000-item batch", encode([hello | {"id": i} for i in range(MAX_BATCH)]))
    yield Attack("10,000-item batch", encode([hello for _ in range(MAX_BATCH)]))
    yield Attack("10,000-item batch", encode([hello | {"id": i} for i in range(MAX_BATCH + 1)]))
    junk = [1, "x", None, [], {}, {"jsonrpc": "1.0", "id": 1}, {"method": 5, "id": 2}]
    yield Attack("10,000-item batch", encode([rng.choice(junk) for _ in range(MAX_BATCH)]))
    query = {"condition": [{"limit": 1}]}
    yield Attack(
        "10,000-item batch",
        encode([request("task_query_task", [bad_token, query], i) for i in range(MAX_BATCH)]),
    )
    yield Attack(
        "10,000-item batch",
        encode([request("task_query_task", [token, query], i) for i in range(2_000)]),
    )
    yield Attack("10,000-item batch", b"[" + b",".join([b"[]"] * MAX_BATCH) + b"]")


def oversize() -> Iterator[Attack]:
    """Bodies over the 10 MiB limit (and, over WebSocket, over the frame limit too)."""
    padding = b" " * (MAX_MESSAGE + 1 - 60)
    yield Attack("oversize", b'{"jsonrpc":"2.0","method":"server_hello","id":1}' + padding)
    yield Attack("oversize", b"[" + b"1," * (MAX_MESSAGE // 2) + b"1]")
    yield Attack("oversize", b'"' + b"a" * (MAX_MESSAGE + 10) + b'"')


def raw_samples(token: str, offline: str) -> list[bytes]:
    """A few valid request bodies (to truncate)."""
    return [
        encode(request("server_hello", [], 1)),
        encode(request("task_query_task", [token, {"condition": ["last"]}], 2)),
        encode(
            request(
                "task_create_task",
                [token, offline, {"dns": {"domain": "a", "record_types": ["a"]}}],
                3,
            )
        ),
        encode([request("server_uuid", [], 4), request("server_hello", [], 5)]),
        encode(
            request(
                "crontab_create",
                [token, "x", NEVER_SOON, {"agent": [[offline], {"task": "ip"}]}],
                6,
            )
        ),
    ]


def method_bases(
    token: str, offline: str, victim_key: str, listener: str, throwaway: str
) -> dict[str, list[Any]]:
    """Valid params for every method, aimed at nothing that matters (offline agents, throwaways).

    The methods that act on the caller's own token when no key is given are called
    with ``throwaway``: a wrong-typed key may legitimately mean "my own".
    """
    cron = {"agent": [[offline], {"task": "version"}]}
    response = {
        "task_id": 1,
        "agent_uuid": offline,
        "task_token": "AAAAAAAAAA",
        "timestamp": 1,
        "success": True,
        "task_event_result": {"version": {"taskd": "x"}},
    }
    limit = [{"scopes": [{"agent_uuid": offline}], "permissions": [{"task": {"read": "ping"}}]}]
    return {
        "agent_enroll": [token, str(uuid.UUID(int=1))],
        "agent_list": [token],
        "crontab-result_delete": [token, {"condition": [{"cron_name": "fx-none"}]}],
        "crontab-result_query": [token, {"condition": [{"cron_name": "fx-none"}]}],
        "crontab_create": [token, "fx-cron", NEVER_SOON, cron],
        "crontab_delete": [token, "fx-none"],
        "crontab_edit": [token, "fx-none", NEVER_SOON, cron],
        "crontab_get": [token],
        "crontab_set_enable": [token, "fx-none", False],
        "server_hello": [],
        "server_uuid": [],
        "task_create_task": [token, offline, "version"],
        "task_create_task_blocking": [token, offline, "version", 1],
        "task_delete_task": [token, [{"task_id": 999_999_999}]],
        "task_query_task": [token, {"condition": [{"limit": 1}]}],
        "task_register_task": [token, listener],
        "task_unregister_task": [1],
        "task_upload_task_result": [token, response],
        "token_change_password": [throwaway, victim_key, "another long password"],
        "token_create": [token, {"token_limit": limit}],
        "token_delete": [token, "fxNoSuchKey00000"],
        "token_edit": [token, victim_key, limit],
        "token_get": [token],
        "token_list_all_tokens": [token],
        "token_roll_token_secret": [throwaway, victim_key],
    }
