"""ip: the agent's public IPv4 and IPv6 addresses as HTTP echo endpoints see them.

Every URL of ``ip_echo_urls`` is asked at once; a body holding an IPv4 address
fills the first slot, an IPv6 address the second. The first answer of each
family wins and the task ends as soon as both slots are filled. Endpoints that
fail, time out or answer anything but an address are skipped, so the task never
fails: an unknown address is null.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import httpx

from taskd.agent.tasks import TaskContext
from taskd.protocol import Ip, IpResult

logger = logging.getLogger(__name__)

TIMEOUT_S = 10.0
ECHO_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 1024
"""An address is at most 45 characters; a longer body is not an echo."""

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def run(task: Ip, ctx: TaskContext, *, echo_timeout_s: float = ECHO_TIMEOUT_S) -> IpResult:
    """Ask every echo endpoint concurrently and return the first IPv4 and IPv6 answers."""
    found: dict[int, str] = {}
    # Environment proxies do not apply: through a proxy the echo would be the proxy's address.
    async with httpx.AsyncClient(
        timeout=echo_timeout_s, follow_redirects=True, trust_env=False
    ) as client:
        pending = {
            asyncio.create_task(_echo(client, url, echo_timeout_s))
            for url in ctx.settings.ip_echo_urls
        }
        try:
            while pending and len(found) < 2:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    address = finished.result()
                    if address is not None:
                        found.setdefault(address.version, str(address))
        finally:
            for unfinished in pending:
                unfinished.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return IpResult(ip=(found.get(4), found.get(6)))


async def _echo(client: httpx.AsyncClient, url: str, timeout_s: float) -> IpAddress | None:
    """The address one endpoint answers, or None."""
    try:
        async with asyncio.timeout(timeout_s), client.stream("GET", url) as response:
            response.raise_for_status()
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    logger.debug("ip echo %s: body longer than %d bytes", url, MAX_BODY_BYTES)
                    return None
    except TimeoutError:
        logger.debug("ip echo %s: no answer within %g s", url, timeout_s)
        return None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        logger.debug("ip echo %s failed: %s", url, exc)
        return None
    try:
        return ipaddress.ip_address(body.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        logger.debug("ip echo %s: %r is not an address", url, body[:64])
        return None
