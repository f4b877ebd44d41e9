"""dns: look up several record types of a domain, each type timed on its own.

Each answer record becomes one ``DnsRecord`` whose ``data`` reads:

- a, aaaa: the address
- cname, ns, ptr: the host name
- mx: ``"preference exchange"``
- srv: ``"priority weight port target"``
- soa: ``"mname rname serial refresh retry expire minimum"``
- txt: the record's character-strings joined, decoded as UTF-8 (bad bytes replaced)
- caa: ``"flags tag value"``, the value unquoted

Host names lose their trailing dot (``mail.example.com``, not ``mail.example.com.``);
the root name stays ``"."``. A type without an answer adds no records; the task
fails only when no type has any.
"""

from __future__ import annotations

import asyncio
import time

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename
from dns.rdtypes.ANY.CAA import CAA
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.SRV import SRV
from dns.rdtypes.mxbase import MXBase
from dns.rdtypes.nsbase import NSBase

from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.protocol import Dns, DnsRecord, DnsRecordType, DnsResult, split_host_port

TIMEOUT_S = 15.0
QUERY_TIMEOUT_S = 3.0
LIFETIME_S = 10.0
"""How long one record type may take in all, retries and other name servers included."""


async def run(
    task: Dns,
    ctx: TaskContext,
    *,
    query_timeout_s: float = QUERY_TIMEOUT_S,
    lifetime_s: float = LIFETIME_S,
) -> DnsResult:
    """Query every requested record type at once and return all answers in the requested order."""
    spec = task.dns
    resolver = _resolver(spec.dns_server)
    resolver.timeout = query_timeout_s
    resolver.lifetime = lifetime_s
    try:
        name = dns.name.from_text(spec.domain)
    except dns.exception.DNSException as exc:
        raise TaskFailed(f"{spec.domain!r} is not a valid domain name: {exc}") from None
    async with asyncio.TaskGroup() as group:
        lookups = [
            group.create_task(_lookup(resolver, name, spec.domain, record_type))
            for record_type in dict.fromkeys(spec.record_types)
        ]
    records: list[DnsRecord] = []
    failures: dict[str, list[str]] = {}
    for lookup in lookups:
        answer = lookup.result()
        if isinstance(answer, list):
            records.extend(answer)
        else:
            reason, record_type = answer
            failures.setdefault(reason, []).append(record_type)
    if not records:
        reasons = "; ".join(f"{', '.join(types)}: {reason}" for reason, types in failures.items())
        raise TaskFailed(f"no records for {spec.domain} ({reasons})")
    return DnsResult(dns=records)


def _resolver(dns_server: str | None) -> dns.asyncresolver.Resolver:
    if dns_server is None:
        try:
            return dns.asyncresolver.Resolver()
        except dns.exception.DNSException as exc:
            raise TaskFailed(f"no usable system resolver configuration: {exc}") from None
    host, port = split_host_port(dns_server)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    return resolver


async def _lookup(
    resolver: dns.asyncresolver.Resolver,
    name: dns.name.Name,
    domain: str,
    record_type: DnsRecordType,
) -> list[DnsRecord] | tuple[str, str]:
    """The records of one type, or (reason, type) when there are none."""
    qname = dns.reversename.from_address(domain) if record_type == "ptr" else name
    started = time.perf_counter()
    try:
        answer = await resolver.resolve(qname, dns.rdatatype.from_text(record_type))
    except dns.resolver.NXDOMAIN:
        return f"{qname.to_text(omit_final_dot=True)} does not exist (NXDOMAIN)", record_type
    except dns.resolver.NoAnswer:
        return "no such record", record_type
    except dns.resolver.LifetimeTimeout:
        return f"no answer within {resolver.lifetime:g} s", record_type
    except dns.resolver.NoNameservers as exc:
        return _no_nameservers(exc), record_type
    except dns.exception.DNSException as exc:
        return str(exc), record_type
    elapsed_ms = (time.perf_counter() - started) * 1000
    return [
        DnsRecord(record_type=record_type, time=elapsed_ms, data=_data(rdata)) for rdata in answer
    ]


def _no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    # dnspython's own message repeats the whole question; name each server and its error
    errors = exc.kwargs.get("errors") or []
    details = "; ".join(f"{server} answered {error}" for server, _, _, error, _ in errors)
    return f"no name server could answer ({details or 'none configured'})"


def _host(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _data(rdata: dns.rdata.Rdata) -> str:
    """The text of one answer record (formats in the module docstring)."""
    match rdata:
        case MXBase():
            return f"{rdata.preference} {_host(rdata.exchange)}"
        case NSBase():  # CNAME, NS and PTR
            return _host(rdata.target)
        case SRV():
            return f"{rdata.priority} {rdata.weight} {rdata.port} {_host(rdata.target)}"
        case SOA():
            return (
                f"{_host(rdata.mname)} {_host(rdata.rname)} {rdata.serial} {rdata.refresh}"
                f" {rdata.retry} {rdata.expire} {rdata.minimum}"
            )
        case TXT():
            return b"".join(rdata.strings).decode("utf-8", "replace")
        case CAA():
            value = rdata.value.decode("utf-8", "replace")
            return f"{rdata.flags} {rdata.tag.decode('ascii', 'replace')} {value}"
        case _:  # A and AAAA print as their address
            return rdata.to_text()
