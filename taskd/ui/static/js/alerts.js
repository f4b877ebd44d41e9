// Alerts: the events (newest first, firing and resolved told apart at a glance) with
// filters by state, rule and agent, the rules and channels as read-only lists, and the
// firing count shown next to the nav link. Every string (rule names, messages, host
// names, channel URLs) goes in as text.

import { rpc } from "./api.js";
import { h, append, clear, table } from "./dom.js";
import { when } from "./format.js";

const REFRESH_MS = 5000;
const BADGE_LIMIT = 1000;
const NAMES_MAX_AGE_MS = 60_000;
const UUID = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

let badgeRefresh = null;

/** Keep `badge` showing how many events are firing (hidden at 0); returns the stop. */
export function watchFiring(badge) {
  let stopped = false;
  async function refresh() {
    try {
      const firing = await rpc("alert_event_query", [{ condition: ["is_firing", { limit: BADGE_LIMIT }] }]);
      if (stopped) return;
      const count = firing.length;
      badge.dataset.count = String(count);
      badge.textContent = count >= BADGE_LIMIT ? `${BADGE_LIMIT}+` : String(count);
      badge.title = `${badge.textContent} firing`;
      badge.hidden = count === 0;
    } catch (error) {
      // a refused or failed count leaves the badge as it was; the page shows errors
    }
  }
  const timer = setInterval(refresh, REFRESH_MS);
  badgeRefresh = refresh;
  refresh();
  return () => {
    stopped = true;
    clearInterval(timer);
    if (badgeRefresh === refresh) badgeRefresh = null;
    badge.hidden = true;
  };
}

