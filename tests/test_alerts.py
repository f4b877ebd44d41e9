"""Alerts end to end: real servers, real agents killed and restarted, real crons probing a
closed port, and real channels on loopback (an HTTP receiver for json://, aiosmtpd for
mailto://)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiosmtpd.controller import Controller

from taskd.agent.monitor import Monitor, summarize
from taskd.clock import now_ms
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    Server,
    add_token,
    agent_token_limits,
    hold_port,
    make_settings,
    running_server,
    scaled,
    wait_for,
)

GRACE_MS = 3000
AGENT_START_S = 30
"""How long a fresh `taskd agent` process may take to import taskd and subscribe."""


def alert_settings(database_url: str, **overrides: Any) -> Any:
    """Server settings with quick alert loops (sweeps, batching window, retries)."""
    quick = {
        "alert_sweep_ms": 100,
        "alert_batch_window_ms": 200,
        "alert_retry_base_ms": 200,
        "alert_probe_interval_ms": 200,
        "alert_metric_interval_ms": 200,
    }
    return make_settings(database_url, **(quick | overrides))


# --------------------------------------------------------------------------- channels


@dataclass
class Received:
    """One webhook call: when it came (monotonic), its JSON body and the status answered."""

    at: float
    body: dict[str, Any]
    status: int
    headers: dict[str, str]

    @property
    def text(self) -> str:
        """Title and message together."""
        return f"{self.body.get('title', '')}\n{self.body.get('message', '')}"


@dataclass
class Receiver:
    """An HTTP server taking Apprise's json:// POSTs: the first ``fail`` calls are answered
    500, and every answer waits ``delay`` seconds."""

    port: int = 0
    fail: int = 0
    delay: float = 0.0
    calls: list[Received] = field(default_factory=list)

    @property
    def delivered(self) -> list[Received]:
        """The calls answered 200."""
        return [c for c in self.calls if c.status == 200]

    def url(self, path: str = "hook", auth: str = "") -> str:
        """The json:// URL of this receiver."""
        return f"json://{auth}127.0.0.1:{self.port}/{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            await asyncio.sleep(self.delay)
            status = 500 if self.fail > 0 else 200
            self.fail -= 1
            received = Received(time.monotonic(), orjson.loads(body or b"{}"), status, headers)
            self.calls.append(received)
            reason = b"OK" if status == 200 else b"Internal Server Error"
            writer.write(
                b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % (status, reason)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def receiver(fail: int = 0, delay: float = 0.0) -> AsyncIterator[Receiver]:
    """A webhook receiver on a port-0 socket."""
    hook = Receiver(fail=fail, delay=delay)
    server = await asyncio.start_server(hook.serve, "127.0.0.1", 0)
    hook.port = server.sockets[0].getsockname()[1]
    try:
        yield hook
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


class _Collect:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


@dataclass
class Mailbox:
    """A local SMTP server and the mails it took."""

    port: int
    handler: _Collect

    @property
    def messages(self) -> list[Message]:
        """Every mail received."""
        return self.handler.messages

    def url(self) -> str:
        """The mailto:// URL that sends here."""
        return f"mailto://127.0.0.1:{self.port}?from=taskd@example.com&to=ops@example.com"


@contextlib.contextmanager
def mailbox() -> Iterator[Mailbox]:
    """An aiosmtpd server on a free loopback port."""
    handler = _Collect()
    with hold_port() as port:
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            yield Mailbox(port, handler)
        finally:
            controller.stop()


# --------------------------------------------------------------------------- agents


@contextlib.asynccontextmanager
async def agent_process(
    server: Server, tmp_path: Path, agent_uuid: str, allow: str = "tcp_ping"
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `taskd agent` subscribed to ``server``; killed when the block ends."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    env.pop("TASKD_AGENT_CONFIG", None)
    with (tmp_path / "agent.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "taskd", "agent", "--server", server.ws_url),
            *("--token", server.super_token, "--uuid", agent_uuid, "--allow", allow),
            *("--state-dir", str(tmp_path / "state")),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        await wait_for(lambda: _online(server, agent_uuid), AGENT_START_S)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _online(server: Server, agent_uuid: str) -> bool:
    return bool(server.service.hub.is_connected(agent_uuid))


def offline_rule(name: str, targets: Any, channels: list[str], grace_ms: int = GRACE_MS) -> Any:
    """An agent_offline rule."""
    return {
        "name": name,
        "kind": "agent_offline",
        "targets": targets,
        "params": {"grace_ms": grace_ms},
        "channels": channels,
    }


async def events(server: Server, *conditions: Any) -> list[dict[str, Any]]:
    """alert_event_query with these conditions."""
    found: list[dict[str, Any]] = await server.su(
        "alert_event_query", {"condition": list(conditions)}
    )
    return found


# --------------------------------------------------------------------------- agent_offline


async def test_offline_alert_within_grace_and_one_resolution_with_the_downtime(
    database_url: str, tmp_path: Path
) -> None:
    """A killed agent fires within grace + 2 s, once; restarted, it resolves once, and the
    resolution carries how long it was down."""
    agent_uuid = str(uuid.uuid4())
    async with receiver() as hook, running_server(alert_settings(database_url)) as server:
        await server.su("alert_channel_create", "hook", hook.url())
        await server.su("alert_rule_create", offline_rule("down", [agent_uuid], ["hook"]))
        async with agent_process(server, tmp_path, agent_uuid) as process:
            await asyncio.sleep(scaled(0.5))
            process.kill()
            killed, killed_ms = time.monotonic(), now_ms()
            await process.wait()
        await wait_for(lambda: _count(hook, 1), GRACE_MS / 1000 + 5)
        fired = hook.delivered[0]
        assert GRACE_MS / 1000 - 0.3 <= fired.at - killed <= GRACE_MS / 1000 + scaled(2)
        assert "firing" in fired.body["title"] and agent_uuid in fired.text
        [event] = await events(server, {"rule": "down"})
        assert event["state"] == "firing" and event["uuid"] == agent_uuid
        assert abs(event["started_at"] - killed_ms) < 1000

        await asyncio.sleep(scaled(1))
        async with agent_process(server, tmp_path, agent_uuid):
            back_ms = now_ms()
            await wait_for(lambda: _count(hook, 2), 10)
            resolved = hook.delivered[1]
            assert "resolved" in resolved.body["title"] and "RESOLVED after" in resolved.text
            [event] = await events(server, {"rule": "down"})
            assert event["state"] == "resolved"
            downtime = event["resolved_at"] - event["started_at"]
            assert abs(downtime - (back_ms - killed_ms)) < scaled(1500)
            assert f"after {downtime // 1000} s" in resolved.text or "min" in resolved.text
            await asyncio.sleep(scaled(1.5))
            assert len(hook.calls) == 2, [c.text for c in hook.calls]
        # The receiver answers before the sender records the delivery: wait for the record.
        await wait_for(lambda: _recorded(server, hook=["sent", "sent"]), 5)


async def _count(hook: Receiver, count: int) -> bool:
    return len(hook.delivered) >= count


async def _recorded(server: Server, **states: str | list[str]) -> bool:
    """Whether the one event's deliveries to each named channel have reached `states`."""
    [event] = await events(server)
    for channel, wanted in states.items():
        found = [d["state"] for d in event["deliveries"] if d["channel"] == channel]
        if found != (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


async def test_no_alert_when_an_agent_reconnects_inside_the_grace(database_url: str) -> None:
    """Flapping inside the grace records nothing and sends nothing."""
    async with receiver() as hook, running_server(alert_settings(database_url)) as server:
        await server.su("alert_channel_create", "hook", hook.url())
        await server.su("alert_rule_create", offline_rule("down", "all", ["hook"]))
        token = server.super_token
        agent_uuid = str(uuid.uuid4())
        for _ in range(3):
            async with ScriptedAgent(server.ws_url, token, agent_uuid):
                await asyncio.sleep(0.2)
            await asyncio.sleep(GRACE_MS / 1000 / 3)
        async with ScriptedAgent(server.ws_url, token, agent_uuid):
            await asyncio.sleep(GRACE_MS / 1000 + 1)
            assert hook.calls == []
            assert await events(server) == []


async def test_many_agents_dropping_at_once_are_batched_per_channel(
    database_url: str,
) -> None:
    """25 agents dropping together are 25 events but one summary message per channel."""
    async with receiver() as hook, running_server(alert_settings(database_url)) as server:
        await server.su("alert_channel_create", "hook", hook.url())
        await server.su("alert_rule_create", offline_rule("down", "all", ["hook"], 1000))
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(25):
                await stack.enter_async_context(ScriptedAgent(server.ws_url, server.super_token))
        await wait_for(lambda: _firing(server, 25), 6)
        await wait_for(lambda: _count(hook, 1), 5)
        await asyncio.sleep(scaled(1))
        assert len(hook.calls) <= 2, [c.body["title"] for c in hook.calls]
        assert "alerts" in hook.calls[0].body["title"]
        assert sum(c.body["message"].count("FIRING") for c in hook.calls) >= min(25, 20)


async def _firing(server: Server, count: int) -> bool:
    return len(await events(server, "is_firing")) >= count


# --------------------------------------------------------------------------- channels


async def test_a_failing_channel_is_retried_and_the_others_still_deliver(
    database_url: str,
) -> None:
    """A channel answering 500 is retried with backoff, a hanging one holds only itself, and
    the webhook and the mail channel deliver at once; attempts and errors are on record."""
    settings = alert_settings(database_url, alert_send_timeout_ms=20_000)
    with mailbox() as mail:
        async with (
            receiver(fail=2) as flaky,
            receiver(delay=15) as hanging,
            receiver() as good,
            running_server(settings) as server,
        ):
            for name, url in (
                ("flaky", flaky.url()),
                ("hanging", hanging.url()),
                ("good", good.url()),
                ("mail", mail.url()),
            ):
                await server.su("alert_channel_create", name, url)
            channels = ["flaky", "hanging", "good", "mail"]
            await server.su("alert_rule_create", offline_rule("down", "all", channels, 1000))
            async with ScriptedAgent(server.ws_url, server.super_token) as agent:
                await asyncio.sleep(0.2)
            left = time.monotonic()
            await wait_for(lambda: _count(good, 1), 4)
            assert good.delivered[0].at - left < 1 + scaled(2)
            await wait_for(lambda: _mails(mail, 1), 4)
            assert agent.uuid in mail.messages[0].get_payload() or agent.uuid in str(
                mail.messages[0]
            )
            await wait_for(lambda: _count(flaky, 1), 6)
            assert [c.status for c in flaky.calls] == [500, 500, 200]
            await wait_for(lambda: _recorded(server, flaky="sent"), 5)
            [event] = await events(server)
            by_channel = {d["channel"]: d for d in event["deliveries"]}
            assert by_channel["flaky"]["attempts"] == 3 and by_channel["flaky"]["state"] == "sent"
            assert (
                "500" in by_channel["flaky"]["last_error"]
                or "Internal" in (by_channel["flaky"]["last_error"])
            )
            assert by_channel["good"]["attempts"] == 1
            assert by_channel["hanging"]["state"] == "pending"
            metrics = (await server.http.get("/metrics")).text
            assert 'taskd_alert_notifications_total{outcome="retried"} 2.0' in metrics


async def _mails(mail: Mailbox, count: int) -> bool:
    return len(mail.messages) >= count


async def test_channel_secrets_are_never_listed_or_logged(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Passwords, tokens and secret query values of a channel URL appear in no list, no
    reply, no event record and no log line (Apprise's own included)."""
    caplog.set_level(logging.DEBUG)
    password, key = "Sup3rSecretPw", "K3yValue123456"
    with hold_port() as closed:
        url = f"json://alice:{password}@127.0.0.1:{closed}/hook?-X-Api-Key={key}"
        async with running_server(alert_settings(database_url, alert_retry_max=2)) as server:
            await server.su("alert_channel_create", "secret", url)
            [listed] = await server.su("alert_channel_list")
            assert listed["scheme"] == "json"
            assert password not in str(listed) and key not in str(listed)
            assert "127.0.0.1" in listed["url_redacted"]
            with pytest.raises(RpcError) as failed:
                await server.su("alert_channel_test", "secret")
            assert failed.value.code == 999 and password not in failed.value.message
            await server.su("alert_rule_create", offline_rule("down", "all", ["secret"], 1000))
            async with ScriptedAgent(server.ws_url, server.super_token):
                pass
            await wait_for(lambda: _gave_up(server), 10)
            [event] = await events(server)
            assert event["deliveries"][0]["attempts"] == 2
            assert event["deliveries"][0]["last_error"]
            for text in (str(event), caplog.text):
                assert password not in text and key not in text


async def _gave_up(server: Server) -> bool:
    found = await events(server)
    return bool(found) and found[0]["deliveries"][0]["state"] == "failed"


# --------------------------------------------------------------------------- probes and metrics


async def test_consecutive_probe_failures_fire_once(database_url: str, tmp_path: Path) -> None:
    """A cron's tcp_ping failing against a closed port fires after 3 failures in a row, once,
    however many more fail."""
    agent_uuid = str(uuid.uuid4())
    with hold_port() as closed:
        async with receiver() as hook, running_server(alert_settings(database_url)) as server:
            await server.su("alert_channel_create", "hook", hook.url())
            rule = {
                "name": "probe",
                "kind": "probe_failed",
                "targets": "all",
                "params": {"cron": "closed-port", "consecutive": 3},
                "channels": ["hook"],
            }
            await server.su("alert_rule_create", rule)
            async with agent_process(server, tmp_path, agent_uuid):
                probe = {"tcp_ping": f"127.0.0.1:{closed}"}
                cron = {"agent": [[agent_uuid], {"task": probe}]}
                await server.su("crontab_create", "closed-port", "* * * * * *", cron)
                await wait_for(lambda: _count(hook, 1), 15)
                failures = await _failures(server)
                assert failures >= 3
                await wait_for(lambda: _more_failures(server, failures + 3), 10)
                await asyncio.sleep(scaled(0.5))
                assert len(hook.calls) == 1, [c.text for c in hook.calls]
                [event] = await events(server, {"rule": "probe"})
                assert event["state"] == "firing" and "3 time(s) in a row" in event["message"]


async def _failures(server: Server) -> int:
    query = {"condition": [{"cron_source": "closed-port"}, "is_failure"]}
    return len(await server.su("task_query", query))


async def _more_failures(server: Server, count: int) -> bool:
    return await _failures(server) >= count


async def test_a_metric_rule_fires_after_for_ms_and_resolves(database_url: str) -> None:
    """CPU above 90 % fires only once it has held for for_ms (the clock moved ahead), and
    resolves when a report drops below."""
    agent_uuid = str(uuid.uuid4())
    async with receiver() as hook, running_server(alert_settings(database_url)) as server:
        await server.su("alert_channel_create", "hook", hook.url())
        rule = {
            "name": "hot",
            "kind": "metric",
            "targets": [agent_uuid],
            "params": {"field": "cpu_usage", "above": 90, "for_ms": 300_000},
            "channels": ["hook"],
        }
        await server.su("alert_rule_create", rule)
        token = await add_token(server, agent_token_limits(agent_uuid))
        async with ScriptedAgent(server.ws_url, token, agent_uuid) as agent:
            summary = summarize(Monitor(agent_uuid).dynamic())
            hot = {**summary, "cpu_usage": 955}
            assert (await agent.call("agent_report_dynamic_summary", token, hot))["status"]
            await asyncio.sleep(scaled(1))
            assert await events(server) == [] and hook.calls == []
            server.clock.advance(301)
            await wait_for(lambda: _count(hook, 1), 5)
            [event] = await events(server, "is_firing")
            assert "cpu_usage above 90" in event["message"] and "95.5" in event["message"]
            cool = {**summary, "time": summary["time"] + 1000, "cpu_usage": 120}
            await agent.call("agent_report_dynamic_summary", token, cool)
            await wait_for(lambda: _count(hook, 2), 5)
        [event] = await events(server)
        assert event["state"] == "resolved"
        assert event["resolved_at"] - event["started_at"] >= 300_000


async def test_probe_latency_fires_on_slow_results_and_resolves(database_url: str) -> None:
    """Two tcp_ping results above above_ms in a row fire; a fast one resolves."""
    async with receiver() as hook, running_server(alert_settings(database_url)) as server:
        await server.su("alert_channel_create", "hook", hook.url())
        rule = {
            "name": "slow",
            "kind": "probe_latency",
            "targets": "all",
            "params": {"cron": "latency", "above_ms": 100, "consecutive": 2},
            "channels": ["hook"],
        }
        await server.su("alert_rule_create", rule)
        async with ScriptedAgent(server.ws_url, server.super_token) as agent:
            cron = {"agent": [[agent.uuid], {"task": {"tcp_ping": "127.0.0.1:1"}}]}
            await server.su("crontab_create", "latency", "* * * * * *", cron)
            for latency in (250.0, 30.0, 180.0, 300.0):
                await agent.upload(await agent.next_task(), {"tcp_ping": latency})
            await wait_for(lambda: _count(hook, 1), 5)
            [event] = await events(server, "is_firing")
            assert "300 ms > 100 ms" in event["message"] and "2 time(s)" in event["message"]
            await agent.upload(await agent.next_task(), {"tcp_ping": 2.0})
            await wait_for(lambda: _count(hook, 2), 5)
            await server.su("crontab_delete", "latency")
        assert [e["state"] for e in await events(server)] == ["resolved"]


async def test_reminders_while_firing(database_url: str) -> None:
    """A rule with remind_ms reminds once per period while its event fires."""
    async with receiver() as hook, running_server(alert_settings(database_url)) as server:
        await server.su("alert_channel_create", "hook", hook.url())
        rule = {**offline_rule("down", "all", ["hook"], 1000), "remind_ms": 600_000}
        await server.su("alert_rule_create", rule)
        async with ScriptedAgent(server.ws_url, server.super_token):
            pass
        await wait_for(lambda: _count(hook, 1), 5)
        server.clock.advance(601)
        await wait_for(lambda: _count(hook, 2), 5)
        assert "still firing" in hook.calls[1].body["title"]
        await asyncio.sleep(scaled(1))
        assert len(hook.calls) == 2


# --------------------------------------------------------------------------- exactly once


async def test_a_restart_while_firing_sends_no_duplicate_and_still_resolves(
    database_url: str,
) -> None:
    """The server stops while an event fires: the new run neither starts it again nor
    forgets it, and sends its resolution once the agent returns."""
    settings = alert_settings(database_url)
    agent_uuid = str(uuid.uuid4())
    async with receiver() as hook:
        async with running_server(settings) as server:
            token = server.super_token
            await server.su("alert_channel_create", "hook", hook.url())
            await server.su("alert_rule_create", offline_rule("down", "all", ["hook"], 1000))
            async with ScriptedAgent(server.ws_url, token, agent_uuid):
                await asyncio.sleep(0.3)
            await wait_for(lambda: _count(hook, 1), 5)
        async with running_server(settings, super_token=token) as server:
            await asyncio.sleep(scaled(2.5))
            assert len(hook.calls) == 1
            async with ScriptedAgent(server.ws_url, token, agent_uuid):
                await wait_for(lambda: _count(hook, 2), 5)
                await asyncio.sleep(scaled(1))
        assert len(hook.calls) == 2 and "resolved" in hook.calls[1].body["title"]


# --------------------------------------------------------------------------- methods


async def test_rules_are_checked_and_errors_name_the_field(server: Server) -> None:
    """Bad rules are -32602 naming the field; unknown names 105; missing channels 108."""
    good = offline_rule("down", "all", [])
    cases = [
        ({**good, "kind": "nope"}, "rule.kind"),
        ({**good, "params": {"grace_ms": "soon"}}, "rule.params.grace_ms"),
        ({**good, "params": {"grace_ms": 10}}, "rule.params.grace_ms"),
        ({**good, "params": {}}, "rule.params.grace_ms"),
        ({**good, "targets": ["not-a-uuid"]}, "rule.targets.0"),
        ({**good, "targets": "some"}, "rule.targets"),
        ({**good, "remind_ms": -1}, "rule.remind_ms"),
        ({**good, "name": ""}, "rule.name"),
        ({**good, "extra": 1}, "rule"),
        (
            {**good, "kind": "metric", "params": {"field": "cpu", "above": 1, "for_ms": 0}},
            "rule.params.field",
        ),
        (
            {**good, "kind": "metric", "params": {"field": "cpu_usage", "for_ms": 0}},
            "above, below",
        ),
        ({**good, "kind": "probe_failed", "params": {"consecutive": 3}}, "rule.params.cron"),
        (
            {**good, "kind": "probe_latency", "params": {"cron": "c", "consecutive": 1}},
            "rule.params.above_ms",
        ),
    ]
    for rule, field_name in cases:
        with pytest.raises(RpcError) as error:
            await server.su("alert_rule_create", rule)
        assert error.value.code == -32602 and field_name in error.value.message, (rule, error)
    with pytest.raises(RpcError) as error:
        await server.su("alert_channel_create", "x", "nonsense://what")
    assert error.value.code == -32602 and "url" in error.value.message
    with pytest.raises(RpcError) as error:
        await server.su("alert_rule_create", {**good, "channels": ["missing"]})
    assert error.value.code == 108 and "missing" in error.value.message
    for method, params in (
        ("alert_rule_delete", ["nope"]),
        ("alert_rule_edit", ["nope", good]),
        ("alert_channel_delete", ["nope"]),
        ("alert_channel_test", ["nope"]),
        ("alert_channel_edit", ["nope", "json://127.0.0.1:1/x"]),
    ):
        with pytest.raises(RpcError) as error:
            await server.su(method, *params)
        assert error.value.code == 105, method
    with pytest.raises(RpcError) as error:
        await server.su("alert_event_query", {"condition": [{"bogus": 1}]})
    assert error.value.code == -32602 and "query.condition.0" in error.value.message


async def test_channel_and_rule_lifecycle(server: Server) -> None:
    """Create, list, edit and delete channels and rules in PROTOCOL §13 shapes."""
    created = await server.su("alert_channel_create", "ops", "json://127.0.0.1:1/a")
    assert set(created) == {"id"}
    with pytest.raises(RpcError) as error:
        await server.su("alert_channel_create", "ops", "json://127.0.0.1:1/b")
    assert error.value.code == 108
    assert await server.su("alert_channel_edit", "ops", "json://127.0.0.1:2/b") == {"success": True}
    [channel] = await server.su("alert_channel_list")
    assert channel == {
        "id": created["id"],
        "name": "ops",
        "scheme": "json",
        "url_redacted": channel["url_redacted"],
    }
    assert ":2/b" in channel["url_redacted"]
    agent = str(uuid.uuid4())
    rule = {**offline_rule("down", [agent.upper()], ["ops"]), "remind_ms": 60_000}
    rule_id = (await server.su("alert_rule_create", rule))["id"]
    [listed] = await server.su("alert_rule_list")
    assert listed == {**rule, "id": rule_id, "targets": [agent], "enable": True}
    with pytest.raises(RpcError) as error:
        await server.su("alert_channel_delete", "ops")
    assert error.value.code == 108 and "down" in error.value.message
    edited = {**rule, "name": "gone", "enable": False, "channels": []}
    assert await server.su("alert_rule_edit", "down", edited) == {"success": True}
    assert [r["name"] for r in await server.su("alert_rule_list")] == ["gone"]
    assert await server.su("alert_rule_delete", "gone") == {"success": True}
    assert await server.su("alert_channel_delete", "ops") == {"success": True}
    assert await server.su("alert_channel_list") == []


async def test_alert_permissions(server: Server) -> None:
    """{"alert": "read"} lists and queries; only {"alert": "write"} changes anything."""
    reader = await add_token(server, [{"scopes": ["global"], "permissions": [{"alert": "read"}]}])
    writer = await add_token(server, [{"scopes": ["global"], "permissions": [{"alert": "write"}]}])
    assert await server.call("alert_channel_list", reader) == []
    assert await server.call("alert_event_query", reader, {"condition": []}) == []
    for method, params in (
        ("alert_channel_create", ["x", "json://127.0.0.1:1/x"]),
        ("alert_rule_create", [offline_rule("r", "all", [])]),
    ):
        with pytest.raises(RpcError) as error:
            await server.call(method, reader, *params)
        assert error.value.code == 102 and "alert.write" in error.value.message
        await server.call(method, writer, *params)
    with pytest.raises(RpcError) as error:
        await server.call("alert_rule_list", writer)
    assert error.value.code == 102 and "alert.read" in error.value.message


async def _cli(server: Server, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "taskd", "alert", *args),
        *("--url", server.url, "--token", server.super_token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), scaled(60))
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_alert_commands(server: Server) -> None:
    """`taskd alert channel|rule|events` print tables, or JSON with --json, and never a
    channel's secret."""
    async with receiver() as hook:
        url = hook.url(auth="bob:CliSecretPw@")
        code, out, err = await _cli(server, "channel", "add", "hook", url)
        assert code == 0 and "created alert channel hook" in out, err
        code, out, _ = await _cli(server, "channel", "list")
        assert code == 0 and "hook" in out and "json" in out and "CliSecretPw" not in out
        code, out, _ = await _cli(server, "channel", "list", "--json")
        assert orjson.loads(out)[0]["name"] == "hook" and "CliSecretPw" not in out
        code, out, err = await _cli(server, "channel", "test", "hook")
        assert code == 0, err
        assert hook.delivered and "test" in hook.delivered[0].body["title"]
        code, out, err = await _cli(
            server, "rule", "add", "down", "agent_offline", "--grace-ms", "1000",
            "--channels", "hook",
        )  # fmt: skip
        assert code == 0, err
        code, out, _ = await _cli(server, "rule", "list")
        assert "down" in out and "grace_ms=1000" in out
        async with ScriptedAgent(server.ws_url, server.super_token) as agent:
            pass
        await wait_for(lambda: _firing(server, 1), 5)
        code, out, _ = await _cli(server, "events")
        assert code == 0 and "firing" in out and agent.uuid in out
        code, out, _ = await _cli(server, "events", "--json", "--firing")
        assert orjson.loads(out)[0]["uuid"] == agent.uuid
        code, out, err = await _cli(server, "rule", "add", "bad", "metric", "--field", "x")
        assert code == 2 and "--above" in err
        code, _, _ = await _cli(server, "rule", "delete", "down")
        assert code == 0
        code, out, _ = await _cli(server, "channel", "delete", "hook")
        assert code == 0 and "deleted" in out
