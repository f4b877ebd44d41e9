"""Results waiting for upload, kept on disk so neither a disconnect nor a restart loses them.

One directory per server connection, named by ``link_id(ws_url, agent_uuid)``
so that renaming or reordering ``[[server]]`` tables changes nothing. One file
per result, written atomically (temp file, fsync, rename) before the upload is
attempted and removed once the server acknowledged it. Each file records the
link it belongs to, ``{"link": id, "ws_url": url, "response": {...}}``, and a
spool only hands out its own results, so a result never goes to another server.

Agents before this layout kept bare results in a directory named after the
server's ``name``; ``Spool.adopt`` takes such results over.

Host reports (``ReportBuffer``) are cheaper to lose than results and come every
second, so they are kept differently: in memory, bounded by count and age, and
mirrored to one append-only file per link (``reports.journal``; no fsync) only
while they cannot be sent, so that an agent restart during an outage keeps them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orjson

logger = logging.getLogger(__name__)


def link_id(ws_url: str, agent_uuid: str) -> str:
    """A short, stable name for the connection of one agent identity to one server URL."""
    return hashlib.sha256(f"{ws_url}\n{agent_uuid}".encode()).hexdigest()[:16]


def read_entry(path: Path) -> dict[str, Any]:
    """One spool file's JSON object; OSError or JSONDecodeError if it cannot be read."""
    value = orjson.loads(path.read_bytes())
    if not isinstance(value, dict):
        raise orjson.JSONDecodeError("not a JSON object", "", 0)
    return value


