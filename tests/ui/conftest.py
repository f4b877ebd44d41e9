"""Fixtures of the dashboard tests: a real server, a real agent, Debian's chromium."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from taskd.config import parse_agent_config
from taskd.roles import agent_limits
from tests.agent.test_client import running_agent
from tests.helpers import (
    Server,
    add_token,
    make_settings,
    running_server,
    tmp_sqlite_url,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(
    os.environ.get("TASKD_SCREENSHOTS") or Path(tempfile.gettempdir()) / "taskd-screenshots"
)
"""Where the pages' screenshots go: the README's pictures are refreshed with
``TASKD_SCREENSHOTS=docs/screenshots pytest tests/ui``; other runs leave the checkout alone."""


@pytest.fixture
async def ui_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A real taskd server over a SQLite file (the browser tests' server)."""
    async with running_server(make_settings(tmp_sqlite_url(tmp_path))) as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless chromium from Debian's package, driven by Playwright."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page that fails the test on any script error or dialog."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    opened = await context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    try:
        yield opened
    finally:
        await context.close()
    assert not problems, problems


async def log_in(page: Page, server: Server, token: str, where: str = "#/fleet") -> None:
    """Log the page in through the URL fragment, then go to ``where``."""
    await page.goto(f"{server.url}ui/#login={token}")
    await page.wait_for_selector("#nav:not([hidden])")
    if where != "#/fleet":
        await page.goto(f"{server.url}ui/{where}")


@contextlib.asynccontextmanager
async def real_agent(
    server: Server, state: Path, agent_uuid: str | None = None, **allow: bool
) -> AsyncIterator[str]:
    """A real taskd agent reporting its host every 200 ms; yields its UUID."""
    agent_uuid = agent_uuid or str(uuid.uuid4())
    token = await add_token(server, agent_limits(agent_uuid))
    flags = "".join(f"{name} = {str(value).lower()}\n" for name, value in allow.items())
    settings = parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\n'
        "dynamic_summary_report_interval_ms = 200\n"
        "dynamic_report_interval_ms = 1000\n"
        f'[[server]]\nname = "s"\nws_url = "{server.ws_url}"\ntoken = "{token}"\n'
        f"{flags}"
    )
    async with running_agent(settings, state):
        await wait_for(lambda: _connected(server, agent_uuid), timeout=15)
        yield agent_uuid


async def _connected(server: Server, agent_uuid: str) -> bool:
    return bool(server.service.hub.is_connected(agent_uuid))


def screenshot_path(name: str) -> Path:
    """Where a page's screenshot goes (see SCREENSHOTS)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"


def summary(agent_uuid: str, time_ms: int, **figures: Any) -> dict[str, Any]:
    """A NodeGet-format summary with the given figures."""
    return {"uuid": agent_uuid, "time": time_ms, **figures}
