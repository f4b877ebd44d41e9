"""Abuse: R4 (adversarial input) and R5 (unauthorized access), against a live ``taskd serve``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import signal
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from benchmarks.faults_common import Outcome, RssSampler, ms, scenario, scenario_database
from benchmarks.faults_inputs import (
    MAX_MESSAGE,
    Attack,
    Schemas,
    batches,
    deep_nesting,
    encode,
    huge_values,
    hypothesis_requests,
    judge_reply,
    method_bases,
    oversize,
    random_bytes,
    raw_samples,
    request,
    truncated,
    wrong_typed_calls,
)
from benchmarks.procs import PYTHON, Child, Children
from benchmarks.scale import Scale
from benchmarks.services import (
    TaskdServer,
    agent_limits,
    now_ms,
    start_load_agents,
)
from benchmarks.stats import percentile

REPLY_TIMEOUT_S = 60.0
READER_REQUESTS = 10_000
"""rpc.discover requests per never-reading client: 700 MiB of replies if nothing bounds them."""
RSS_LIMIT_MB = 1024.0
PROBE_P99_TARGET_MS = 500.0
HTTP_WORKERS = 8
WS_WORKERS = 4
EXAMPLES = 5
ATTACKER: list[dict[str, Any]] = [
    *({"task": {action: "*"}} for action in ("create", "read", "write")),
    {"task": "listen"},
    *({"crontab": action} for action in ("read", "write", "delete")),
    *({"crontab_result": {action: "*"}} for action in ("read", "delete")),
    {"terminal": "connect"},
    *({"agent": action} for action in ("list", "enroll")),
    *({"token": action} for action in ("read", "write", "delete")),
]
"""The limits of the R4 attacker's token."""


