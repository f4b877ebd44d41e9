"""The dashboard in a real browser (Debian's chromium) against a real server and agents."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from taskd.roles import readonly_limits
from tests.helpers import Server, add_token, hold_port, scaled, wait_for
from tests.ui.conftest import log_in, real_agent, screenshot_path, summary

pytestmark = pytest.mark.slow
TIMEOUT_MS = scaled(15) * 1000


async def test_login_form_and_fragment_login(ui_server: Server, page: Page) -> None:
    """A wrong token is refused on the form, the right one opens the fleet; a credential
    in the URL fragment logs in and is removed from the address bar and history."""
    await page.goto(f"{ui_server.url}ui/")
    await page.fill("#login input[name=token]", "nobody:wrong")
    await page.click("#login button")
    await expect(page.locator("#login .bad")).to_contain_text("Invalid token")
    await page.fill("#login input[name=token]", ui_server.super_token)
    await page.click("#login button")
    await expect(page.locator("#nav")).to_be_visible()
    await expect(page.locator("#who")).to_contain_text(ui_server.super_token.split(":")[0])
    fresh = await page.context.browser.new_context()  # type: ignore[union-attr]
    other = await fresh.new_page()
    await other.goto(f"{ui_server.url}ui/#login={ui_server.super_token}")
    await expect(other.locator("#nav")).to_be_visible()
    assert ui_server.super_token not in other.url
    assert ui_server.super_token.split(":")[1] not in await other.evaluate("location.href")
    cookies = await fresh.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("taskd_session", True, "Strict")
    ]
    assert await other.evaluate("document.cookie") == ""  # HttpOnly: out of the page's reach
    await fresh.close()


async def test_fleet_lists_agents_with_live_metrics(
    ui_server: Server, page: Page, tmp_path: Path
) -> None:
    """A real agent's host name and figures show in the fleet, updated by the live feed;
    an agent that stopped reporting shows as offline and a full disk is flagged."""
    quiet = str(uuid.uuid4())
    old = time.time_ns() // 1_000_000 - 600_000
    await ui_server.su(
        "agent_report_dynamic_summary",
        summary(quiet, old, cpu_usage=10, total_space=1000, available_space=20),
    )
    async with real_agent(ui_server, tmp_path / "state") as agent:
        await wait_for(
            lambda: ui_server.su("agent_static_data_multi_last_query", [agent], ["system"]),
            timeout=15,
        )
        await log_in(page, ui_server, ui_server.super_token)
        row = page.locator(f".fleet-row[data-uuid='{agent}']")
        await expect(row.locator(".c-state")).to_have_text("online", timeout=TIMEOUT_MS)
        await expect(row.locator(".c-cpu")).to_contain_text("%")
        await expect(row.locator(".c-mem")).to_contain_text("GiB")
        first = await row.locator(".c-seen").text_content()
        host = (await ui_server.su("agent_static_data_multi_last_query", [agent], ["system"]))[0]
        await expect(row.locator(".c-name")).to_have_text(host["system"]["system_host_name"])
        stale = page.locator(f".fleet-row[data-uuid='{quiet}']")
        await expect(stale.locator(".c-state")).to_have_text("offline")
        await expect(stale.locator(".c-disk")).to_have_class("c-disk full bad")
        await expect(page.locator("#banner-offline")).to_have_text("1 offline")
        await expect(page.locator("#banner-full")).to_contain_text("1 disk over 90 %")
        # problems first: the offline agent with the full disk leads the list
        assert (
            await page.locator(".fleet-rows .fleet-row").first.get_attribute("data-uuid") == quiet
        )
        await page.wait_for_timeout(1500)
        assert await row.locator(".c-seen").text_content() in ("0 s ago", "1 s ago", first)
        await page.fill("#fleet-search", "no such host")
        await expect(page.locator("#fleet-count")).to_have_text("0 of 2 agents")
        await page.fill("#fleet-search", "")
        await page.select_option("#fleet-filter", "offline")
        await expect(page.locator("#fleet-count")).to_have_text("1 of 2 agents")
        await page.select_option("#fleet-filter", "all")
        await page.screenshot(path=screenshot_path("fleet"))


async def test_agent_page_charts_the_reported_points(ui_server: Server, page: Page) -> None:
    """The agent page's CPU chart holds exactly the summaries reported in the last hour,
    and the 30-day range is answered from the rollups."""
    agent = str(uuid.uuid4())
    now = time.time_ns() // 1_000_000
    times = [now - (12 - i) * 290_000 for i in range(12)]
    for i, at in enumerate(times):
        wave = (i * 7) % 12
        await ui_server.su(
            "agent_report_dynamic_summary",
            summary(
                agent,
                at,
                cpu_usage=100 + 40 * wave,
                used_memory=(4 + wave) << 28,
                available_memory=(12 - wave) << 28,
                total_memory=1 << 32,
                used_swap=wave << 20,
                total_swap=1 << 30,
                load_one=5 * wave,
                load_five=3 * wave,
                load_fifteen=2 * wave,
                uptime=86_400 + i * 290,
                boot_time=now // 1000 - 86_400,
                process_count=150 + wave,
                total_space=1 << 34,
                available_space=(1 << 33) - i * (1 << 26),
                read_speed=1000 * wave,
                write_speed=700 * wave,
                tcp_connections=40 + wave,
                udp_connections=4,
                total_received=(1 << 30) + i * (1 << 24),
                total_transmitted=(1 << 29) + i * (1 << 23),
                receive_speed=1000 * wave,
                transmit_speed=500 * wave,
            ),
        )
    await ui_server.su(
        "agent_report_static",
        {
            "uuid": agent,
            "time": now,
            "data_hash": [1, 2, 3],
            "cpu": {"physical_cores": 4, "logical_cores": 8, "per_core": []},
            "system": {
                "system_host_name": "charted-host",
                "arch": "x86_64",
                "system_os_long_version": "Debian GNU/Linux 12 (bookworm)",
            },
            "gpu": [],
        },
    )
    await log_in(page, ui_server, ui_server.super_token, f"#/agent/{agent}")
    cpu = page.locator("#charts .chart[data-chart='CPU']")
    await expect(cpu).to_have_attribute("data-points", "12", timeout=TIMEOUT_MS)
    await expect(page.locator("#facts")).to_contain_text("charted-host")
    await expect(page.locator("#charts .chart")).to_have_count(13)
    await page.wait_for_timeout(300)
    await page.screenshot(path=screenshot_path("agent"), full_page=True)
    await page.click("#ranges button[data-range='30d']")
    await expect(page.locator("#charts")).to_have_attribute("data-resolution", "1h")
    hours = {at // 3_600_000 for at in times}
    await expect(cpu).to_have_attribute("data-points", str(len(hours)))


async def test_a_task_run_from_the_page_shows_its_result(
    ui_server: Server, page: Page, tmp_path: Path
) -> None:
    """Running ``execute`` on a real agent from the form shows its output as text."""
    async with real_agent(ui_server, tmp_path / "state", allow_execute=True) as agent:
        await log_in(page, ui_server, ui_server.super_token, f"#/agent/{agent}")
        await page.select_option("#run-kind", "execute")
        await page.fill("#run-form input[name=cmd]", "echo")
        await page.fill("#run-form input[name=args]", "<b>hello</b> from-the-page")
        await page.click("#run-form button[type=submit]")
        output = page.locator("#run-result pre.result")
        await expect(output).to_contain_text("<b>hello</b> from-the-page", timeout=TIMEOUT_MS)
        assert await page.locator("#run-result b").count() == 0  # shown, not parsed
        await expect(page.locator("#recent")).to_contain_text("execute echo")


async def test_the_terminal_echoes_a_command(ui_server: Server, page: Page, tmp_path: Path) -> None:
    """The terminal opens a shell on a real agent through /ui/terminal and shows a
    command's output."""
    async with real_agent(ui_server, tmp_path / "state", allow_web_shell=True) as agent:
        await log_in(page, ui_server, ui_server.super_token, f"#/agent/{agent}")
        await page.click("#terminal-open")
        await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=TIMEOUT_MS)
        await page.locator("#terminal-screen").click()
        await page.keyboard.type("echo ui-$((6*7))\n")
        await expect(page.locator("#terminal-screen .xterm-rows")).to_contain_text(
            "ui-42", timeout=TIMEOUT_MS
        )


