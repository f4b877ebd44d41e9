"""Alert channels: Apprise URLs checked, redacted and sent to (the only module that imports
Apprise).

A URL's secrets (passwords, bot tokens, webhook keys, query values named like a
secret) are never returned or logged: ``inspect`` gives the redacted form Apprise
prints with privacy on, with secret-looking query values masked too, and the list
of secret fragments, which ``Redactor`` strikes from any text (Apprise's own log
lines and the errors taskd records).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import apprise

from taskd.errors import InvalidParams

URL_MAX = 4096
MASK = "****"
_SECRET_KEY = re.compile(r"token|key|secret|pass|pw|auth|sig|cred|webhook|apikey", re.IGNORECASE)
_PARTS = re.compile(r"[/:@?&=#,;+\s]+")


@dataclass(frozen=True)
class ChannelUrl:
    """A checked Apprise URL: its scheme, redacted form and secret fragments."""

    url: str
    scheme: str
    redacted: str
    secrets: frozenset[str]


def _mask_query(url: str) -> tuple[str, set[str]]:
    """``url`` with the values of secret-looking query keys masked, and those values."""
    parts = urlsplit(url)
    masked: set[str] = set()
    pairs = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and _SECRET_KEY.search(key):
            masked.add(value)
            value = MASK
        pairs.append((key, value))
    query = urlencode(pairs, safe="*@")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment)), masked


def _fragments(text: str) -> set[str]:
    return {part for part in _PARTS.split(unquote(text)) if part}


_loaded = False


def _load_plugins() -> None:
    """Load Apprise's plugins once, on the event loop's thread (before any send thread).

    Apprise loads them on first use; its e-mail plugin imports ``imghdr``, which warns
    of its removal in Python 3.13 (a warning the tests turn into an error).
    """
    global _loaded
    if _loaded:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apprise.Apprise.instantiate("json://localhost/", suppress_exceptions=True)
    _loaded = True


def inspect(url: object, field: str = "url") -> ChannelUrl:
    """Check an Apprise URL (InvalidParams naming ``field`` if Apprise cannot use it)."""
    _load_plugins()
    if not isinstance(url, str) or not url.strip():
        raise InvalidParams(f"{field}: must be an Apprise URL such as json://host/path")
    if len(url) > URL_MAX:
        raise InvalidParams(f"{field}: longer than {URL_MAX} characters")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    with REDACTOR.quiet():  # Apprise logs the URL it loads
        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
        private = str(plugin.url(privacy=True)) if plugin is not None else ""  # type: ignore[no-untyped-call]
    if not scheme or plugin is None:
        raise InvalidParams(
            f"{field}: not a URL Apprise can send to (scheme {scheme or '?'}://); see "
            "https://github.com/caronc/apprise/wiki for json://, mailto://, tgram://, ..."
        )
    redacted, masked = _mask_query(private)
    # whatever the URL holds that its private form does not show is a secret
    hidden = _fragments(url) - _fragments(redacted)
    secrets = {s for s in hidden | masked if len(s) >= 3 and s.lower() != scheme}
    return ChannelUrl(url, scheme, redacted, frozenset(secrets))


class Redactor(logging.Filter):
    """Strikes every known channel secret from text and from Apprise's log records."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        self._quiet = threading.local()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Drop Apprise's records on this thread meanwhile (a URL whose secrets are not
        known yet is being read)."""
        self._quiet.on = True
        try:
            yield
        finally:
            self._quiet.on = False

    def learn(self, channel: ChannelUrl) -> None:
        """Remember a channel's secrets."""
        with self._lock:
            self._secrets |= channel.secrets

    def redact(self, text: str) -> str:
        """``text`` with every known secret masked."""
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message without secrets; drop it while ``quiet``."""
        if getattr(self._quiet, "on", False):
            return False
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


REDACTOR = Redactor()
"""The one redactor: Apprise's log records (and those of urllib3, which logs the request
paths where some services carry a token) pass through it, and so do delivery errors."""
for _name in ("apprise", "urllib3.connectionpool"):
    _logger = logging.getLogger(_name)
    if REDACTOR not in _logger.filters:
        _logger.addFilter(REDACTOR)


def send(channel: ChannelUrl, title: str, body: str) -> str | None:
    """Send one message (blocking: run it on a thread); None if sent, else why not
    (without secrets)."""
    REDACTOR.learn(channel)
    sender = apprise.Apprise()
    if not sender.add(channel.url):
        return "Apprise refused the URL"
    with apprise.LogCapture(level=logging.WARNING) as captured:  # type: ignore[no-untyped-call]
        try:
            sent = sender.notify(body=body, title=title)
        except Exception as exc:  # a plugin's fault must not end the worker
            return REDACTOR.redact(f"{type(exc).__name__}: {exc}")[:500]
        log = captured.getvalue() if not sent else ""
    if sent:
        return None
    lines = [line.strip() for line in str(log).splitlines() if line.strip()]
    # Apprise's lines read "<time> - <LEVEL> - <message>"
    reason = lines[-1].split(" - ", 2)[-1] if lines else "the channel did not take the message"
    return REDACTOR.redact(reason)[:500]
