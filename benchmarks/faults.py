"""The fault and abuse suite: every scenario R1..R6, a JSON report and a markdown table.

    python -m benchmarks.faults [--quick] [--only R1,R4] [--results-dir DIR] [--keep]

A full run (``make faults``) injects every fault at full scale and holds
scenarios to their timing targets as well as their invariants; ``--quick``
runs the short CI version (invariants only). Results go to
``benchmarks/results/faults.json`` and ``faults.md`` (``faults-quick.*``); a full
run of every scenario also rewrites the table in the README. Ctrl-C, SIGTERM
and SIGHUP (to this driver, or to ``make faults``) stop the running scenario
and all its processes, write no results and exit with 128 + the signal.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks import shutdown
from benchmarks.faults_abuse import r4_adversarial_input, r5_unauthorized
from benchmarks.faults_alerts import r7_alerts
from benchmarks.faults_common import Outcome
from benchmarks.faults_crash import r1_server_kill, r2_connection_cut
from benchmarks.faults_database import r6_database_restart
from benchmarks.faults_storm import r3_reconnect_storm
from benchmarks.procs import raise_open_files_limit, work_directory
from benchmarks.report import MAIN_README, ROOT, update_readme
from benchmarks.scale import FULL, QUICK, Scale

Scenario = Callable[[Scale, Path], Awaitable[Outcome]]


def scenarios(scale: Scale) -> dict[str, Scenario]:
    """Every scenario of a run, by id, in the order they run."""
    table: dict[str, Scenario] = {}
    for database in scale.r1_databases:
        name = "R1" if database == "sqlite" else "R1-pg"

        async def r1(scale: Scale, workdir: Path, database: str = database) -> Outcome:
            return await r1_server_kill(scale, workdir, database)

        table[name] = r1
    table["R2"] = r2_connection_cut
    table["R3"] = r3_reconnect_storm
    for database in scale.r4_databases:

        async def r4(scale: Scale, workdir: Path, database: str = database) -> Outcome:
            return await r4_adversarial_input(scale, workdir, database)

        table["R4" if database == "sqlite" else "R4-pg"] = r4
    table["R5"] = r5_unauthorized
    table["R6"] = r6_database_restart
    table["R7"] = r7_alerts
    return table


def markdown(outcomes: list[Outcome]) -> str:
    """The results as a markdown table."""
    lines = [
        "| id | scenario | load | faults injected | checked | figures | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        checked = "; ".join(
            ("" if c.passed else "**FAILED:** ") + c.name + (" (target)" if c.target else "")
            for c in o.checks
        )
        if o.error:
            checked = f"**ERROR:** {o.error}" + (f"; {checked}" if checked else "")
        verdict = "pass" if o.passed else "**FAIL**"
        cells = [o.scenario, o.title, o.load, o.faults, checked, headline(o), verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "R1": (
        ("creates_acknowledged", "{:,} creates acknowledged"),
        ("uploads_acknowledged", "{:,} results acknowledged"),
        ("completed_by_agents", "{:,} completed"),
        ("failed_by_server", "{:,} failed by the reaper"),
        ("uploads_sent_more_than_once", "{:,} re-uploaded"),
        ("slowest_restart_s", "up again in {} s"),
        ("lost", "{} lost"),
    ),
    "R2": (("summary", "{}"),),
    "R3": (
        ("all_resubscribed_after_ready_s", "all resubscribed {} s after the server was up"),
        ("query_p99_ms", "task_query_task p99 {} ms"),
        ("max_attempts_per_agent", "≤ {} backoff attempts per agent"),
        ("refused_with_retry_hint", "{:,} handshakes refused with a retry hint"),
        ("flush_query_p99_ms", "p99 {} ms while the backlogs flush"),
        ("backlog_summaries_acked_after_restart", "{:,} buffered summaries stored after it"),
        ("summaries_acked", "{:,} summaries acknowledged"),
        ("summary_rows", "{:,} summary rows"),
        ("first_retry_spread_s", "first retries spread over {} s"),
    ),
    "R4": (
        ("inputs", "{:,} inputs"),
        ("malformed_replies", "{} malformed replies"),
        ("peak_rss_mb", "peak RSS {} MiB"),
        ("probe_p99_ms", "normal client p99 {} ms"),
    ),
    "R5": (
        ("attempts", "{:,} unauthorized attempts"),
        ("unauthorized_successes", "{} successes"),
    ),
    "R6": (
        ("outage_calls", "{:,} calls during the outage"),
        ("slowest_outage_call_ms", "slowest {} ms"),
        ("recovered_after_s", "recovered {} s after the database"),
        ("lost", "{} acknowledged lost"),
    ),
    "R7": (
        ("evaluation_cpu_pct", "idle evaluation {} % of a core"),
        ("idle_server_cpu_pct", "server {} % in all"),
        ("events_recorded_after_s", "all events recorded {} s after the drop"),
        ("messages", "{} message(s) per channel"),
    ),
}


def headline(outcome: Outcome) -> str:
    """The few figures that matter, in words."""
    figures = outcome.figures
    parts = []
    for key, text in HEADLINES.get(outcome.scenario.split("-")[0], ()):
        if figures.get(key) is not None:
            parts.append(text.format(figures[key]))
    parts.append(f"{figures.get('duration_s', 0)} s")
    return ", ".join(parts)


def machine() -> dict[str, Any]:
    """Where the run happened."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "commit": commit,
        "load_average": load,
    }


async def run(scale: Scale, only: set[str] | None, workdir: Path) -> list[Outcome]:
    """Run the chosen scenarios one after the other; a stop signal cancels the one running."""
    outcomes = []
    async with shutdown.cancelled_on_signal():
        for name, scenario in scenarios(scale).items():
            if only and name not in only:
                continue
            print(f"[faults] {name} ...", file=sys.stderr, flush=True)
            directory = workdir / name
            directory.mkdir()
            outcome = await scenario(scale, directory)
            verdict = "pass" if outcome.passed else f"FAIL\n{outcome.explain()}"
            took = outcome.figures.get("duration_s")
            print(f"[faults] {name} ({took} s): {verdict}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit status 1 if any scenario failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short CI version")
    parser.add_argument("--only", help="comma-separated scenario ids (R1,R1-pg,R2,...)")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    unknown = (only or set()) - set(scenarios(scale))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    shutdown.install()
    raise_open_files_limit()
    started = time.time()
    try:
        with work_directory("taskd-faults-", keep=args.keep) as workdir:
            outcomes = asyncio.run(run(scale, only, workdir))
    except shutdown.Interrupted as exc:
        return shutdown.stopped("faults", exc)
    table = markdown(outcomes)
    report = {
        "scale": scale.name,
        "started": started,
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "passed": all(o.passed for o in outcomes),
        "scenarios": [o.to_json() for o in outcomes],
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = "faults" if scale is FULL else "faults-quick"
    options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    (results / f"{stem}.json").write_bytes(orjson.dumps(report, option=options))
    (results / f"{stem}.md").write_text(table)
    if scale is FULL and only is None:
        update_readme(table, MAIN_README, "faults")
    print(table)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