async def test_a_probe_chart_shows_results_and_failures(
    ui_server: Server, page: Page, tmp_path: Path
) -> None:
    """A tcp_ping cron against a listening port, then (edited from the page) against a
    closed one: its chart shows the latencies and marks the failed probes."""
    async with real_agent(ui_server, tmp_path / "state") as agent:
        await ui_server.su(
            "crontab_create",
            "web",
            "* * * * * *",
            {"agent": [[agent], {"task": {"tcp_ping": f"127.0.0.1:{ui_server.port}"}}]},
        )

        async def results(failed: bool) -> Any:
            condition: list[Any] = [
                {"cron_source": "web"},
                "is_failure" if failed else "is_success",
            ]
            return len(await ui_server.su("task_query_task", {"condition": condition})) >= 2

        await wait_for(lambda: results(False), timeout=20)
        await log_in(page, ui_server, ui_server.super_token, "#/probes/web")
        await expect(page.locator("#cron-list")).to_contain_text("* * * * * *")
        with hold_port() as closed:
            editor = page.locator("#cron-edit textarea")
            await editor.fill(
                f'{{"agent": [["{agent}"], {{"task": {{"tcp_ping": "127.0.0.1:{closed}"}}}}]}}'
            )
            await page.click("#cron-edit button")
            await expect(page.locator("#cron-edit")).to_contain_text("saved")
            await wait_for(lambda: results(True), timeout=20)
        await page.click("#cron-detail button[data-range='1h']")
        chart = page.locator("#probe-chart")
        await expect(chart).not_to_have_attribute("data-failures", "0", timeout=TIMEOUT_MS)
        assert int(await chart.get_attribute("data-results") or 0) >= 4
        assert int(await chart.get_attribute("data-failed-points") or 0) >= 2
        await expect(chart.locator("canvas")).to_have_count(1)
        await page.screenshot(path=screenshot_path("probes"), full_page=True)


