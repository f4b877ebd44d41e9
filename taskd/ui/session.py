"""Dashboard sessions: a login turns a token into a random session id held in a cookie.

The token stays on the server: the browser holds only the session id (an HttpOnly
cookie) and a CSRF token it echoes in a header. Each use re-checks the token with the
same code as JSON-RPC, so a session ends as soon as its token is revoked, rolled,
deleted or expires.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from taskd.auth import Authenticator, Principal
from taskd.errors import PermissionDenied, TaskdError

COOKIE = "taskd_session"
IDLE_S = 12 * 3600.0
"""A session nobody used for this long is forgotten."""
MAX_SESSIONS = 10_000
"""Sessions kept at once; the least recently used goes first."""


@dataclass(eq=False)
class Session:
    """One logged-in browser: the token it acts with (never sent back) and its CSRF token."""

    id: str
    token: str
    key: str
    csrf: str
    used: float = field(default_factory=time.monotonic)

    def csrf_matches(self, given: str | None) -> bool:
        """Whether ``given`` is this session's CSRF token (constant time)."""
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


class Sessions:
    """Every dashboard session of this server process, keyed by its random id."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    async def login(self, token: str, address: str) -> Session:
        """A new session for ``token``; PermissionDenied (rate-limited) when it is refused."""
        principal = await self.auth.authenticate(token, address)
        session = Session(
            secrets.token_urlsafe(32), token, principal.key, secrets.token_urlsafe(32)
        )
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, if any."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.used > IDLE_S:
            self.end(session)
            return None
        session.used = now
        self._sessions.move_to_end(session_id)
        return session

    async def principal(self, session: Session, address: str) -> Principal | None:
        """The session's token checked again now; None (and the session ended) if refused."""
        try:
            return await self.auth.authenticate(session.token, address)
        except TaskdError as exc:
            if isinstance(exc, PermissionDenied):
                self.end(session)
            return None

    def end(self, session: Session) -> None:
        """Log the session out."""
        self._sessions.pop(session.id, None)
