"""The benchmark driver: every scenario of the performance table, side by side in one run.

    python -m benchmarks.run            # full run, a few minutes; rewrites the README table
    python -m benchmarks.run --quick    # every scenario at small scale, about 1.5 minutes
    python -m benchmarks.run --only P1,P3 --results-dir /tmp/x --no-readme

It starts everything itself as separate processes on free loopback ports:
taskd servers over fresh SQLite files or fresh PostgreSQL databases, load
agents, callers, the Starlette echo floor, a Celery worker on Redis, the real
``taskd agent``. It writes ``benchmarks/results/latest.json`` and ``latest.md``
(``quick.*`` for a quick run, ``*-partial.*`` with ``--only``) with every figure, target,
pass/fail and the machine facts, and prints the markdown table. Every child is
stopped on exit, whatever happened: Ctrl-C, SIGTERM and SIGHUP (to this
driver, or to ``make bench``) unwind alike, write no results and exit with
128 + the signal's number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks import dashboard, monitoring, scenarios, shutdown
from benchmarks.harness import Run
from benchmarks.procs import BenchError, Children, raise_open_files_limit, work_directory
from benchmarks.report import (
    MAIN_README,
    ROOT,
    Row,
    finite,
    machine_facts,
    markdown,
    update_readme,
)
from benchmarks.scale import FULL, QUICK
from benchmarks.services import drop_database

SCENARIOS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10")
"""P10 also measures P11 (the dashboard's two targets share one seeded server and browser)."""


def measure(run: Run, scenario_id: str, body: Callable[[], None]) -> None:
    """Run one scenario; if it cannot be measured, its rows become one error row."""
    before = len(run.rows)
    started = time.monotonic()
    print(f"[bench] {scenario_id} ...", file=sys.stderr, flush=True)
    try:
        body()
    except (BenchError, OSError, httpx.HTTPError, KeyError, ValueError) as exc:
        message = str(exc).strip() or type(exc).__name__
        print(f"[bench] {scenario_id} failed: {message}", file=sys.stderr, flush=True)
        if not isinstance(exc, BenchError):
            traceback.print_exc()
        del run.rows[before:]
        error = message.splitlines()[0]
        run.rows.append(Row(scenario_id, "could not be measured", "", "", "", False, {}, error))
        run.data.setdefault("errors", {})[scenario_id] = message
    run.data.setdefault("seconds", {})[scenario_id] = round(time.monotonic() - started, 1)


def measure_all(run: Run, only: list[str]) -> None:
    """Celery first (P2 and P3 compare with it), then the selected scenarios in order."""
    if "P1" in only:
        measure(run, "P1", lambda: scenarios.p1(run))
    peer: dict[str, Any] | None = None
    peer_error: str | None = None
    if "P2" in only or "P3" in only:
        print("[bench] Celery ...", file=sys.stderr, flush=True)
        try:
            peer = scenarios.celery_peer(run)
        except BenchError as exc:
            peer_error = str(exc).strip().splitlines()[0]
            print(f"[bench] Celery not measured: {exc}", file=sys.stderr, flush=True)
        run.data["celery"] = peer if peer is not None else {"error": peer_error}
    if "P2" in only:
        measure(run, "P2", lambda: scenarios.p2(run, peer, peer_error))
        measure(run, "P2", lambda: scenarios.p2_cluster(run))
    if "P3" in only:
        measure(run, "P3", lambda: scenarios.p3(run, peer, peer_error))
    for scenario_id, body in (("P4", scenarios.p4), ("P5", scenarios.p5), ("P6", scenarios.p6)):
        if scenario_id in only:
            measure(run, scenario_id, functools.partial(body, run))
    for scenario_id, body in (("P7", monitoring.p7), ("P8", monitoring.p8), ("P9", monitoring.p9)):
        if scenario_id in only:
            measure(run, scenario_id, functools.partial(body, run))
    if "P10" in only:
        measure(run, "P10", lambda: dashboard.p10_p11(run))


def cleanup(run: Run) -> None:
    """Stop every child and drop every database still left."""
    run.children.stop_all()
    for name in list(run.pg_databases):
        with contextlib.suppress(BenchError):
            asyncio.run(drop_database(name))


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, write the results, print the table; 1 if a scenario failed to run."""
    parser = argparse.ArgumentParser(description="taskd benchmarks: every scenario in one run")
    parser.add_argument("--quick", action="store_true", help="every scenario at small scale")
    parser.add_argument("--only", help="comma-separated scenario ids (P1..P6)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-readme", action="store_true", help="leave the READMEs as they are")
    parser.add_argument("--http-load", choices=("auto", "wrk", "httpload"), default="auto")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the server during P2, P3 and P4"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    only = [s.strip().upper() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    http_load = args.http_load
    if http_load == "auto":
        http_load = "wrk" if shutil.which("wrk") else "httpload"

    shutdown.install()
    open_files = raise_open_files_limit()
    scale = QUICK if args.quick else FULL
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    started = time.monotonic()
    try:
        with work_directory("taskd-bench-", keep=args.keep) as workdir:
            run = Run(scale, workdir, Children(workdir), http_load)
            if args.profile:
                run.profile_dir = results_dir / "profiles"
                run.profile_dir.mkdir(exist_ok=True)
            try:
                measure_all(run, only)
            finally:
                with shutdown.held():  # a signal now waits until everything is cleaned up
                    cleanup(run)
    except shutdown.Interrupted as exc:
        return shutdown.stopped("bench", exc)
    meta = {
        "mode": "quick" if args.quick else "full",
        "scenarios_run": only,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine_facts(),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "open_files_limit": open_files,
        "http_load_generator": http_load,
        "celery": {
            "pools": [f"-P {pool} -c {n}" for pool, n in scenarios.celery_pools(scale == QUICK)],
            "producers": scale.p2_callers,
            "broker": scenarios.REDIS_URL,
        },
        "scale": asdict(scale),
        "work_dir": str(run.workdir) if args.keep else None,
    }
    table = markdown(run.rows, meta)
    # a run of some scenarios only never replaces the results of a whole run
    stem = ("quick" if args.quick else "latest") + ("" if only == list(SCENARIOS) else "-partial")
    document = meta | {"rows": [row.as_dict() for row in run.rows], "data": run.data}
    (results_dir / f"{stem}.json").write_text(
        json.dumps(finite(document), indent=2, default=str, allow_nan=False) + "\n"
    )
    (results_dir / f"{stem}.md").write_text(table)
    if stem == "latest" and not args.no_readme:
        update_readme(table)
        update_readme(table, MAIN_README, "benchmarks")
    print(table)
    return 1 if any(row.error for row in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
