"""The fault and abuse suite, short: every scenario of ``benchmarks/faults.py`` at quick scale.

Each scenario runs real ``taskd serve`` / ``taskd agent`` / load-agent processes,
injects its faults and checks its invariants: nothing acknowledged is lost,
every reply is well-formed, nothing unauthorized gets in, recovery happens.
Timing targets are measured and reported by ``make faults``; they are never
asserted here, so these tests do not flake on a slow machine.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from benchmarks.faults_abuse import r4_adversarial_input, r5_unauthorized
from benchmarks.faults_common import Outcome
from benchmarks.faults_crash import r1_server_kill, r2_connection_cut
from benchmarks.faults_database import r6_database_restart
from benchmarks.faults_inputs import expected_reply, judge_reply
from benchmarks.faults_storm import max_attempts, r3_reconnect_storm
from benchmarks.scale import QUICK


def assert_invariants(outcome: Outcome) -> None:
    """The scenario finished and every invariant it checked held."""
    assert outcome.error is None, f"{outcome.error}\n{outcome.figures.get('traceback', '')}"
    assert outcome.checks, "the scenario checked nothing"
    assert not outcome.broken, outcome.explain()


async def test_r1_a_killed_server_keeps_everything_it_acknowledged(tmp_path: Path) -> None:
    """SIGKILLed under load and restarted, taskd keeps every acknowledged create and result."""
    outcome = await r1_server_kill(QUICK, tmp_path)
    assert_invariants(outcome)
    assert outcome.figures["kills"], "the server was never killed"
    assert outcome.figures["creates_acknowledged"] == QUICK.r1_tasks
    assert outcome.figures["uploads_acknowledged"] > 0


async def test_r2_a_result_crosses_a_cut_connection_exactly_once(tmp_path: Path) -> None:
    """A real agent cut off mid-task (or while its reply is in flight) delivers its result once."""
    outcome = await r2_connection_cut(QUICK, tmp_path)
    assert_invariants(outcome)
    variants = outcome.figures["variants"]
    assert set(variants) == set(QUICK.r2_variants)
    assert all(v["agent_reconnects"] >= 1 for v in variants.values()), variants


async def test_r3_agents_resubscribe_after_a_restart_without_flooding(tmp_path: Path) -> None:
    """Every simulated agent resubscribes by itself, with backoff and jitter, no spinning."""
    outcome = await r3_reconnect_storm(QUICK, tmp_path)
    assert_invariants(outcome)
    assert outcome.figures["storm_queries"] > 0


def test_the_backoff_bound_counts_the_real_agents_shortest_waits() -> None:
    """Attempts allowed in a window follow 1 s doubling with -20% jitter (0.8, 1.6, 3.2 ...)."""
    assert max_attempts(0.5) == 1
    assert max_attempts(0.8) == 2
    assert max_attempts(2.3) == 2
    assert max_attempts(2.5) == 3
    assert max_attempts(30) == 6


@pytest.mark.parametrize("database", QUICK.r4_databases)
async def test_r4_adversarial_input_gets_well_formed_answers(tmp_path: Path, database: str) -> None:
    """Garbage, huge, deep, wrong-typed and slow input: no crash, hang, bloat or bad reply."""
    outcome = await r4_adversarial_input(QUICK, tmp_path, database)
    assert_invariants(outcome)
    assert outcome.figures["inputs"] >= QUICK.r4_inputs


def test_the_reply_judge_rejects_what_json_rpc_forbids() -> None:
    """The R4 judge flags wrong ids, broken envelopes, missing and surplus replies."""
    body = orjson.dumps({"jsonrpc": "2.0", "method": "server_hello", "id": 7})
    good = orjson.dumps({"jsonrpc": "2.0", "result": "hello", "id": 7})
    assert judge_reply(body, good)[0] is None
    assert judge_reply(body, orjson.dumps({"jsonrpc": "2.0", "result": 1, "id": 8}))[0]
    assert judge_reply(body, orjson.dumps({"result": 1, "id": 7}))[0]
    assert judge_reply(body, orjson.dumps({"jsonrpc": "2.0", "id": 7}))[0]
    error = {"jsonrpc": "2.0", "error": {"code": "x", "message": "m"}, "id": 7}
    assert judge_reply(body, orjson.dumps(error))[0]
    assert judge_reply(body, None)[0]
    notification = orjson.dumps({"jsonrpc": "2.0", "method": "server_hello"})
    assert expected_reply(notification) is None
    assert judge_reply(notification, None)[0] is None
    assert judge_reply(notification, good)[0]
    batch = orjson.dumps([{"jsonrpc": "2.0", "method": "a", "id": 1}, 5, {"jsonrpc": "2.0"}])
    assert expected_reply(batch) == [1, None, None]
    assert expected_reply(b"{nope") == [None]


async def test_r5_no_unauthorized_call_or_connection_succeeds(tmp_path: Path) -> None:
    """The security matrix, forged uploads and terminals against a live server: 0 get in."""
    outcome = await r5_unauthorized(QUICK, tmp_path)
    assert_invariants(outcome)
    assert outcome.figures["attempts"] > 500
    assert outcome.figures["unauthorized_successes"] == 0


async def test_r6_a_database_restart_fails_fast_and_recovers(tmp_path: Path) -> None:
    """PostgreSQL stopped under load: 103 at once, recovery by itself, nothing acknowledged lost."""
    outcome = await r6_database_restart(QUICK, tmp_path)
    assert_invariants(outcome)
    assert outcome.figures["outage_calls"] > 0
    assert outcome.figures["lost"] == 0
