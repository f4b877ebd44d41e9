"""Results waiting for upload, kept on disk so neither a disconnect nor a restart loses them.

One directory per server connection, named by ``link_id(ws_url, agent_uuid)``
so that renaming or reordering ``[[server]]`` tables changes nothing. One file
per result, written atomically (temp file, fsync, rename) before the upload is
attempted and removed once the server acknowledged it. Each file records the
link it belongs to, ``{"link": id, "ws_url": url, "response": {...}}``, and a
spool only hands out its own results, so a result never goes to another server.

Agents before this layout kept bare results in a directory named after the
server's ``name``; ``Spool.adopt`` takes such results over.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

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