@dataclass
class Tally:
    """What the server answered to one family of inputs."""

    sent: int = 0
    malformed: int = 0
    hangs: int = 0
    accepted: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Inputs answered 103 or -32603 (a server-side failure, not a refusal)."""

    def problem(self, text: str) -> None:
        """Note a malformed reply."""
        self.malformed += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(text[:300])

    def responses(self, responses: list[dict[str, Any]], body: bytes) -> None:
        """Count error codes and results; keep what drew a server-side failure."""
        for response in responses:
            if "error" not in response:
                self.accepted += 1
                continue
            code = int(response["error"]["code"])
            self.codes[code] += 1
            if code in (103, -32603) and len(self.failures) < EXAMPLES:
                self.failures.append(f"{response['error']} <- {body[:300]!r}")


class Attacker:
    """Sends inputs over HTTP and WebSocket and judges every reply."""

    def __init__(self, server: TaskdServer) -> None:
        self.server = server
        self.tallies: dict[str, Tally] = {}
        self.accepted_examples: list[str] = []

    def tally(self, family: str) -> Tally:
        """The tally of one family."""
        return self.tallies.setdefault(family, Tally())

    async def run(self, attacks: list[Attack]) -> None:
        """Send every attack: WebSocket-capable ones spread over both transports."""
        http_only = [a for a in attacks if not a.websocket]
        shared = [a for a in attacks if a.websocket]
        http_only.reverse()
        shared.reverse()
        workers = [self._http_worker(http_only, shared) for _ in range(HTTP_WORKERS)]
        workers += [self._ws_worker(shared) for _ in range(WS_WORKERS)]
        await asyncio.gather(*workers)

    async def _http_worker(self, http_only: list[Attack], shared: list[Attack]) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=self.server.url, timeout=REPLY_TIMEOUT_S, limits=limits
        ) as http:
            while http_only or shared:
                attack = http_only.pop() if http_only else shared.pop()
                await self.http(http, attack)

    async def http(self, http: httpx.AsyncClient, attack: Attack) -> None:
        """POST one body and judge the answer."""
        tally = self.tally(attack.family)
        tally.sent += 1
        try:
            response = await http.post(
                "/", content=attack.body, headers={"content-type": "application/json"}
            )
        except httpx.TimeoutException:
            tally.hangs += 1
            return
        except httpx.HTTPError as exc:
            tally.problem(f"HTTP failure {type(exc).__name__}: {exc}")
            return
        tally.statuses[str(response.status_code)] += 1
        if response.status_code == 413 and len(attack.body) > MAX_MESSAGE:
            problem, responses = judge_reply(attack.body, response.content)
        elif response.status_code == 204:
            problem, responses = judge_reply(attack.body, None)
        elif response.status_code == 200:
            problem, responses = judge_reply(attack.body, response.content)
        else:
            problem, responses = f"HTTP {response.status_code}: {response.text[:200]}", []
        if problem is not None:
            tally.problem(f"{problem} <- {attack.body[:150]!r}")
        tally.responses(responses, attack.body)
        self._note_accepted(attack, responses)

    def _note_accepted(self, attack: Attack, responses: list[dict[str, Any]]) -> None:
        if (
            attack.family == "wrong-typed fields"
            and any("result" in r for r in responses)
            and len(self.accepted_examples) < 20
        ):
            self.accepted_examples.append(attack.body[:300].decode(errors="replace"))

    async def _ws_worker(self, shared: list[Attack]) -> None:
        ws = None
        try:
            while shared:
                attack = shared.pop()
                if ws is None:
                    ws = await websockets.connect(
                        self.server.ws_url, max_size=None, ping_interval=None, proxy=None
                    )
                if not await self.websocket(ws, attack):
                    with contextlib.suppress(Exception):
                        await ws.close()
                    ws = None
        finally:
            if ws is not None:
                await ws.close()

    async def websocket(self, ws: Any, attack: Attack) -> bool:
        """Send one message and judge the answer; False if the connection ended."""
        tally = self.tally(attack.family)
        tally.sent += 1
        try:
            text = attack.body.decode()
        except UnicodeDecodeError:
            message: str | bytes = attack.body
        else:
            message = text
        expects = judge_reply(attack.body, None)[0] is not None
        try:
            await ws.send(message)
            if not expects:
                sentinel = f"sentinel-{uuid.uuid4().hex}"
                await ws.send(encode(request("server_hello", [], sentinel)).decode())
            reply = await self._next_reply(ws)
        except TimeoutError:
            tally.hangs += 1
            return False
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            tally.statuses[f"closed {code}"] += 1
            if not (code == 1009 and len(attack.body) > 2 * MAX_MESSAGE):
                tally.problem(f"connection closed ({code}) <- {attack.body[:150]!r}")
            return False
        tally.statuses["ws"] += 1
        if not expects:
            parsed = orjson.loads(reply)
            if not (isinstance(parsed, dict) and str(parsed.get("id", "")).startswith("sentinel")):
                tally.problem(f"a reply to a notification: {reply[:200]!r}")
                await self._next_reply(ws)
            return True
        problem, responses = judge_reply(attack.body, reply)
        if problem is not None:
            tally.problem(f"{problem} <- {attack.body[:150]!r}")
        tally.responses(responses, attack.body)
        self._note_accepted(attack, responses)
        return True

    async def _next_reply(self, ws: Any) -> bytes:
        """The next message that is not a task push (the attack subscribes now and then)."""
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while True:
                message = await ws.recv()
                raw = message.encode() if isinstance(message, str) else message
                if b'"method":"task_register_task"' not in raw[:200]:
                    return bytes(raw)


# --------------------------------------------------------------------------- slow clients


def _frame_header(length: int) -> bytes:
    """A masked text frame header announcing ``length`` payload bytes."""
    return bytes([0x81, 0x80 | 127]) + struct.pack(">Q", length) + os.urandom(4)


async def _slow_client(port: int, mode: int, stop: asyncio.Event, closed: list[float]) -> None:
    """One slow-loris socket: trickles a byte a second and never finishes."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(0.0)
        return
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    try:
        if mode == 0:  # the upgrade request, a byte at a time
            trickle = upgrade
        elif mode == 1:  # a WebSocket frame announcing 1 MiB, a byte at a time
            writer.write(upgrade)
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            trickle = _frame_header(1 << 20) + b"x" * (1 << 20)
        else:  # an HTTP body announced and never sent
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{")
            await writer.drain()
            trickle = b" " * 1_000_000
        for byte in trickle:
            if stop.is_set():
                return
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    if not await reader.read(1):
                        closed.append(time.monotonic() - started)
                        return
    except (OSError, asyncio.IncompleteReadError):
        closed.append(time.monotonic() - started)
    finally:
        writer.transport.abort()


async def _slow_reader(url: str, requests: int, outcome: dict[str, Any]) -> None:
    """A WebSocket client that sends requests for big replies and never reads them."""
    body = encode(request("rpc.discover", [], 1)).decode()
    ws = await websockets.connect(url, max_size=None, ping_interval=None, proxy=None)
    ws.transport.pause_reading()
    sent = 0
    try:
        for _ in range(requests):
            await ws.send(body)
            sent += 1
    except websockets.ConnectionClosed:
        pass
    finally:
        outcome["sent"] = outcome.get("sent", 0) + sent
        outcome.setdefault("readers", []).append(sent)
        ws.transport.abort()


# --------------------------------------------------------------------------- R4


def build_attacks(
    scale: Scale, token: str, offline: str, victim_key: str, throwaway: str
) -> list[Attack]:
    """Every input of a run, in a shuffled (seeded) order."""
    rng = random.Random(20_260_101)
    schemas = Schemas()
    bases = method_bases(token, offline, victim_key, str(uuid.uuid4()), throwaway)
    fixed = [
        *deep_nesting(token, offline),
        *huge_values(token, offline),
        *batches(token, "fxNoSuchKey00000:" + "s" * 32, rng),
        *oversize(),
    ]
    budget = max(scale.r4_inputs - len(fixed), 0)
    typed: list[Attack] = []
    passes = 0
    while len(typed) < budget * 0.55 and passes < 20:
        passes += 1
        for _, call in wrong_typed_calls(schemas, bases, rng):
            typed.append(Attack("wrong-typed fields", encode(call)))
    rng.shuffle(typed)
    typed = typed[: int(budget * 0.55)]
    drawn = [
        Attack("hypothesis JSON", encode(r))
        for r in hypothesis_requests(schemas, bases, int(budget * 0.15))
    ]
    noise = list(random_bytes(rng, int(budget * 0.15)))
    samples = raw_samples(token, offline)
    cut = list(truncated(rng, samples, budget - len(typed) - len(drawn) - len(noise)))
    attacks = [*typed, *drawn, *noise, *cut]
    rng.shuffle(attacks)
    # the heavy ones go first, while the rest is still flowing around them
    return fixed + attacks + [Attack("oversize", b"[" + b"0," * MAX_MESSAGE + b"0]")]


async def _poisoned_uploads(server: TaskdServer, tally: Tally) -> dict[str, Any]:
    """Uploads of adversarial results for real tasks, each beside an innocent upload.

    Both go in one batch, so they reach the store together: a bad result must be
    refused on its own, never take the other agent's result down with it.
    """
    agent_uuid = str(uuid.uuid4())
    deep: Any = "leaf"
    for _ in range(300):
        deep = {"k": deep}
    results: list[Any] = [
        {"version": deep},
        {"version": {"n": 2**64}},
        {"version": {"n": -(2**63) - 1}},
        {"version": {"n": 1e308, "m": -1e308}},
        {"version": {"": None, "\u0000": "\u0000"}},
        {"version": {"big": "y" * 3_000_000}},
        {"ping": 1.0},
        {"execute": 5},
        "version",
    ]
    bystanders_failed = 0
    async with (
        websockets.connect(server.ws_url, max_size=None, ping_interval=None, proxy=None) as ws,
        server.rpc() as rpc,
    ):
        await ws.send(encode(request("task_register_task", [server.token, agent_uuid])).decode())
        await ws.recv()
        for index, result in enumerate(results):
            tasks = []
            for _ in range(2):
                await rpc.su("task_create_task", agent_uuid, "version")
                push = orjson.loads(await ws.recv())
                tasks.append(push["params"]["result"])
            uploads = []
            for task, event_result in zip(tasks, (result, {"version": {"ok": True}}), strict=True):
                response = {
                    "task_id": task["task_id"],
                    "agent_uuid": agent_uuid,
                    "task_token": task["task_token"],
                    "timestamp": time.time_ns() // 1_000_000,
                    "success": True,
                    "task_event_result": event_result,
                }
                uploads.append(request("task_upload_task_result", [server.token, response], index))
            body = encode(uploads)
            tally.sent += 1
            await ws.send(body.decode())
            reply = await ws.recv()
            raw = reply.encode() if isinstance(reply, str) else reply
            problem, responses = judge_reply(body, raw)
            if problem is not None:
                tally.problem(f"{problem} <- {body[:150]!r}")
            tally.responses(responses[:1], body)
            innocent = responses[1] if len(responses) > 1 else {}
            if "result" not in innocent:
                bystanders_failed += 1
                tally.problem(f"an innocent upload beside {str(result)[:60]} got {innocent}")
    return {"poisoned_uploads": len(results), "innocent_uploads_failed": bystanders_failed}


async def r4_adversarial_input(scale: Scale, workdir: Path, database: str = "sqlite") -> Outcome:
    """R4: malformed and adversarial input never crashes, hangs or bloats the server."""
    outcome = Outcome(
        "R4" if database == "sqlite" else "R4-pg",
        f"Malformed and adversarial input ({database})",
        scale.enforce_targets,
        load=f"≥ {scale.r4_inputs:,} inputs over HTTP and WebSocket ({HTTP_WORKERS} + "
        f"{WS_WORKERS} clients); {scale.r4_slow_clients:,} slow-loris sockets; "
        f"{scale.r4_slow_readers} clients that never read; a normal client (own process) "
        "doing blocking round trips and queries throughout",
        faults="random bytes, truncated JSON, nesting to 100,000 levels, 9 MB strings, "
        "400-digit numbers, 10,000-item batches, every param field of every method with "
        "wrong-typed values (from schemas/), hypothesis-drawn JSON, bodies and frames over "
        "the limits, adversarial results for real tasks, slow loris, never-reading clients",
    )
    async with scenario(outcome, workdir) as children, contextlib.AsyncExitStack() as stack:
        server = TaskdServer(
            children,
            workdir / "server",
            database_url=await scenario_database(stack, database),
            # the failed-auth limit would refuse most inputs before they reach the parsers
            env={"TASKD_AUTH_BURST": "1000000000", "TASKD_AUTH_RATE_PER_S": "1000000"},
        )
        await server.launch()
        pid = server.pid
        async with server.rpc() as rpc:
            victim = await rpc.su(
                "token_create",
                {"token_limit": [], "username": "victim", "password": "victim password"},
            )
            throwaway = await rpc.su(
                "token_create",
                {"token_limit": [{"scopes": ["global"], "permissions": [{"token": "write"}]}]},
            )
            # every right but deleting tasks: a super token could delete the normal
            # client's task under it, which is the caller's right, not a server fault
            attacker = await rpc.su(
                "token_create", {"token_limit": [{"scopes": ["global"], "permissions": ATTACKER}]}
            )
            prober = await rpc.su(
                "token_create",
                {
                    "token_limit": [
                        {
                            "scopes": ["global"],
                            "permissions": [{"task": {"create": "*"}}, {"task": {"read": "*"}}],
                        }
                    ]
                },
            )
        probe_token = f"{prober['key']}:{prober['secret']}"
        probe_agent, probe = await asyncio.to_thread(
            _start_probe, children, server, workdir, probe_token
        )
        attacks = await asyncio.to_thread(
            build_attacks,
            scale,
            f"{attacker['key']}:{attacker['secret']}",
            str(uuid.uuid4()),
            victim["key"],
            f"{throwaway['key']}:{throwaway['secret']}",
        )
        attacker = Attacker(server)
        stop = asyncio.Event()
        slow_closed: list[float] = []
        readers: dict[str, Any] = {}
        baseline = server.rss_mb()
        started = time.monotonic()
        with RssSampler(pid) as rss:
            slow = [
                asyncio.create_task(_slow_client(server.port, i % 3, stop, slow_closed))
                for i in range(scale.r4_slow_clients)
            ]
            reading = [
                asyncio.create_task(_slow_reader(server.ws_url, READER_REQUESTS, readers))
                for _ in range(scale.r4_slow_readers)
            ]
            poison = await _poisoned_uploads(server, attacker.tally("adversarial results"))
            await attacker.run(attacks)
            await asyncio.gather(*reading, return_exceptions=True)
            attack_s = time.monotonic() - started
            stop.set()
            await asyncio.gather(*slow, return_exceptions=True)
            await asyncio.sleep(0.5)
        calls = await asyncio.to_thread(_stop_probe, children, probe, workdir)
        children.stop(probe_agent)
        alive = server.alive() and server.pid == pid
        _r4_checks(outcome, scale, attacker, calls, rss, baseline, alive, server, poison)
        outcome.figures.update(
            {
                "attack_s": round(attack_s, 1),
                "slow_loris_sockets": scale.r4_slow_clients,
                "slow_loris_closed_by_server": len([c for c in slow_closed if c > 0]),
                "never_reading_clients": readers.get("readers", []),
                **poison,
            }
        )
        server.stop()
    return outcome


def _start_probe(
    children: Children, server: TaskdServer, workdir: Path, token: str
) -> tuple[Child, Child]:
    (agent,) = start_load_agents(
        children, server.ws_url, server.token, 1, workdir, name="probe-loadagent"
    )
    probe = children.start(
        "probe",
        [
            PYTHON,
            "-m",
            "benchmarks.faults_probe",
            "--url",
            server.url,
            "--token",
            token,
            "--agent",
            agent.uuids()[0],
            "--out",
            str(workdir / "probe.json"),
            "--local-address",
            "127.0.0.2",
        ],
        pipe_stdout=True,
    )
    probe.wait_line("ready", timeout=60)
    return agent.child, probe


def _stop_probe(children: Children, probe: Child, workdir: Path) -> list[dict[str, Any]]:
    os.kill(probe.pid, signal.SIGTERM)
    probe.popen.wait(timeout=60)
    if probe.popen.stdout is not None:
        probe.popen.stdout.close()
    children.forget(probe)
    calls: list[dict[str, Any]] = orjson.loads((workdir / "probe.json").read_bytes())["calls"]
    return calls


def _r4_checks(
    outcome: Outcome,
    scale: Scale,
    attacker: Attacker,
    calls: list[dict[str, Any]],
    rss: RssSampler,
    baseline: float | None,
    alive: bool,
    server: TaskdServer,
    poison: dict[str, Any],
) -> None:
    tallies = attacker.tallies
    sent = sum(t.sent for t in tallies.values())
    malformed = sum(t.malformed for t in tallies.values())
    hangs = sum(t.hangs for t in tallies.values())
    codes: Counter[int] = Counter()
    for tally in tallies.values():
        codes.update(tally.codes)
    outcome.check(
        f"at least {scale.r4_inputs:,} inputs were sent", sent >= scale.r4_inputs, f"{sent} sent"
    )
    outcome.check(
        "the server never crashed (same process alive throughout)", alive, server.log_tail()
    )
    outcome.check(
        "the server never hung: every input was answered",
        hangs == 0,
        f"{hangs} inputs got no answer within {REPLY_TIMEOUT_S:g} s",
    )
    examples = [e for t in tallies.values() for e in t.examples]
    outcome.check(
        "every reply is well-formed JSON-RPC with the request's ids",
        malformed == 0,
        f"{malformed} malformed: {examples[:EXAMPLES]}",
    )
    failures = [f for t in tallies.values() for f in t.failures]
    outcome.check(
        "no input was answered as an internal error (-32603)",
        codes[-32603] == 0,
        f"{codes[-32603]} internal errors: {failures[:EXAMPLES]}",
    )
    outcome.check(
        "no input was blamed on the healthy database (103)",
        codes[103] == 0,
        f"{codes[103]} database errors: {failures[:EXAMPLES]}",
    )
    outcome.check(
        "a bad result never takes another agent's upload down with it",
        poison["innocent_uploads_failed"] == 0,
        f"{poison['innocent_uploads_failed']} innocent uploads failed",
    )
    peak = rss.peak
    outcome.check(
        f"memory stayed bounded (peak RSS ≤ {RSS_LIMIT_MB:g} MiB)",
        peak is not None and peak <= RSS_LIMIT_MB,
        f"peak {peak} MiB (baseline {baseline} MiB)",
    )
    failed = [c for c in calls if c["outcome"] != "ok"]
    latencies = [c["latency"] for c in calls]
    p99 = ms(percentile(latencies, 99))
    outcome.check(
        "the normal client was served throughout (every call answered)",
        bool(calls) and not failed,
        f"{len(failed)} of {len(calls)} failed: {Counter(c['outcome'] for c in failed)}",
    )
    outcome.check(
        f"the normal client's p99 ≤ {PROBE_P99_TARGET_MS:g} ms during the attack",
        p99 is not None and p99 <= PROBE_P99_TARGET_MS,
        f"p99 {p99} ms, max {ms(max(latencies, default=0.0))} ms over {len(calls)} calls",
        target=True,
    )
    outcome.figures.update(
        {
            "inputs": sent,
            "malformed_replies": malformed,
            "unanswered": hangs,
            "error_codes": {str(k): v for k, v in sorted(codes.items())},
            "families": {
                name: {
                    "sent": t.sent,
                    "malformed": t.malformed,
                    "unanswered": t.hangs,
                    "results": t.accepted,
                    "statuses": dict(t.statuses),
                }
                for name, t in sorted(tallies.items())
            },
            "wrong_typed_accepted_examples": attacker.accepted_examples[:10],
            "baseline_rss_mb": baseline,
            "peak_rss_mb": peak,
            "final_rss_mb": rss.samples[-1] if rss.samples else None,
            "probe_calls": len(calls),
            "probe_p50_ms": ms(percentile(latencies, 50)),
            "probe_p99_ms": p99,
            "probe_max_ms": ms(max(latencies, default=0.0)),
        }
    )


# --------------------------------------------------------------------------- R5


@dataclass
class Attempts:
    """Unauthorized attempts of one kind and how they ended."""

    made: int = 0
    succeeded: list[str] = field(default_factory=list)
    odd: list[str] = field(default_factory=list)
    """Refused, but not the way they should be (a wrong code)."""

    def refused(self, where: str, reply: dict[str, Any], code: int | tuple[int, ...]) -> None:
        """Count one JSON-RPC attempt that must be refused with ``code``."""
        self.made += 1
        codes = code if isinstance(code, tuple) else (code,)
        if "error" not in reply:
            self.succeeded.append(f"{where}: {str(reply)[:200]}")
        elif reply["error"].get("code") not in codes:
            self.odd.append(f"{where}: {reply['error']}")


async def r5_unauthorized(scale: Scale, workdir: Path) -> Outcome:
    """R5: the security matrix against a live server, forged uploads and terminals: 0 in."""
    from tests.helpers import ScriptedAgent, WsClient
    from tests.test_security import EVERYTHING, NEVER_SOON, POSITIVE_ERRORS, TABLE, World

    outcome = Outcome(
        "R5",
        "Unauthorized access against a live server",
        scale.enforce_targets,
        load=f"the security matrix ({len(TABLE)} methods, 11 credential cases, both "
        "transports), forged and replayed uploads, /terminal connections on both sides",
        faults="no / empty / malformed / unknown / wrong-secret / wrong-password / expired / "
        "not-yet-valid / other-agent / narrow-pattern tokens, other agents' uploads, guessed "
        "task ids and task tokens, mismatched variants, replays, terminals without permission",
    )
    async with scenario(outcome, workdir) as children:
        server = TaskdServer(
            children,
            workdir / "server",
            env={"TASKD_AUTH_BURST": "1000000000", "TASKD_AUTH_RATE_PER_S": "1000000"},
        )
        await server.launch()
        rpc = server.rpc()
        async with rpc:
            agent_uuid, other_uuid, elsewhere = (str(uuid.uuid4()) for _ in range(3))
            every = [{"scopes": ["global"], "permissions": EVERYTHING}]

            async def token(limits: list[Any], **fields: Any) -> str:
                creation = {"token_limit": limits, **fields}
                created = await rpc.call("token_create", server.token, creation)
                return f"{created['key']}:{created['secret']}"

            agent_token = await token(agent_limits(agent_uuid))
            other_token = await token(agent_limits(other_uuid))
            tokens = {
                "expired": await token(every, timestamp_to=now_ms() - 60_000),
                "not yet valid": await token(every, timestamp_from=now_ms() + 3_600_000),
                "scoped to another agent": await token(
                    [{"scopes": [{"agent_uuid": elsewhere}], "permissions": EVERYTHING}]
                ),
                "type patterns miss the task": await token(
                    [
                        {
                            "scopes": ["global"],
                            "permissions": [
                                {"task": {action: "tcp*"}}
                                for action in ("create", "read", "write", "delete")
                            ],
                        }
                    ]
                ),
            }
            victim = await rpc.call(
                "token_create",
                server.token,
                {"token_limit": [], "username": "victim", "password": "the right password"},
            )
            cases: list[tuple[str, Any]] = [
                ("no token", None),
                ("empty token", ""),
                ("not a string", 12345),
                ("malformed token", "no-separator-here"),
                ("unknown key", "AAAAAAAAAAAAAAAA:" + "b" * 32),
                ("wrong secret", f"{victim['key']}:{'x' * 32}"),
                ("wrong password", "victim|the wrong password"),
                *tokens.items(),
            ]
            async with (
                ScriptedAgent(server.ws_url, agent_token, agent_uuid) as agent,
                ScriptedAgent(server.ws_url, other_token, other_uuid) as other,
                WsClient(server.ws_url) as ws,
            ):
                nightly = {"agent": [[agent_uuid], {"task": "version"}]}
                await rpc.su("crontab_create", "nightly", NEVER_SOON, nightly)
                await rpc.su("task_create_task", agent_uuid, "version")
                fresh = str(uuid.uuid4())
                world = World(agent_uuid, await agent.next_task(), victim["key"], fresh)
                before = await _snapshot(server)
                matrix = await _matrix(TABLE, cases, world, ws, rpc)
                await asyncio.sleep(0.3)
                pushed = agent.notifications.qsize()
                unchanged = await _snapshot(server) == before
                uploads = await _forged_uploads(rpc, agent, other, agent_token, tokens)
                terminals = await _forged_terminals(server, rpc, agent, tokens, agent_token)
                controls = await _positive_controls(TABLE, POSITIVE_ERRORS, world, ws, server)
        sections = {"matrix": matrix, "uploads": uploads, "terminal": terminals}
        successes = [s for a in sections.values() for s in a.succeeded]
        outcome.check(
            "0 unauthorized successes",
            not successes,
            f"{len(successes)}: {successes[:5]}",
        )
        outcome.check(
            "refusals carry the right code (102 credentials, 105 no such task, 108 replay)",
            not any(a.odd for a in sections.values()),
            "; ".join(o for a in sections.values() for o in a.odd[:3]),
        )
        outcome.check("refused calls changed nothing in the database", unchanged, "a table changed")
        outcome.check(
            "refused calls dispatched nothing to the agent", pushed == 0, f"{pushed} pushes"
        )
        outcome.check(
            "positive controls: the super token passes the same calls (the matrix is not vacuous)",
            not controls,
            f"failed: {controls[:5]}",
        )
        outcome.check("the server process is alive at the end", server.alive(), server.log_tail())
        outcome.figures.update(
            {
                "attempts": sum(a.made for a in sections.values()),
                "unauthorized_successes": len(successes),
                "by_section": {
                    name: {"attempts": a.made, "successes": len(a.succeeded), "odd": len(a.odd)}
                    for name, a in sections.items()
                },
            }
        )
        server.stop()
    return outcome


async def _snapshot(server: TaskdServer) -> dict[str, list[str]]:
    from taskd.store import Store
    from tests.test_security import snapshot

    url = (
        f"sqlite+aiosqlite:///{server.db_file}"
        if server.database_url is None
        else server.database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    )
    async with Store(url, pool_size=1) as store:
        return await snapshot(store)


MALFORMED_CREDENTIALS = {
    "no token": -32602,
    "not a string": -32602,
    "empty token": 101,
    "malformed token": 101,
}
"""Credential cases that are not a credential string: a params error, or NodeGet's parse error."""


async def _matrix(
    table: list[Any], cases: list[tuple[str, Any]], world: Any, ws: Any, rpc: Any
) -> Attempts:
    from taskd.rpc import REGISTRY
    from tests.test_security import SELF_SERVICE, VALID

    attempts = Attempts()
    for name, params, lists in table:
        rest = params(world)
        for case, token in cases:
            transports = [("websocket", ws.request)]
            if not REGISTRY[name].websocket_only:
                transports.append(("http", rpc.request))
            for transport, send in transports:
                reply = await send(name, [token, *rest])
                where = f"{name} over {transport} with {case}"
                if (
                    lists
                    and case == "scoped to another agent"
                    and reply.get("result")
                    in (
                        [],
                        {"uuids": []},
                    )
                ):
                    attempts.made += 1  # answered with nothing it may not see
                    continue
                if name in SELF_SERVICE and case in VALID and "result" in reply:
                    attempts.made += 1  # a valid token reading itself, as in NodeGet
                    continue
                attempts.refused(where, reply, MALFORMED_CREDENTIALS.get(case, 102))
        missing = await ws.request(name, {})
        attempts.refused(f"{name} without a token param", missing, -32602)
    return attempts


async def _forged_uploads(
    rpc: Any, agent: Any, other: Any, agent_token: str, tokens: dict[str, str]
) -> Attempts:
    attempts = Attempts()
    await rpc.su("task_create_task", agent.uuid, "version")
    mine = await agent.next_task()
    await rpc.su("task_create_task", agent.uuid, "version")
    mine_too = await agent.next_task()
    await rpc.su("task_create_task", other.uuid, "version")
    theirs = await other.next_task()
    result = {"version": {"taskd": "forged"}}
    attempts.refused(
        "upload of another agent's task as that agent",
        await agent.upload(theirs, result, agent_uuid=other.uuid),
        102,
    )
    attempts.refused(
        "upload of another agent's task as itself", await agent.upload(theirs, result), 105
    )
    attempts.refused(
        "upload with a guessed task_token",
        await agent.upload(mine, result, task_token="Guess12345"),
        105,
    )
    attempts.refused(
        "upload for a guessed task id",
        await agent.upload(mine, result, task_id=mine["task_id"] + 100_000),
        105,
    )
    attempts.refused(
        "upload of a result of the wrong variant", await agent.upload(mine, {"ping": 1.0}), 108
    )
    response = {
        "task_id": mine_too["task_id"],
        "agent_uuid": agent.uuid,
        "task_token": mine_too["task_token"],
        "timestamp": now_ms(),
        "success": True,
        "task_event_result": result,
    }
    for case, token, code in [
        ("no token", None, -32602),
        ("a malformed token", "junk", 101),
        ("an expired token", tokens["expired"], 102),
        ("a token scoped elsewhere", tokens["scoped to another agent"], 102),
        ("a token for other task types", tokens["type patterns miss the task"], 102),
    ]:
        reply = await rpc.request("task_upload_task_result", [token, response])
        attempts.refused(f"upload with {case}", reply, code)
    real = {"version": {"taskd": "real"}}
    stored = await agent.upload(mine, real)
    if "error" in stored:
        attempts.odd.append(f"the legitimate upload failed: {stored}")
    attempts.refused("a replayed upload", await agent.upload(mine, real), 108)
    attempts.refused("a replayed upload with another result", await agent.upload(mine, result), 108)
    reply = await agent.request("task_register_task", [agent_token, other.uuid])
    attempts.refused("subscribing as another agent", reply, 102)
    reply = await agent.request("task_create_task", [agent_token, agent.uuid, "version"])
    attempts.refused("an agent token creating a task", reply, 102)
    rows = await rpc.su("task_query_task", {"condition": [{"limit": 10}]})
    by_id = {r["task_id"]: r for r in rows}
    if by_id[mine["task_id"]]["task_event_result"] != real:
        attempts.succeeded.append(f"stored result changed: {by_id[mine['task_id']]}")
    for task in (mine_too, theirs):
        if by_id[task["task_id"]]["timestamp"] is not None:
            attempts.succeeded.append(f"task {task['task_id']} got a forged result")
    return attempts


async def _terminal(url: str) -> tuple[bool, str]:
    """(refused, what happened) for one /terminal connection that must be refused."""
    try:
        async with websockets.connect(url, ping_interval=None, proxy=None) as ws:
            try:
                async with asyncio.timeout(5):
                    frame = await ws.recv()
            except TimeoutError:
                return False, "connected and waited without an error"
            data = orjson.loads(frame) if isinstance(frame, str) else {}
            if not isinstance(data, dict) or "error_id" not in data:
                return False, f"received {str(frame)[:100]}"
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                async with asyncio.timeout(5):
                    await ws.recv()
                return False, f"still open after {data}"
            return True, str(data["error_id"])
    except websockets.InvalidStatus as exc:
        return True, f"HTTP {exc.response.status_code}"


async def _forged_terminals(
    server: TaskdServer, rpc: Any, agent: Any, tokens: dict[str, str], agent_token: str
) -> Attempts:
    attempts = Attempts()
    base = f"ws://127.0.0.1:{server.port}/terminal?"
    terminal_id = str(uuid.uuid4())
    shell = {"web_shell": {"url": "wss://127.0.0.1/auto_gen", "terminal_id": terminal_id}}
    await rpc.su("task_create_task", agent.uuid, shell)
    task = await agent.next_task()
    await rpc.su("task_create_task", agent.uuid, "version")
    plain = await agent.next_task()
    agent_side = (
        f"{base}agent_uuid={agent.uuid}&task_id={task['task_id']}"
        f"&task_token={task['task_token']}&terminal_id={terminal_id}"
    )
    forged_agents = {
        "a guessed task_token": agent_side.replace(task["task_token"], "Guess12345"),
        "a task that is not a web_shell": (
            f"{base}agent_uuid={agent.uuid}&task_id={plain['task_id']}"
            f"&task_token={plain['task_token']}&terminal_id={terminal_id}"
        ),
        "a task id that does not exist": agent_side.replace(
            f"task_id={task['task_id']}", f"task_id={task['task_id'] + 100_000}"
        ),
        "another agent's uuid": agent_side.replace(agent.uuid, str(uuid.uuid4())),
    }
    for case, url in forged_agents.items():
        refused, what = await _terminal(url)
        attempts.made += 1
        if not refused:
            attempts.succeeded.append(f"agent side with {case}: {what}")
    async with websockets.connect(agent_side, ping_interval=None, proxy=None) as slot:
        user = f"{base}agent_uuid={agent.uuid}&terminal_id={terminal_id}&token="
        forged_users = {
            "no token": user.rsplit("&token=", 1)[0],
            "an empty token": user,
            "a malformed token": user + "junk",
            "an unknown key": user + "AAAAAAAAAAAAAAAA:" + "b" * 32,
            "an agent token": user + agent_token,
            **{f"a token {case}": user + token for case, token in tokens.items()},
        }
        for case, url in forged_users.items():
            refused, what = await _terminal(url)
            attempts.made += 1
            if not refused:
                attempts.succeeded.append(f"user side with {case}: {what}")
        # nobody attached: the slot still waits, and a permitted user gets in
        async with websockets.connect(
            user + server.token, ping_interval=None, proxy=None
        ) as permitted:
            await slot.send(b"hello from the shell")
            async with asyncio.timeout(10):
                if await permitted.recv() != b"hello from the shell":
                    attempts.odd.append("the permitted user did not get the relay")
    return attempts


async def _positive_controls(
    table: list[Any], positive_errors: dict[str, int], world: Any, ws: Any, server: TaskdServer
) -> list[str]:
    failed = []
    for name, params, _ in table:
        reply = await ws.request(name, [server.token, *params(world)])
        if name in positive_errors:
            if reply.get("error", {}).get("code") != positive_errors[name]:
                failed.append(f"{name}: {reply}")
        elif "result" not in reply:
            failed.append(f"{name}: {reply}")
    return failed
