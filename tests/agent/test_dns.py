"""The dns task kind against a real UDP name server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks import dns as dns_task
from taskd.config import parse_agent_config
from taskd.protocol import DNS_RECORD_TYPES, Dns, parse_task_event_type

UNIT = float(os.environ.get("TASKD_TEST_TIME_FACTOR", "1"))

# One name carries every type so that one task can ask for all of them; a real
# zone could not hold a CNAME next to other data, but the resolver does not care.
ZONE_TEXT: dict[tuple[str, str], list[str]] = {
    ("example.test.", "A"): ["192.0.2.10", "192.0.2.11"],
    ("example.test.", "AAAA"): ["2001:db8::10"],
    ("example.test.", "CNAME"): ["web.example.test."],
    ("example.test.", "MX"): ["10 mail.example.test."],
    ("example.test.", "TXT"): ['"v=spf1 " "-all"', '"caf\\233"'],
    ("example.test.", "NS"): ["ns1.example.test."],
    ("example.test.", "SRV"): ["5 20 5060 sip.example.test."],
    ("example.test.", "SOA"): [
        "ns1.example.test. hostmaster.example.test. 2024010101 7200 900 1209600 300"
    ],
    ("example.test.", "CAA"): ['0 issue "ca.example.net"', '128 iodef "mailto:ca@example.net"'],
    ("only-a.example.test.", "A"): ["192.0.2.20"],
    ("null-mx.example.test.", "MX"): ["0 ."],
    ("1.0.0.127.in-addr.arpa.", "PTR"): ["localhost.example.test."],
    (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.",
        "PTR",
    ): ["ip6-localhost.example.test."],
}
ZONE: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[dns.rdata.Rdata]] = {
    (dns.name.from_text(name), dns.rdatatype.from_text(kind)): [
        dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(kind), text)
        for text in texts
    ]
    for (name, kind), texts in ZONE_TEXT.items()
}
NAMES = {name for name, _ in ZONE}

ALL_BUT_PTR = [kind for kind in DNS_RECORD_TYPES if kind != "ptr"]
EXPECTED = {
    "a": ["192.0.2.10", "192.0.2.11"],
    "aaaa": ["2001:db8::10"],
    "cname": ["web.example.test"],
    "mx": ["10 mail.example.test"],
    "txt": ["caf\ufffd", "v=spf1 -all"],
    "ns": ["ns1.example.test"],
    "srv": ["5 20 5060 sip.example.test"],
    "soa": ["ns1.example.test hostmaster.example.test 2024010101 7200 900 1209600 300"],
    "caa": ["0 issue ca.example.net", "128 iodef mailto:ca@example.net"],
}


class ToyNameServer(asyncio.DatagramProtocol):
    """Answers from ZONE, NXDOMAIN for unknown names, each type after its own delay."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = {dns.rdatatype.from_text(kind): s for kind, s in delays.items()}
        self.transport: asyncio.DatagramTransport | None = None
        self.questions: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        self.questions.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        response = dns.message.make_response(query)
        rdatas = ZONE.get((question.name, question.rdtype))
        if question.name not in NAMES:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif rdatas:
            response.answer.append(dns.rrset.from_rdata_list(question.name, 60, rdatas))
        assert self.transport is not None
        delay = self.delays.get(question.rdtype, 0.0)
        asyncio.get_running_loop().call_later(
            delay, self.transport.sendto, response.to_wire(), addr
        )