/** "12 s", "3 min 4 s", "2 h 5 min", "1 d 3 h". */
export function lasted(ms) {
  if (ms === null || ms === undefined || ms < 0) return "–";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function targetsText(targets) {
  if (targets === "all") return "all agents";
  if (!Array.isArray(targets)) return "–";
  return `${targets.length} agent${targets.length === 1 ? "" : "s"}`;
}

function paramsText(params) {
  return Object.entries(params || {})
    .map(([key, value]) => `${key} ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(", ");
}

export function render(main) {
  const state = h(
    "select",
    { name: "state", id: "alert-state" },
    h("option", { value: "" }, "firing and resolved"),
    h("option", { value: "is_firing" }, "firing"),
    h("option", { value: "is_resolved" }, "resolved"),
  );
  const rule = h("select", { name: "rule", id: "alert-rule" }, h("option", { value: "" }, "any rule"));
  const agentList = h("datalist", { id: "alert-agents" });
  const agent = h("input", { name: "agent", id: "alert-agent", list: "alert-agents", placeholder: "agent name or UUID (any)", size: 38 });
  const limit = h("input", { name: "limit", type: "number", min: 1, max: 10000, value: "200" });
  const form = h(
    "form",
    { id: "alert-form", class: "toolbar wrap" },
    state, rule, agent, agentList, h("label", {}, "limit ", limit), h("button", { type: "submit" }, "Show"),
  );
  const events = h("div", { id: "alert-events" });
  const rules = h("div", { id: "alert-rules" });
  const channels = h("div", { id: "alert-channels" });
  main.append(
    h("h1", {}, "Alerts"),
    form,
    events,
    h("h2", { class: "section" }, "Rules"),
    rules,
    h("h2", { class: "section" }, "Channels"),
    channels,
  );

  // agent names, from agent_list when the token may list agents (else UUIDs are shown)
  let names = new Map();
  let namesAt = 0;
  async function loadNames() {
    namesAt = Date.now();
    try {
      const listed = await rpc("agent_list");
      names = new Map(listed.map((a) => [a.uuid, (a.host && a.host.hostname) || null]));
      append(
        clear(agentList),
        listed.map((a) => h("option", { value: a.uuid }, (a.host && a.host.hostname) || a.uuid)),
      );
    } catch (error) {
      names = new Map();
    }
  }

  function agentCell(uuid) {
    if (!uuid) return "–";
    const name = names.get(uuid);
    return h(
      "a",
      { href: `#/agent/${encodeURIComponent(uuid)}`, class: "agent", title: uuid },
      name || uuid,
    );
  }

  function agentCondition() {
    const wanted = agent.value.trim();
    if (!wanted) return [];
    if (UUID.test(wanted)) return [{ uuid: wanted }];
    const matches = [...names].filter(([, name]) => name && name.toLowerCase() === wanted.toLowerCase());
    if (matches.length === 1) return [{ uuid: matches[0][0] }];
    throw new Error(
      matches.length
        ? `${matches.length} agents are named "${wanted}": give the UUID`
        : `No agent named "${wanted}"`,
    );
  }

  let turn = 0;
  async function loadEvents(quiet) {
    const mine = ++turn;
    let condition;
    try {
      condition = [...(state.value ? [state.value] : []), ...(rule.value ? [{ rule: rule.value }] : []), ...agentCondition()];
    } catch (error) {
      clear(events).append(h("p", { class: "bad" }, error.message));
      return;
    }
    condition.push({ limit: Math.min(10000, Math.max(1, Number(limit.value) || 200)) });
    if (!quiet) clear(events).append(h("p", { class: "muted" }, "Loading…"));
    let found;
    try {
      found = await rpc("alert_event_query", [{ condition }]);
    } catch (error) {
      if (mine === turn) clear(events).append(h("p", { class: "bad" }, error.message));
      return;
    }
    if (found.some((e) => e.uuid && !names.has(e.uuid)) && Date.now() - namesAt > NAMES_MAX_AGE_MS) {
      await loadNames();
    }
    if (mine !== turn) return;
    const now = Date.now();
    const firing = found.filter((e) => e.state === "firing").length;
    const rows = found.map((e) => {
      const isFiring = e.state === "firing";
      const row = h(
        "tr",
        { class: `alert-event ${isFiring ? "firing" : "resolved"}`, dataset: { id: String(e.id), state: e.state } },
        h("td", { class: "a-rule" }, e.rule),
        h("td", { class: "a-agent" }, agentCell(e.uuid)),
        h("td", { class: "a-state" }, h("span", { class: `state ${isFiring ? "firing" : "resolved"}` }, isFiring ? "FIRING" : "resolved")),
        h("td", { class: "a-started" }, when(e.started_at)),
        h("td", { class: "a-resolved" }, isFiring ? "–" : when(e.resolved_at)),
        h("td", { class: "a-duration" }, isFiring ? `${lasted(now - e.started_at)} so far` : lasted(e.resolved_at - e.started_at)),
        h("td", { class: "a-message" }, e.message),
      );
      return row;
    });
    clear(events).append(
      h(
        "p",
        { class: "muted", id: "alert-summary" },
        `${found.length} event${found.length === 1 ? "" : "s"}, newest first; ${firing} firing`,
      ),
      h(
        "table",
        { class: "grid alerts" },
        h("thead", {}, h("tr", {}, ["Rule", "Agent", "State", "Started", "Resolved", "Duration", "Message"].map((n) => h("th", {}, n)))),
        h("tbody", {}, rows),
      ),
    );
    if (badgeRefresh) badgeRefresh();
  }

  async function loadRules() {
    try {
      const listed = await rpc("alert_rule_list");
      const chosen = rule.value;
      append(clear(rule), [
        h("option", { value: "" }, "any rule"),
        listed.map((r) => h("option", { value: r.name }, r.name)),
      ]);
      rule.value = listed.some((r) => r.name === chosen) ? chosen : "";
      clear(rules).append(
        table(
          ["Name", "Kind", "Parameters", "Targets", "Channels", "Enabled"],
          listed.map((r) => [
            r.name,
            r.kind,
            paramsText(r.params),
            targetsText(r.targets),
            (r.channels || []).join(", ") || "–",
            r.enable === false ? "no" : "yes",
          ]),
        ),
      );
    } catch (error) {
      clear(rules).append(h("p", { class: "bad" }, error.message));
    }
  }

  async function loadChannels() {
    try {
      const listed = await rpc("alert_channel_list");
      clear(channels).append(
        table(
          ["Name", "Scheme", "URL (secrets masked)"],
          listed.map((c) => [c.name, c.scheme, h("code", {}, c.url_redacted)]),
        ),
      );
    } catch (error) {
      clear(channels).append(h("p", { class: "bad" }, error.message));
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    loadEvents(false);
  });
  state.addEventListener("change", () => loadEvents(false));
  rule.addEventListener("change", () => loadEvents(false));

  (async () => {
    await Promise.all([loadNames(), loadRules(), loadChannels()]);
    await loadEvents(false);
  })();
  const timer = setInterval(() => loadEvents(true), REFRESH_MS);
  return () => clearInterval(timer);
}
