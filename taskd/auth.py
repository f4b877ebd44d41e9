"""Tokens: generation, hashing, authentication, and the one permission check.

A token is ``KEY:SECRET`` or ``USERNAME|PASSWORD``. Secrets are 32 random
alphanumerics, so a plain SHA-256 is a safe and fast hash for them; passwords
are chosen by people and get scrypt. Every comparison is constant-time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from taskd.clock import now_ms
from taskd.errors import InvalidParams, PermissionDenied, SerializationError
from taskd.protocol import (
    TASK_TYPES,
    AgentPermission,
    AgentScope,
    AlertPermission,
    CronResultPermission,
    CrontabPermission,
    DynamicMonitoringPermission,
    DynamicMonitoringSummaryPermission,
    KvNamespaceScope,
    KvPermission,
    Limit,
    MonitoringUuidPermission,
    NodeGetPermission,
    Permission,
    StaticMonitoringPermission,
    TaskPermission,
    TerminalPermission,
    TokenPermission,
    parse_limits,
)
from taskd.store import SUPER_USERNAME, Store

logger = logging.getLogger(__name__)

ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 16
SECRET_LENGTH = 32
CACHE_SECONDS = 5.0
MAX_UNKNOWN_KEYS = 10_000
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}
MAX_SCRYPTS = min(4, os.cpu_count() or 1)
"""Password hashes computed at once: each takes 16 MiB and a core for tens of ms."""
_NO_PASSWORD = f"scrypt${secrets.token_hex(16)}${secrets.token_hex(64)}"
"""Checked against for unknown usernames: the same scrypt work as a real hash, never a match."""


class _RandomBytes:
    """OS CSPRNG bytes drawn a page at a time: one system call serves many task tokens.

    Each byte is handed out once; a forked child draws its own page.
    """

    def __init__(self, page: int = 65536) -> None:
        self._page = page
        self._buffer = b""
        self._position = 0
        self._pid = 0

    def take(self, count: int) -> bytes:
        """``count`` fresh random bytes."""
        end = self._position + count
        if end > len(self._buffer) or self._pid != os.getpid():
            self._buffer = os.urandom(max(self._page, count))
            self._pid = os.getpid()
            self._position, end = 0, count
        chunk = self._buffer[self._position : end]
        self._position = end
        return chunk


_RANDOM = _RandomBytes()
_TO_ALPHABET = bytes(ord(ALPHABET[b % 62]) for b in range(256))
_UNEVEN = bytes(range(248, 256))
"""Bytes 248-255 are dropped so every character is equally likely (248 = 4 x 62)."""


def random_string(length: int) -> str:
    """A random alphanumeric string from the OS CSPRNG."""
    drawn = b""
    while len(drawn) < length:
        drawn += _RANDOM.take(length * 2).translate(_TO_ALPHABET, _UNEVEN)
    return drawn[:length].decode()


def hash_secret(secret: str) -> str:
    """Hash a high-entropy generated secret."""
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


def hash_password(password: str) -> str:
    """Hash a person-chosen password with scrypt and a random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Check a password against its scrypt hash in constant time."""
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), **_SCRYPT)
    return hmac.compare_digest(digest.hex(), digest_hex)


@dataclass(frozen=True)
class NewToken:
    """A freshly generated key and secret; the secret is shown once and stored hashed."""

    key: str
    secret: str

    @classmethod
    def generate(cls) -> NewToken:
        """Draw a new key and secret."""
        return cls(random_string(KEY_LENGTH), random_string(SECRET_LENGTH))

    def __str__(self) -> str:
        return f"{self.key}:{self.secret}"


@dataclass(frozen=True)
class Principal:
    """An authenticated token."""

    key: str
    is_super: bool
    limits: tuple[Limit, ...]
    timestamp_from: int | None = None
    timestamp_to: int | None = None


@dataclass
class _Cached:
    principal: Principal
    secret_hash: str
    loaded: float
    verified: bytes | None = None
    """The secret once it matched ``secret_hash``: later calls compare it directly."""


@dataclass(frozen=True)
class Need:
    """One permission a call needs: a category, an action and what it applies to.

    The subject is a task type, a cron name, a KV key (or key pattern) or a
    monitoring field, matched against the permission's own name or pattern.
    """

    category: Literal[
        "task",
        "crontab",
        "crontab_result",
        "terminal",
        "agent",
        "token",
        "kv",
        "node_get",
        "monitoring_uuid",
        "static_monitoring",
        "dynamic_monitoring",
        "dynamic_monitoring_summary",
        "alert",
    ]
    action: str
    subject: str | None = None

    def __str__(self) -> str:
        return f"{self.category}.{self.action}" + (f"({self.subject})" if self.subject else "")


def _pattern_matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


def _grants(permission: Permission, need: Need) -> bool:
    match permission:
        case TaskPermission(task="listen"):
            return need.category == "task" and need.action == "listen"
        case TaskPermission(task=action) if need.category == "task" and not isinstance(action, str):
            pattern = getattr(action, need.action, None)
            return pattern is not None and _pattern_matches(pattern, need.subject or "")
        case CrontabPermission(crontab=action):
            return need.category == "crontab" and action == need.action
        case CronResultPermission(crontab_result=action) if need.category == "crontab_result":
            pattern = getattr(action, need.action, None)
            return pattern is not None and _pattern_matches(pattern, need.subject or "")
        case TerminalPermission():
            return need.category == "terminal" and need.action == "connect"
        case AgentPermission(agent=action):
            return need.category == "agent" and action == need.action
        case TokenPermission(token=action):
            return need.category == "token" and action == need.action
        case KvPermission(kv=action) if need.category == "kv":
            if isinstance(action, str):
                return action == need.action
            pattern = getattr(action, need.action, None)
            return pattern is not None and _pattern_matches(pattern, need.subject or "")
        case NodeGetPermission(node_get=action):
            return need.category == "node_get" and action == need.action
        case MonitoringUuidPermission(monitoring_uuid=action):
            return need.category == "monitoring_uuid" and action == need.action
        case StaticMonitoringPermission(static_monitoring=action):
            return need.category == "static_monitoring" and _monitoring_grants(action, need)
        case DynamicMonitoringPermission(dynamic_monitoring=action):
            return need.category == "dynamic_monitoring" and _monitoring_grants(action, need)
        case DynamicMonitoringSummaryPermission(dynamic_monitoring_summary=action):
            return need.category == "dynamic_monitoring_summary" and _monitoring_grants(
                action, need
            )
        case AlertPermission(alert=action):
            return need.category == "alert" and action == need.action
    return False


def _monitoring_grants(action: Any, need: Need) -> bool:
    """``"write"``/``"delete"`` (and a summary's ``"read"``: every field) or ``{"read": field}``."""
    if isinstance(action, str):
        return action == need.action
    return need.action == "read" and action.read == need.subject


_LIST_AGENTS: tuple[Permission, ...] = (
    AgentPermission(agent="list"),
    MonitoringUuidPermission(monitoring_uuid="list"),
)
"""taskd's ``{"agent": "list"}`` and NodeGet's ``{"monitoring_uuid": "list"}`` are one."""
_LIST_NEEDS = (Need("agent", "list"), Need("monitoring_uuid", "list"))


def _grants_or_lists(permission: Permission, need: Need) -> bool:
    if need in _LIST_NEEDS:
        return permission in _LIST_AGENTS
    return _grants(permission, need)


def lists_agents(permission: Permission) -> bool:
    """Whether a permission lists agent UUIDs: ``{"agent": "list"}``, ``{"monitoring_uuid":
    "list"}`` or NodeGet's older ``{"node_get": "list_all_agent_uuid"}``."""
    return permission in _LIST_AGENTS or permission == NodeGetPermission(
        node_get="list_all_agent_uuid"
    )


def is_global_scope(scope: Any) -> bool:
    """Whether a limit's scope is the global one (``"global"`` or ``{"global": null}``)."""
    return not isinstance(scope, AgentScope | KvNamespaceScope)


def _scope_matches(scope: Any, agent_uuid: str | None, namespace: str | None) -> bool:
    if isinstance(scope, AgentScope):
        return agent_uuid is not None and scope.agent_uuid == agent_uuid
    if isinstance(scope, KvNamespaceScope):
        return namespace is not None and scope.kv_namespace == namespace
    return True  # "global" or {"global": null}


def allows(
    principal: Principal, need: Need, agent_uuid: str | None, *, namespace: str | None = None
) -> bool:
    """Whether one limit of the token holds both a scope covering the target and ``need``.

    The target is the agent ``agent_uuid`` or the KV ``namespace``; with neither the
    call is not about one of them and only a global scope covers it.
    """
    if principal.is_super:
        return True
    return any(
        any(_scope_matches(scope, agent_uuid, namespace) for scope in limit.scopes)
        and any(_grants_or_lists(permission, need) for permission in limit.permissions)
        for limit in principal.limits
    )


def allows_any_type(principal: Principal, action: str, agent_uuid: str | None) -> bool:
    """Whether ``task.<action>`` holds on the agent for at least one task type."""
    return principal.is_super or any(
        allows(principal, Need("task", action, task_type), agent_uuid) for task_type in TASK_TYPES
    )


def authorize(
    principal: Principal, need: Need, agent_uuid: str | None = None, *, namespace: str | None = None
) -> None:
    """The one permission check: raise PermissionDenied unless ``principal`` holds ``need``."""
    if not allows(principal, need, agent_uuid, namespace=namespace):
        if agent_uuid:
            where = f" on agent {agent_uuid}"
        elif namespace is not None:
            where = f" on KV namespace {namespace!r}"
        else:
            where = " with global scope"
        raise PermissionDenied(f"Permission denied: token {principal.key} lacks {need}{where}")


def authorize_all_types(
    principal: Principal, action: str, agent_uuids: Sequence[str], types: Sequence[str]
) -> None:
    """Check ``task.<action>`` on each type (all if none) and each agent (global if none)."""
    targets: Sequence[str | None] = agent_uuids or [None]
    for agent_uuid in targets:
        for task_type in types or TASK_TYPES:
            authorize(principal, Need("task", action, task_type), agent_uuid)


def normal_origin(origin: str) -> str:
    """An origin in comparable form: lower case, no trailing slash, no default port."""
    value = origin.strip().rstrip("/").lower()
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if value.startswith(scheme) and value.endswith(port):
            value = value[: -len(port)]
    return value


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a browser-facing WebSocket with this ``Origin`` may connect.

    Browsers always send Origin; a client that sends none is not a browser and
    cannot be the vehicle of cross-site WebSocket hijacking.
    """
    if origin is None:
        return True
    return normal_origin(origin) in {normal_origin(a) for a in allowed}


def client_address(scope: Mapping[str, Any], headers: Any, trusted: tuple[str, ...]) -> str:
    """The caller's address; X-Forwarded-For is believed only from a trusted proxy."""
    client = scope.get("client")
    peer = client[0] if client else ""
    if trusted and peer in trusted:
        forwarded = headers.get("x-forwarded-for", "")
        if forwarded:
            candidate = forwarded.split(",")[-1].strip()
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(candidate))
    return str(peer)


