"""The dashboard's Alerts page in a real browser against a real server and a real agent."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from taskd.roles import readonly_limits
from tests.helpers import Server, add_token, scaled, wait_for
from tests.ui.conftest import log_in, real_agent, screenshot_path

pytestmark = pytest.mark.slow
TIMEOUT_MS = scaled(20) * 1000
EVIL = "<img src=x onerror=alert(1)>"
NONE = "\u2013"  # what the page shows for a time not yet known


def offline_rule(name: str, agent: str, grace_ms: int, channels: list[str]) -> dict[str, Any]:
    """An agent_offline rule on one agent."""
    return {
        "name": name,
        "kind": "agent_offline",
        "targets": [agent],
        "params": {"grace_ms": grace_ms},
        "channels": channels,
    }


async def _host_name(server: Server, agent: str) -> str | None:
    rows = await server.su("agent_static_data_multi_last_query", [agent], ["system"])
    return rows[0]["system"]["system_host_name"] if rows else None


async def test_an_offline_agent_fires_then_resolves_on_the_page(
    ui_server: Server, page: Page, tmp_path: Path
) -> None:
    """A real agent stopped past its rule's grace shows as firing (with the nav badge),
    the filters narrow the list, the agent's return resolves it with its downtime, and a
    rule name carrying markup shows as text in the event and its message."""
    agent = str(uuid.uuid4())
    state = tmp_path / "state"
    await ui_server.su("alert_channel_create", "ops", "json://ops:s3cr3t-pw@127.0.0.1:1/hook")
    await ui_server.su("alert_rule_create", offline_rule("down", agent, 1500, ["ops"]))
    await ui_server.su("alert_rule_create", offline_rule(EVIL, agent, 1000, []))
    async with real_agent(ui_server, state, agent):
        await wait_for(lambda: _host_name(ui_server, agent), timeout=15)
        host = await _host_name(ui_server, agent)
        await log_in(page, ui_server, ui_server.super_token, "#/alerts")
        await expect(page.locator("#alert-summary")).to_have_text(
            "0 events, newest first; 0 firing", timeout=TIMEOUT_MS
        )
        rules = page.locator("#alert-rules tbody tr")
        await expect(rules).to_have_count(2)
        await expect(rules.filter(has_text="down")).to_contain_text("agent_offline")
        await expect(rules.filter(has_text="down")).to_contain_text("grace_ms 1500")
        channel = page.locator("#alert-channels tbody tr")
        await expect(channel).to_contain_text("json")
        assert "s3cr3t-pw" not in (await channel.text_content() or "")
        await expect(page.locator("#alert-badge")).to_be_hidden()

    # the agent is gone: both rules fire, the page and the badge show it unprompted
    firing = page.locator("#alert-events tr.alert-event[data-state=firing]")
    await expect(firing).to_have_count(2, timeout=TIMEOUT_MS)
    await expect(page.locator("#alert-badge")).to_have_text("2", timeout=TIMEOUT_MS)
    down = page.locator("#alert-events tr.alert-event", has_text="down")
    await expect(down.locator(".a-state")).to_have_text("FIRING")
    await expect(down.locator(".a-agent a")).to_have_text(host or agent)
    assert await down.locator(".a-agent a").get_attribute("title") == agent
    await expect(down.locator(".a-resolved")).to_have_text(NONE)
    await expect(down.locator(".a-duration")).to_contain_text("so far")
    await expect(down.locator(".a-message")).to_contain_text(f"Agent {agent} is offline")
    hostile = page.locator("#alert-events tr.alert-event").filter(
        has=page.locator(".a-rule", has_text=EVIL)
    )
    await expect(hostile.locator(".a-rule")).to_have_text(EVIL)
    await expect(hostile.locator(".a-message")).to_contain_text(f"(rule '{EVIL}'")
    assert await page.locator("img[src=x]").count() == 0

    # filters: by state, by rule, by agent
    await page.select_option("#alert-state", "is_resolved")
    await expect(page.locator("#alert-summary")).to_have_text("0 events, newest first; 0 firing")
    await page.select_option("#alert-state", "is_firing")
    await expect(page.locator("#alert-summary")).to_have_text("2 events, newest first; 2 firing")
    await page.select_option("#alert-rule", "down")
    await expect(page.locator("#alert-events tr.alert-event")).to_have_count(1)
    await expect(page.locator("#alert-events .a-rule")).to_have_text("down")
    await page.select_option("#alert-rule", index=0)
    await page.fill("#alert-agent", str(uuid.uuid4()))
    await page.click("#alert-form button[type=submit]")
    await expect(page.locator("#alert-summary")).to_have_text("0 events, newest first; 0 firing")
    await page.fill("#alert-agent", host or agent)
    await page.click("#alert-form button[type=submit]")
    await expect(page.locator("#alert-summary")).to_have_text("2 events, newest first; 2 firing")
    await page.fill("#alert-agent", "")
    await page.select_option("#alert-state", index=0)

    # the agent returns: the events resolve, with the downtime, and the badge goes
    async with real_agent(ui_server, state, agent):
        resolved = page.locator("#alert-events tr.alert-event[data-state=resolved]")
        await expect(resolved).to_have_count(2, timeout=TIMEOUT_MS)
        await expect(page.locator("#alert-badge")).to_be_hidden(timeout=TIMEOUT_MS)
        [event] = await ui_server.su("alert_event_query", {"condition": [{"rule": "down"}]})
        seconds = (event["resolved_at"] - event["started_at"]) // 1000
        await expect(down.locator(".a-state")).to_have_text("resolved")
        await expect(down.locator(".a-duration")).to_have_text(f"{seconds} s")
        await expect(down.locator(".a-resolved")).not_to_have_text(NONE)

    # gone again: a new firing event on top of the resolved ones
    await expect(firing).to_have_count(2, timeout=TIMEOUT_MS)
    await expect(page.locator("#alert-events tr.alert-event")).to_have_count(4)
    states = await page.locator("#alert-events tr.alert-event").evaluate_all(
        "rows => rows.map(r => r.dataset.state)"
    )
    assert states == ["firing", "firing", "resolved", "resolved"]
    await expect(page.locator("#alert-badge")).to_have_text("2", timeout=TIMEOUT_MS)
    assert await page.locator("img[src=x]").count() == 0
    await page.screenshot(path=screenshot_path("alerts"), full_page=True)


async def test_a_token_without_alert_read_sees_no_alerts_and_is_refused(
    ui_server: Server, page: Page
) -> None:
    """A read-only token (no alert permission) gets no Alerts link and /ui/api refuses it
    alert_event_query; the same token plus {"alert": "read"} gets the link."""
    token = await add_token(ui_server, readonly_limits())
    await log_in(page, ui_server, token)
    await expect(page.locator("#nav a[data-page=tasks]")).to_be_visible()
    await page.wait_for_timeout(500)  # the permission answer has come back by now
    await expect(page.locator("#nav a[data-page=alerts]")).to_be_hidden()
    reply = await page.evaluate(
        """async () => {
            const { rpc } = await import("./static/js/api.js");
            try { await rpc("alert_event_query", [{ condition: [] }]); return "accepted"; }
            catch (error) { return [error.code, error.message]; }
        }"""
    )
    assert reply[0] == 102 and "alert.read" in reply[1], reply
    await page.goto(f"{ui_server.url}ui/#/alerts")
    await expect(page.locator("#alert-events .bad")).to_contain_text("alert.read")

    reader = await add_token(
        ui_server,
        [*readonly_limits(), {"scopes": ["global"], "permissions": [{"alert": "read"}]}],
    )
    other = await page.context.browser.new_context()  # type: ignore[union-attr]
    second = await other.new_page()
    await log_in(second, ui_server, reader)
    await expect(second.locator("#nav a[data-page=alerts]")).to_be_visible(timeout=TIMEOUT_MS)
    await second.click("#nav a[data-page=alerts]")
    await expect(second.locator("#alert-summary")).to_have_text(
        "0 events, newest first; 0 firing", timeout=TIMEOUT_MS
    )
    await other.close()
