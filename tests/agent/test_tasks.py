"""The task kind registry: every kind the protocol declares has a runner."""

from __future__ import annotations

import inspect

from taskd.agent.tasks import runner_for
from taskd.config import parse_agent_config
from taskd.protocol import TASK_TYPES


def test_every_declared_kind_has_a_runner_and_a_timeout() -> None:
    """Each kind of ``protocol.TASK_TYPES`` resolves to a coroutine runner and a positive limit."""
    settings = parse_agent_config(
        'agent_uuid = "5f0e3c2a-9b1d-4e7f-a6c8-d2b4e1f3a5c7"\n'
        '[[server]]\nws_url = "ws://127.0.0.1:9/ws"\ntoken = "secret"\n'
    )
    runners = {}
    for kind in TASK_TYPES:
        runner, timeout = runner_for(kind, settings)
        assert inspect.iscoroutinefunction(runner), kind
        assert timeout > 0, kind
        runners[kind] = runner
    # kinds sharing a module still run their own code
    assert runners["http_ping"] is not runners["http_request"]
    assert runners["read_config"] is not runners["edit_config"]
