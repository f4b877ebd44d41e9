"""``taskd call``: one JSON-RPC call."""

from __future__ import annotations

import argparse
import json
import os
import sys

from taskd.cli.client import CallFailed, post_rpc, server_url


def _token_param(method: str) -> str | None:
    """The name of the param that carries the caller's token, if ``method`` takes one."""
    import inspect

    import taskd.methods  # noqa: F401
    from taskd.rpc import REGISTRY

    info = REGISTRY.get(method)
    if info is None:
        return None
    names = list(inspect.signature(info.fn).parameters)[1:2]  # after the call context
    return names[0] if names and names[0] in ("token", "father_token") else None


def cmd_call(args: argparse.Namespace) -> int:
    """One JSON-RPC call; print the result, or the error and exit 1."""
    try:
        params = json.loads(args.params) if args.params else []
    except json.JSONDecodeError as exc:
        print(f"PARAMS_JSON is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, list | dict):
        print("PARAMS_JSON must be a JSON array or object", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("TASKD_TOKEN")
    name = _token_param(args.method)
    if name is not None and token:
        params = {name: token, **params} if isinstance(params, dict) else [token, *params]
    elif name is not None and not (isinstance(params, dict) and name in params):
        print(
            f"{args.method} needs a token: pass --token KEY:SECRET or set TASKD_TOKEN",
            file=sys.stderr,
        )
        return 2
    try:
        result = post_rpc(server_url(args), args.method, params, args.timeout)
    except CallFailed as exc:
        print(json.dumps(exc.error) if exc.error is not None else exc.message, file=sys.stderr)
        return exc.code
    print(json.dumps(result, indent=2))
    return 0