class RateLimiter:
    """Failed-authentication buckets per client address: a burst, then a steady rate."""

    def __init__(self, burst: int, rate_per_s: float) -> None:
        self.burst = burst
        self.rate = rate_per_s
        self._buckets: dict[str, tuple[float, float]] = {}

    def blocked(self, address: str) -> bool:
        """Whether ``address`` has used up its failures for now."""
        tokens, _ = self._level(address)
        return tokens < 1.0

    def failed(self, address: str) -> None:
        """Record one failed authentication from ``address``."""
        tokens, now = self._level(address)
        self._buckets[address] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:
            self._buckets = {a: b for a, b in self._buckets.items() if b[1] > now - 60}

    def _level(self, address: str) -> tuple[float, float]:
        now = time.monotonic()
        tokens, then = self._buckets.get(address, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.rate), now


class Authenticator:
    """Turns a token string into a Principal, with a short cache of token rows."""

    def __init__(
        self,
        store: Store,
        limiter: RateLimiter,
        *,
        on_failure: Callable[[], object] | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.on_failure = on_failure
        """Called on every refused authentication (the metrics count them)."""
        self._cache: dict[str, _Cached] = {}
        self._passwords: dict[tuple[str, str], tuple[Principal, float]] = {}
        self._loading: dict[str, asyncio.Future[_Cached | None]] = {}
        self._unknown: dict[str, float] = {}
        """Keys found in no token row lately: a flood of calls with one made-up key
        must not become a flood of database reads."""
        self._generation = 0
        self._scrypts = asyncio.Semaphore(MAX_SCRYPTS)

    async def hash_password(self, password: str) -> str:
        """Hash a password off the event loop, sharing the bound on concurrent scrypts."""
        async with self._scrypts:
            return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)

    def invalidate(self, key: str | None = None) -> None:
        """Forget cached token rows (one key, or all) after a token changed."""
        self._generation += 1
        self._unknown.clear()
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)
        self._passwords.clear()

    async def authenticate(self, token: Any, address: str = "") -> Principal:
        """Check credentials and the validity window; raise PermissionDenied on any failure.

        A token that is not a string is a params error (-32602) and a string that is
        neither ``KEY:SECRET`` nor ``USERNAME|PASSWORD`` a parse error (101), as in NodeGet.
        """
        try:
            return await self._authenticate(token, address)
        except PermissionDenied:
            if self.on_failure is not None:
                self.on_failure()
            raise

    async def _authenticate(self, token: Any, address: str) -> Principal:
        if not isinstance(token, str):
            raise InvalidParams("token: must be a string KEY:SECRET or USERNAME|PASSWORD")
        key, sep, secret = token.partition(":")
        username, bar, password = ("", "", "") if sep else token.partition("|")
        if not sep and not bar:
            raise SerializationError(
                "Invalid token format: expected KEY:SECRET or USERNAME|PASSWORD"
            )
        if len(token) > 512:
            raise PermissionDenied("Invalid token: longer than 512 characters")
        if self.limiter.blocked(address):
            raise PermissionDenied("Too many failed authentications from this address; retry later")
        try:
            if sep:
                principal = await self._by_key(key, secret)
            else:
                principal = await self._by_password(username, password)
        except PermissionDenied as exc:
            self.limiter.failed(address)
            logger.warning("authentication failed from %s: %s", address or "?", exc.message)
            raise
        now = now_ms()
        if principal.timestamp_from is not None and now < principal.timestamp_from:
            raise PermissionDenied(f"Token {principal.key} is not valid yet")
        if principal.timestamp_to is not None and now > principal.timestamp_to:
            raise PermissionDenied(f"Token {principal.key} has expired")
        return principal

    async def _by_key(self, key: str, secret: str) -> Principal:
        cached = self._cache.get(key)
        if cached is None or time.monotonic() - cached.loaded > CACHE_SECONDS:
            missed = self._unknown.get(key)
            if missed is not None and time.monotonic() - missed <= CACHE_SECONDS:
                raise PermissionDenied("Invalid token: unknown key or wrong secret")
            cached = await self._load(key)
        if cached is None or not _secret_matches(secret, cached):
            raise PermissionDenied("Invalid token: unknown key or wrong secret")
        return cached.principal

    async def _load(self, key: str) -> _Cached | None:
        # one database read per key however many calls arrive while it runs
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._fetch(key, self._generation))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(loading)

    async def _fetch(self, key: str, generation: int) -> _Cached | None:
        row = await self.store.token_by_key(key)
        cached = (
            None if row is None else _Cached(principal_of(row), row.secret_hash, time.monotonic())
        )
        if generation == self._generation:  # no invalidation raced with this read
            if cached is None:
                self._cache.pop(key, None)
                if len(self._unknown) >= MAX_UNKNOWN_KEYS:
                    self._unknown.clear()
                self._unknown[key] = time.monotonic()
            else:
                self._cache[key] = cached
        return cached

    async def _by_password(self, username: str, password: str) -> Principal:
        fingerprint = (username, hashlib.sha256(password.encode()).hexdigest())
        cached = self._passwords.get(fingerprint)
        if cached is not None and time.monotonic() - cached[1] < CACHE_SECONDS:
            return cached[0]
        row = await self.store.token_by_username(username)
        stored = row.password_hash if row is not None else None
        # scrypt takes tens of ms: off the event loop, a few at a time, and the same work
        # for unknown users so timing does not reveal which usernames exist
        async with self._scrypts:
            ok = await asyncio.get_running_loop().run_in_executor(
                None, verify_password, password, stored or _NO_PASSWORD
            )
        if row is None or stored is None or not ok:
            raise PermissionDenied("Invalid credentials: unknown username or wrong password")
        principal = principal_of(row)
        self._passwords[fingerprint] = (principal, time.monotonic())
        return principal


async def ensure_super_token(store: Store) -> str | None:
    """Create the super token unless one exists; return ``KEY:SECRET`` once, else None."""
    if await store.has_super_token():
        return None
    token = NewToken.generate()
    await store.insert_token(
        {
            "key": token.key,
            "secret_hash": hash_secret(token.secret),
            "is_super": True,
            "username": SUPER_USERNAME,
            "limits": [],
            "description": "super token",
        }
    )
    return str(token)


def _secret_matches(secret: str, cached: _Cached) -> bool:
    """Whether ``secret`` is the token's, in constant time (hashed only the first time)."""
    given = secret.encode()
    if cached.verified is not None:
        return hmac.compare_digest(given, cached.verified)
    if hmac.compare_digest(hash_secret(secret), cached.secret_hash):
        cached.verified = given
        return True
    return False


def principal_of(row: Any) -> Principal:
    """The Principal of a token row."""
    return Principal(
        key=row.key,
        is_super=bool(row.is_super),
        limits=tuple(parse_limits(row.limits)),
        timestamp_from=row.timestamp_from,
        timestamp_to=row.timestamp_to,
    )