async def test_a_read_only_token_sees_no_write_controls_and_is_refused(
    ui_server: Server, page: Page
) -> None:
    """A read-only session gets no run form, terminal, cron toggle or editor; a write
    forged from its page through /ui/api is refused and changes nothing."""
    agent = str(uuid.uuid4())
    await ui_server.su(
        "agent_report_dynamic_summary", summary(agent, time.time_ns() // 1_000_000, cpu_usage=1)
    )
    await ui_server.su(
        "crontab_create", "probe", "0 0 * * * *", {"agent": [[agent], {"task": "version"}]}
    )
    token = await add_token(ui_server, readonly_limits())
    await log_in(page, ui_server, token, "#/probes")
    await expect(page.locator("#cron-list")).to_contain_text("probe")
    await expect(page.locator("#cron-detail h2")).to_contain_text("probe")
    assert await page.locator("#cron-list button.toggle").count() == 0
    assert await page.locator("#cron-edit").count() == 0
    await page.goto(f"{ui_server.url}ui/#/agent/{agent}")
    await expect(page.locator("#recent table")).to_be_visible(timeout=TIMEOUT_MS)
    await expect(page.locator("#run")).to_be_hidden()
    await expect(page.locator("#terminal")).to_be_hidden()
    reply = await page.evaluate(
        """async () => {
            const { rpc } = await import("./static/js/api.js");
            try { await rpc("crontab_set_enable", ["probe", false]); return "accepted"; }
            catch (error) { return error.code; }
        }"""
    )
    assert reply == 102
    assert (await ui_server.su("crontab_get"))[0]["enable"] is True


async def test_hostile_hostnames_render_as_text(ui_server: Server, page: Page) -> None:
    """A host name carrying markup shows literally in the fleet and the agent page, and
    its script never runs (the page fixture fails the test on any dialog)."""
    agent = str(uuid.uuid4())
    evil = "<img src=x onerror=alert(1)>"
    now = time.time_ns() // 1_000_000
    await ui_server.su("agent_report_dynamic_summary", summary(agent, now, cpu_usage=5))
    await ui_server.su(
        "agent_report_static",
        {
            "uuid": agent,
            "time": now,
            "data_hash": [9],
            "cpu": {"physical_cores": 1, "logical_cores": 1, "per_core": []},
            "system": {"system_host_name": evil, "system_os_long_version": evil},
            "gpu": [],
        },
    )
    await log_in(page, ui_server, ui_server.super_token)
    row = page.locator(f".fleet-row[data-uuid='{agent}']")
    await expect(row.locator(".c-name")).to_have_text(evil, timeout=TIMEOUT_MS)
    await page.goto(f"{ui_server.url}ui/#/agent/{agent}")
    await expect(page.locator("#facts")).to_contain_text(evil)
    assert await page.locator("img[src=x]").count() == 0
    await page.wait_for_timeout(500)


async def test_the_demo_prints_a_link_that_logs_straight_in(
    browser: Browser, tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """`taskd demo` (what `make run` starts) prints a dashboard link carrying the
    credential in its fragment; opening it shows the demo's agent online, and the
    credential is in no log."""
    port = held_ports()
    process = subprocess.Popen(
        [sys.executable, "-m", "taskd", "demo", "--dir", "var", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        link = ""
        deadline = time.monotonic() + scaled(90)
        assert process.stdout is not None
        while not link and time.monotonic() < deadline:
            line = await asyncio.to_thread(process.stdout.readline)
            if not line:
                break
            if line.startswith("dashboard: open "):
                link = line.split("open ", 1)[1].strip()
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/ui/#login=\w+:\w+", link), link
        secret = link.rsplit(":", 1)[1]
        page = await browser.new_page()
        await page.goto(link)
        await expect(page.locator(".fleet-rows .fleet-row .c-state").first).to_have_text(
            "online", timeout=TIMEOUT_MS
        )
        assert secret not in page.url
        await page.close()
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.to_thread(process.wait, scaled(30))
        if process.stdout is not None:
            process.stdout.close()
    for log in (tmp_path / "var").glob("*.log"):
        assert secret not in log.read_text()


async def test_the_tasks_page_queries_and_shows_results_readably(
    ui_server: Server, page: Page, tmp_path: Path
) -> None:
    """Tasks filtered by kind come newest first, an HTTP result as its status and
    header table, a failure as its message."""
    async with real_agent(ui_server, tmp_path / "state", allow_http_request=True) as agent:
        request = {"http_request": {"url": f"{ui_server.url}healthz", "method": "GET"}}
        done = await ui_server.su("task_create_task_blocking", agent, request, 15000)
        assert done["success"], done
        failed = await ui_server.su(
            "task_create_task_blocking", agent, {"execute": {"cmd": "true", "args": []}}, 15000
        )
        assert not failed["success"]  # execute is not allowed on this agent
        await log_in(page, ui_server, ui_server.super_token, "#/tasks")
        results = page.locator("#task-results")
        await expect(results).to_contain_text("2 tasks, newest first", timeout=TIMEOUT_MS)
        first = results.locator("tbody > tr").first
        await expect(first).to_contain_text(str(failed["task_id"]))
        await expect(first.locator("pre.result.bad")).to_contain_text(failed["error_message"])
        await page.select_option("#task-form select[name=type]", "http_request")
        await page.click("#task-form button[type=submit]")
        await expect(results).to_contain_text("1 task, newest first")
        await expect(results).to_contain_text("HTTP 200")
        header = results.locator("td", has_text=re.compile(r"^content-type$"))
        await expect(header).to_have_count(1)