@contextlib.asynccontextmanager
async def name_server(
    host: str = "127.0.0.1", delays: dict[str, float] | None = None
) -> AsyncIterator[tuple[str, ToyNameServer]]:
    """A toy name server on a free UDP port; yields its "ip:port" and the protocol."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: ToyNameServer(delays or {}), local_addr=(host, 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        yield (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), protocol
    finally:
        transport.close()


@contextlib.contextmanager
def silent_udp_port() -> Iterator[str]:
    """A bound UDP socket that never answers; yields its "ip:port"."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def closed_udp_port() -> str:
    """An "ip:port" on which nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def ctx() -> TaskContext:
    """A context built from a real agent config document."""
    settings = parse_agent_config(
        'agent_uuid = "0b6c5d1e-2f3a-4b5c-8d7e-9f0a1b2c3d4e"\n'
        '[[server]]\nws_url = "ws://127.0.0.1:9/ws"\ntoken = "secret"\n'
    )
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="t")


def dns_task_for(domain: str, record_types: list[str], server: str) -> Dns:
    """A parsed dns task asking ``server``."""
    task = parse_task_event_type(
        {"dns": {"domain": domain, "record_types": record_types, "dns_server": server}}
    )
    assert isinstance(task, Dns)
    return task


def by_type(records: list[Any]) -> dict[str, list[str]]:
    """Record data grouped by type, sorted (an RRset has no order)."""
    grouped: dict[str, list[str]] = {}
    for record in records:
        grouped.setdefault(record.record_type, []).append(record.data)
    return {kind: sorted(data) for kind, data in grouped.items()}


async def test_every_type_has_its_documented_data_format(ctx: TaskContext) -> None:
    """Each of the nine name record types comes back with exactly the documented data text."""
    async with name_server() as (server, _):
        result = await dns_task.run(dns_task_for("example.test", ALL_BUT_PTR, server), ctx)
    assert by_type(result.dns) == EXPECTED
    assert [r.record_type for r in result.dns] == [
        kind for kind in ALL_BUT_PTR for _ in EXPECTED[kind]
    ]


async def test_result_round_trips_through_the_wire_format(ctx: TaskContext) -> None:
    """The result serialises to the wire's list of record_type/time/data objects."""
    async with name_server() as (server, _):
        result = await dns_task.run(dns_task_for("example.test", ["mx"], server), ctx)
    wire = result.to_wire()
    assert wire["dns"][0]["record_type"] == "mx"
    assert wire["dns"][0]["data"] == "10 mail.example.test"
    assert isinstance(wire["dns"][0]["time"], float)


async def test_ptr_takes_an_ipv4_address(ctx: TaskContext) -> None:
    """A ptr lookup of 127.0.0.1 asks for its in-addr.arpa name and strips the trailing dot."""
    async with name_server() as (server, protocol):
        result = await dns_task.run(dns_task_for("127.0.0.1", ["ptr"], server), ctx)
    assert by_type(result.dns) == {"ptr": ["localhost.example.test"]}
    assert protocol.questions == [("1.0.0.127.in-addr.arpa.", "PTR")]


async def test_ptr_takes_an_ipv6_address(ctx: TaskContext) -> None:
    """A ptr lookup of ::1 asks for its ip6.arpa name."""
    async with name_server() as (server, _):
        result = await dns_task.run(dns_task_for("::1", ["ptr"], server), ctx)
    assert by_type(result.dns) == {"ptr": ["ip6-localhost.example.test"]}


async def test_root_name_stays_a_dot(ctx: TaskContext) -> None:
    """A null MX keeps its exchange as "." instead of an empty string."""
    async with name_server() as (server, _):
        result = await dns_task.run(dns_task_for("null-mx.example.test", ["mx"], server), ctx)
    assert by_type(result.dns) == {"mx": ["0 ."]}


async def test_each_type_is_timed_on_its_own(ctx: TaskContext) -> None:
    """A slow TXT answer shows in the TXT time only; records of one type share one time."""
    delay = 0.4 * UNIT
    async with name_server(delays={"txt": delay}) as (server, _):
        started = time.perf_counter()
        result = await dns_task.run(dns_task_for("example.test", ["a", "txt"], server), ctx)
        elapsed = time.perf_counter() - started
    a_times = {r.time for r in result.dns if r.record_type == "a"}
    txt_times = {r.time for r in result.dns if r.record_type == "txt"}
    assert len(a_times) == 1
    assert len(txt_times) == 1
    (a_time,), (txt_time,) = a_times, txt_times
    assert txt_time >= delay * 1000
    assert a_time < txt_time
    # the types are asked at once, so the task takes one delay, not the sum
    assert elapsed < 2 * delay


async def test_a_type_without_answer_is_omitted(ctx: TaskContext) -> None:
    """Types the name has no records of add nothing while the others still answer."""
    async with name_server() as (server, _):
        result = await dns_task.run(
            dns_task_for("only-a.example.test", ["mx", "a", "txt"], server), ctx
        )
    assert by_type(result.dns) == {"a": ["192.0.2.20"]}