class Spool:
    """A directory of pending results for one server link."""

    def __init__(self, directory: Path, link: str, ws_url: str) -> None:
        self.directory = directory
        self.link = link
        self.ws_url = ws_url
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, task_id: int) -> Path:
        return self.directory / f"{task_id:020d}.json"

    def put(self, response: dict[str, Any]) -> None:
        """Persist a result (a TaskResponse object) until it is acknowledged."""
        path = self._path(int(response["task_id"]))
        temp = path.with_suffix(".tmp")
        entry = {"link": self.link, "ws_url": self.ws_url, "response": response}
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps(entry))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)

    def done(self, task_id: int) -> None:
        """Forget an acknowledged result."""
        with contextlib.suppress(FileNotFoundError):
            self._path(task_id).unlink()

    def pending(self) -> list[dict[str, Any]]:
        """This link's stored results, oldest task first; unreadable files are set aside."""
        results = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                entry = read_entry(path)
            except (OSError, orjson.JSONDecodeError) as exc:
                logger.error("spooled result %s is unreadable (%s); moved aside", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            if entry.get("link") != self.link or not isinstance(entry.get("response"), dict):
                # kept, not sent: uploading it here could hand it to the wrong server
                logger.warning(
                    "spooled result %s in %s is not for %s; left alone",
                    path.name,
                    self.directory,
                    self.ws_url,
                )
                continue
            results.append(entry["response"])
        return results

    def adopt(self, directory: Path, agent_uuid: str) -> int:
        """Move the old-style results of ``agent_uuid`` out of ``directory`` into this spool."""
        moved = 0
        for path in sorted(directory.glob("*.json")):
            try:
                response = read_entry(path)
            except (OSError, orjson.JSONDecodeError):
                continue  # unreadable: left where it is for a person to look at
            if "link" in response or response.get("agent_uuid") != agent_uuid:
                continue
            self.put(response)
            path.unlink()
            moved += 1
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if nothing is left in it
        return moved

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.json"))


class Report(NamedTuple):
    """One buffered report: its place in the buffer, its time (ms) and its JSON."""

    seq: int
    time_ms: int
    data: bytes


LIVE, DEAD = b"+", b"-"
COMPACT_AFTER = 512
"""Forgotten lines the journal may hold before it is rewritten (when they outnumber the kept)."""


class ReportBuffer:
    """Reports waiting for a server, oldest first, bounded by count and by age.

    Each report is one line of the journal file, ``+`` and its JSON; a report
    that is sent (or dropped by a bound) is forgotten by turning its ``+`` into
    ``-`` in place, and the file is rewritten once forgotten lines outnumber the
    kept ones. At start the kept lines are read back and the bounds applied
    again. A file that cannot be written leaves the buffer in memory only.
    """

    def __init__(
        self,
        path: Path,
        max_count: int,
        max_age_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_count = max_count
        self.max_age_ms = max_age_ms
        self._clock = clock
        self._seq = itertools.count(1)
        self._reports: deque[Report] = deque()
        self._offsets: dict[int, int] = {}
        self._fd: int | None = None
        self._end = 0
        self._dead = 0
        for time_ms, data in self._read_back():
            self._reports.append(Report(next(self._seq), time_ms, data))
        self._prune()
        self._rewrite()

    def _read_back(self) -> list[tuple[int, bytes]]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.error("buffered reports in %s are unreadable: %s", self.path, exc)
            return []
        found = []
        for line in text.splitlines():
            if not line.startswith(LIVE):
                continue
            try:
                time_ms = orjson.loads(line[1:]).get("time")
            except (orjson.JSONDecodeError, AttributeError):
                continue  # a line cut short by a crash
            if isinstance(time_ms, int):
                found.append((time_ms, bytes(line[1:])))
        return found

    def _rewrite(self) -> None:
        """Replace the journal by the kept reports (remove it when there are none)."""
        self._close_fd()
        self._offsets.clear()
        self._dead = 0
        self._end = 0
        try:
            if not self._reports:
                self.path.unlink(missing_ok=True)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temp = self.path.with_suffix(".tmp")
            lines = []
            for report in self._reports:
                self._offsets[report.seq] = self._end
                line = LIVE + report.data + b"\n"
                lines.append(line)
                self._end += len(line)
            temp.write_bytes(b"".join(lines))
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            self._disk_failed(exc)

    def _disk_failed(self, exc: OSError) -> None:
        logger.error(
            "cannot write buffered reports to %s (%s); keeping them in memory", self.path, exc
        )
        self._close_fd()
        self._offsets.clear()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def put(self, time_ms: int, data: bytes) -> None:
        """Buffer one report (its JSON), then drop what the bounds no longer allow."""
        if self.max_count == 0:
            return
        report = Report(next(self._seq), time_ms, data)
        self._reports.append(report)
        if self._fd is None and not self._offsets and len(self._reports) == 1:
            self._rewrite()  # the first report of an outage opens the journal
        elif self._fd is not None:
            line = LIVE + data + b"\n"
            try:
                os.pwrite(self._fd, line, self._end)
            except OSError as exc:
                self._disk_failed(exc)
            else:
                self._offsets[report.seq] = self._end
                self._end += len(line)
        self._prune()

    def _prune(self) -> None:
        oldest_allowed = int(self._clock() * 1000) - self.max_age_ms
        dropped = 0
        while self._reports and (
            len(self._reports) > self.max_count or self._reports[0].time_ms < oldest_allowed
        ):
            self._forget(self._reports.popleft())
            dropped += 1
        if dropped:
            logger.debug("dropped %d buffered report(s) beyond the bounds", dropped)
            self._maybe_compact()

    def _forget(self, report: Report) -> None:
        offset = self._offsets.pop(report.seq, None)
        if offset is None or self._fd is None:
            return
        try:
            os.pwrite(self._fd, DEAD, offset)
        except OSError as exc:
            self._disk_failed(exc)
        self._dead += 1

    def _maybe_compact(self) -> None:
        if not self._reports or (self._dead >= COMPACT_AFTER and self._dead > len(self._reports)):
            self._rewrite()

    def oldest(self, limit: int) -> list[Report]:
        """Up to ``limit`` of the oldest reports still within the bounds."""
        self._prune()
        return list(itertools.islice(self._reports, limit))

    def done(self, seq: int) -> None:
        """Forget every report up to and including ``seq`` (they were sent)."""
        while self._reports and self._reports[0].seq <= seq:
            self._forget(self._reports.popleft())
        self._maybe_compact()

    def close(self) -> None:
        """Let go of the journal file; what it holds is read back by the next buffer."""
        self._close_fd()

    def __len__(self) -> int:
        return len(self._reports)
