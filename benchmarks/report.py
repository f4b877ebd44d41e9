"""What a run reports: machine facts, result rows, the markdown table, the README section."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
MAIN_README = ROOT / "README.md"
START_MARK = "<!-- results:start -->"
END_MARK = "<!-- results:end -->"
PACKAGES = (
    "taskd",
    "uvicorn",
    "starlette",
    "websockets",
    "httptools",
    "uvloop",
    "orjson",
    "jsonrpcserver",
    "pydantic",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "apscheduler",
    "croniter",
    "celery",
    "kombu",
    "redis",
    "py-spy",
)


@dataclass
class Row:
    """One line of the results table."""

    id: str
    scenario: str
    figure: str
    comparison: str
    target: str
    passed: bool | None  # None: informational, or not measured
    values: dict[str, Any]
    error: str | None = None

    @property
    def result(self) -> str:
        """PASS, FAIL, info or error, as shown in the table."""
        if self.error is not None:
            return "error"
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        """The row as stored in latest.json."""
        return asdict(self) | {"result": self.result}


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, so it can be stored as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def number(value: float, digits: int = 0) -> str:
    """A number with thousands separators; "n/a" for NaN or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def ms(value: float) -> str:
    """Milliseconds with sensible precision."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def _read(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text()
    return ""


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    return ""


def machine_facts() -> dict[str, Any]:
    """CPU, memory, kernel, Python, package versions and the git commit."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    wrk = ""
    with contextlib.suppress(OSError):
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": versions,
        "wrk": wrk.splitlines()[0] if wrk else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results table with a line saying where and when it was measured."""
    machine = meta["machine"]
    load = meta["load_average"]
    dirty = " (with uncommitted changes)" if machine["git_dirty"] else ""
    lines = [
        f"Measured {meta['finished_at']} ({meta['mode']} run, {meta['duration_s']:.0f} s) on "
        f"{machine['cpu_count']} x {machine['cpu_model']}, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, "
        f"commit {machine['git_commit'][:10]}{dirty}; "
        f"load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end; "
        f"HTTP load from {meta['http_load_generator']}.",
        "",
        "| id | scenario | figure | comparison | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        figure = row.figure if row.error is None else f"not measured: {row.error}"
        cells = [row.id, row.scenario, figure, row.comparison, row.target, row.result]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(table: str, path: Path = README, section: str = "results") -> None:
    """Replace the ``<!-- section:start -->`` ... ``end`` part of a README with ``table``."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text()
    head, found, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise SystemExit(f"{path} has no {start} ... {end} section")
    path.write_text(f"{head}{start}\n{table}{end}{tail}")