async def test_a_type_that_times_out_is_omitted(ctx: TaskContext) -> None:
    """A type whose answer comes too late is left out while a prompt one is returned."""
    async with name_server(delays={"mx": 2.0 * UNIT}) as (server, _):
        result = await dns_task.run(
            dns_task_for("example.test", ["a", "mx"], server),
            ctx,
            query_timeout_s=0.3 * UNIT,
            lifetime_s=0.6 * UNIT,
        )
    assert by_type(result.dns) == {"a": ["192.0.2.10", "192.0.2.11"]}


async def test_nxdomain_everywhere_fails_with_reason(ctx: TaskContext) -> None:
    """A name that does not exist fails and says so, naming the types asked."""
    async with name_server() as (server, _):
        with pytest.raises(TaskFailed) as failure:
            await dns_task.run(dns_task_for("nosuch.test", ["a", "mx"], server), ctx)
    assert str(failure.value) == (
        "no records for nosuch.test (a, mx: nosuch.test does not exist (NXDOMAIN))"
    )


async def test_no_answer_everywhere_fails_with_reason(ctx: TaskContext) -> None:
    """An existing name without any requested type fails, naming the empty types."""
    async with name_server() as (server, _):
        with pytest.raises(TaskFailed) as failure:
            await dns_task.run(dns_task_for("only-a.example.test", ["mx", "caa"], server), ctx)
    assert str(failure.value) == "no records for only-a.example.test (mx, caa: no such record)"


async def test_silent_server_fails_within_the_lifetime(ctx: TaskContext) -> None:
    """A server that never answers fails once the lifetime runs out, not much later."""
    lifetime = 0.5 * UNIT
    with silent_udp_port() as server:
        started = time.perf_counter()
        with pytest.raises(TaskFailed) as failure:
            await dns_task.run(
                dns_task_for("example.test", ["a", "aaaa"], server),
                ctx,
                query_timeout_s=0.2 * UNIT,
                lifetime_s=lifetime,
            )
        elapsed = time.perf_counter() - started
    assert str(failure.value) == (
        f"no records for example.test (a, aaaa: no answer within {lifetime:g} s)"
    )
    assert elapsed < lifetime + 1.0 * UNIT


async def test_closed_port_fails_within_the_lifetime(ctx: TaskContext) -> None:
    """A dns_server port nobody listens on fails within the lifetime."""
    lifetime = 0.5 * UNIT
    started = time.perf_counter()
    with pytest.raises(TaskFailed, match="no answer within"):
        await dns_task.run(
            dns_task_for("example.test", ["a"], closed_udp_port()),
            ctx,
            query_timeout_s=0.2 * UNIT,
            lifetime_s=lifetime,
        )
    assert time.perf_counter() - started < lifetime + 1.0 * UNIT


def test_default_lifetime_ends_before_the_hard_timeout(ctx: TaskContext) -> None:
    """With default limits a lookup gives its own reason before the client's timeout cuts it off."""
    _, timeout = runner_for("dns", ctx.settings)
    assert timeout == dns_task.TIMEOUT_S
    assert dns_task.QUERY_TIMEOUT_S <= dns_task.LIFETIME_S
    assert timeout >= dns_task.LIFETIME_S + 2


async def test_invalid_domain_fails(ctx: TaskContext) -> None:
    """A domain with an empty label fails with a readable reason before any query."""
    async with name_server() as (server, protocol):
        with pytest.raises(TaskFailed, match="is not a valid domain name"):
            await dns_task.run(dns_task_for("a..example.test", ["a"], server), ctx)
    assert protocol.questions == []


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_server_address(ctx: TaskContext) -> None:
    """A dns_server written as [::1]:port is asked over IPv6."""
    async with name_server("::1") as (server, protocol):
        assert server.startswith("[::1]:")
        result = await dns_task.run(dns_task_for("example.test", ["aaaa"], server), ctx)
    assert by_type(result.dns) == {"aaaa": ["2001:db8::10"]}
    assert protocol.questions == [("example.test.", "AAAA")]
