"""Results waiting for upload, kept on disk so neither a disconnect nor a restart loses them.

One file per result, written atomically (temp file, fsync, rename) before the
upload is attempted and removed once the server acknowledged it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import orjson

logger = logging.getLogger(__name__)


class Spool:
    """A directory of pending results for one server."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, task_id: int) -> Path:
        return self.directory / f"{task_id:020d}.json"

    def put(self, response: dict[str, Any]) -> None:
        """Persist a result (a TaskResponse object) until it is acknowledged."""
        path = self._path(int(response["task_id"]))
        temp = path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps(response))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)

    def done(self, task_id: int) -> None:
        """Forget an acknowledged result."""
        with contextlib.suppress(FileNotFoundError):
            self._path(task_id).unlink()

    def pending(self) -> list[dict[str, Any]]:
        """Every stored result, oldest task first; unreadable files are set aside."""
        results = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                results.append(orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError) as exc:
                logger.error("spooled result %s is unreadable (%s); moved aside", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
        return results

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.json"))
