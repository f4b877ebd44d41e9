// One agent: its host facts, charts of every summary figure over 1 h … 1 y (the server
// picks raw rows or rollups: resolution "auto"), its recent tasks, a form to run a task
// of any kind the token may create, and a terminal where the token may open one.

import { can, rpc, socketUrl } from "./api.js";
import { h, clear, showError, table } from "./dom.js";
import { bytes, duration, rate, when } from "./format.js";
import { lineChart } from "./chart.js";
import { describeTask, resultView } from "./results.js";

const RANGES = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3, "1y": 365 * 86400e3 };
const num = (v) => v.toFixed(v < 10 ? 2 : 0);
const CHARTS = [
  ["CPU", ["cpu_usage"], (v) => `${v.toFixed(1)} %`],
  ["GPU", ["gpu_usage"], (v) => `${v.toFixed(1)} %`],
  ["Memory", ["used_memory", "available_memory", "total_memory"], bytes],
  ["Swap", ["used_swap", "total_swap"], bytes],
  ["Load", ["load_one", "load_five", "load_fifteen"], num],
  ["Disk space", ["available_space", "total_space"], bytes],
  ["Disk I/O", ["read_speed", "write_speed"], rate],
  ["Network speed", ["receive_speed", "transmit_speed"], rate],
  ["Network totals", ["total_received", "total_transmitted"], bytes],
  ["Connections", ["tcp_connections", "udp_connections"], num],
  ["Processes", ["process_count"], num],
  ["Uptime", ["uptime"], duration],
  ["Boot time", ["boot_time"], (v) => new Date(v * 1000).toLocaleDateString()],
];
export const TASK_KINDS = [
  "ping", "tcp_ping", "http_ping", "http_request", "dns", "execute",
  "read_config", "edit_config", "ip", "version", "self_update",
];

export function render(main, [uuid]) {
  let range = "1h";
  let gone = false;
  let terminal = null;
  const facts = h("section", { id: "facts", class: "card" }, h("h2", {}, "Host"), h("p", { class: "muted" }, "Loading…"));
  const rangeBar = h("div", { class: "toolbar", id: "ranges" });
  const charts = h("div", { id: "charts", class: "charts" });
  const runBox = h("section", { id: "run", class: "card", hidden: true });
  const termBox = h("section", { id: "terminal", class: "card", hidden: true });
  const recent = h("section", { id: "recent", class: "card" }, h("h2", {}, "Recent tasks"));
  main.append(
    h("h1", {}, "Agent ", h("code", { id: "agent-uuid" }, uuid)),
    facts,
    h("section", { class: "card" }, h("h2", {}, "Metrics"), rangeBar, charts),
    runBox,
    termBox,
    recent,
  );
  for (const name of Object.keys(RANGES)) {
    rangeBar.append(
      h("button", { type: "button", dataset: { range: name }, class: name === range ? "active" : "", onclick: () => { range = name; for (const b of rangeBar.children) b.classList.toggle("active", b.dataset.range === name); drawCharts(); } }, name),
    );
  }

  async function loadFacts() {
    let host = null;
    try {
      const listed = await rpc("agent_list");
      host = (listed.find((a) => a.uuid === uuid) || {}).host || null;
    } catch (error) {
      // listing may be refused; the static report below is read on its own permission
    }
    let system = host;
    let cpu = null;
    if (!system) {
      try {
        const rows = await rpc("agent_static_data_multi_last_query", [[uuid], ["cpu", "system"]]);
        if (rows.length) {
          system = rows[0].system;
          cpu = rows[0].cpu;
        }
      } catch (error) {
        system = null;
      }
    }
    clear(facts).append(h("h2", {}, "Host"));
    if (!system) {
      facts.append(h("p", { class: "muted" }, "No host report readable with this token."));
      return;
    }
    const rows = Object.entries(system)
      .filter(([, v]) => v !== null && v !== undefined && v !== "")
      .map(([k, v]) => [k, k === "time" ? when(v) : Array.isArray(v) ? v.join(", ") : typeof v === "object" ? JSON.stringify(v) : String(v)]);
    if (cpu) {
      rows.push(["cpu_cores", `${cpu.physical_cores} physical, ${cpu.logical_cores} logical`]);
      const brand = (cpu.per_core || [])[0];
      if (brand) rows.push(["cpu_model", `${brand.vendor_id || ""} ${brand.brand || ""}`.trim()]);
    }
    facts.append(table(["Fact", "Value"], rows));
  }

  async function drawCharts() {
    const started = performance.now();
    const to = Date.now();
    const from = to - RANGES[range];
    let rows;
    try {
      rows = await rpc("agent_query_dynamic_summary", {
        dynamic_summary_query: {
          fields: [],
          condition: [{ uuid }, { timestamp_from_to: [from, to] }],
          resolution: "auto",
        },
      });
    } catch (error) {
      clear(charts).append(h("p", { class: "muted" }, `Metrics: ${error.message}`));
      return;
    }
    if (gone) return;
    const fetched = performance.now();
    // built off-document and attached at once: one layout for all the charts
    const built = document.createDocumentFragment();
    const xs = rows.map((r) => r.timestamp / 1000);
    for (const [title, fields, format] of CHARTS) {
      const ys = fields.map((f) => rows.map((r) => r[f] ?? null));
      const points = ys[0].filter((v) => v !== null).length;
      const box = h("div", { class: "chart", dataset: { chart: title, points: String(points) } });
      built.append(box);
      lineChart(box, {
        title,
        labels: fields,
        xs,
        ys,
        format,
        width: 520,
        height: 170,
        points: rows.length < 60,
        range: [from / 1000, to / 1000],
      });
    }
    charts.replaceChildren(built);
    await new Promise((resolve) => requestAnimationFrame(resolve));
    charts.dataset.fetchMs = String(fetched - started);
    charts.dataset.drawnMs = String(performance.now() - started);
    charts.dataset.points = String(rows.length);
    charts.dataset.resolution = rows.length ? rows[0].resolution || "raw" : "";
    window.taskdChartsDrawn = performance.now();
  }

  async function loadTasks() {
    try {
      const records = await rpc("task_query_task", { task_data_query: { condition: [{ uuid }, { limit: 20 }] } });
      clear(recent).append(
        h("h2", {}, "Recent tasks"),
        table(
          ["Id", "Task", "Finished", "Result"],
          records.map((r) => [String(r.task_id), describeTask(r.task_event_type), when(r.timestamp), resultView(r)]),
        ),
      );
    } catch (error) {
      clear(recent).append(h("h2", {}, "Recent tasks"), h("p", { class: "muted" }, error.message));
    }
  }

  async function permissions() {
    const needs = [
      ...TASK_KINDS.map((kind) => ["task", "create", kind, uuid]),
      ["task", "read", "*", uuid],
      ["terminal", "connect", null, uuid],
      ["task", "create", "web_shell", uuid],
    ];
    const answers = await can(needs);
    const kinds = TASK_KINDS.filter((_, i) => answers[i]);
    const readable = answers[TASK_KINDS.length];
    if (kinds.length) buildRunForm(kinds, readable);
    if (answers[TASK_KINDS.length + 1] && answers[TASK_KINDS.length + 2]) buildTerminal();
  }

  function buildRunForm(kinds, readable) {
    const kind = h("select", { name: "kind", id: "run-kind" }, kinds.map((k) => h("option", { value: k }, k)));
    const fields = h("div", { class: "fields" });
    const out = h("div", { id: "run-result", class: "run-result" });
    const form = h("form", { id: "run-form" }, h("label", {}, "Kind ", kind), fields, h("button", { type: "submit" }, "Run"), out);
    runBox.hidden = false;
    runBox.append(h("h2", {}, "Run a task"), form);
    const inputs = {};
    function field(name, label, attrs = {}) {
      const input = attrs.textarea ? h("textarea", { name, rows: 6 }) : h("input", { name, ...attrs });
      inputs[name] = input;
      fields.append(h("label", {}, `${label} `, input));
    }
    function layout() {
      clear(fields);
      for (const k of Object.keys(inputs)) delete inputs[k];
      switch (kind.value) {
        case "ping": field("target", "Host", { placeholder: "example.com" }); break;
        case "tcp_ping": field("target", "Host:port", { placeholder: "example.com:443" }); break;
        case "http_ping": field("target", "URL", { placeholder: "https://example.com/" }); break;
        case "http_request":
          field("url", "URL", { placeholder: "https://example.com/" });
          field("method", "Method", { value: "GET" });
          field("body", "Body");
          break;
        case "dns":
          field("domain", "Domain", { placeholder: "example.com" });
          field("types", "Record types", { value: "a,aaaa" });
          field("server", "DNS server (ip:port, optional)");
          break;
        case "execute":
          field("cmd", "Command", { placeholder: "uname" });
          field("args", "Arguments (space separated)", { placeholder: "-a" });
          break;
        case "edit_config": field("toml", "Agent config (TOML)", { textarea: true }); break;
        case "self_update": field("target", "Version", { placeholder: "v1.2.3" }); break;
        default: break;
      }
    }
    function taskType() {
      const v = (name) => (inputs[name] ? inputs[name].value.trim() : "");
      switch (kind.value) {
        case "ping": case "tcp_ping": case "http_ping": case "self_update":
          return { [kind.value]: v("target") };
        case "http_request": {
          const spec = { url: v("url"), method: v("method") || "GET", headers: {} };
          if (v("body")) spec.body = inputs.body.value;
          return { http_request: spec };
        }
        case "dns": {
          const spec = { domain: v("domain"), record_types: v("types").split(/[\s,]+/).filter(Boolean) };
          if (v("server")) spec.dns_server = v("server");
          return { dns: spec };
        }
        case "execute":
          return { execute: { cmd: v("cmd"), args: v("args").split(/\s+/).filter(Boolean) } };
        case "edit_config":
          return { edit_config: inputs.toml.value };
        default:
          return kind.value;
      }
    }
    kind.addEventListener("change", layout);
    layout();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clear(out).append(h("span", { class: "muted" }, "running…"));
      try {
        if (readable) {
          const record = await rpc("task_create_task_blocking", [uuid, taskType(), 30000]);
          clear(out).append(h("div", { class: "muted" }, `task ${record.task_id}`), resultView(record));
          loadTasks();
        } else {
          const created = await rpc("task_create_task", [uuid, taskType()]);
          clear(out).append(`task ${created.id} created (this token may not read results)`);
        }
      } catch (error) {
        clear(out).append(h("pre", { class: "result bad" }, error.message));
      }
    });
  }

  function buildTerminal() {
    termBox.hidden = false;
    const open = h("button", { type: "button", id: "terminal-open" }, "Open terminal");
    const screen = h("div", { id: "terminal-screen", class: "terminal-screen", hidden: true });
    const status = h("span", { class: "muted", id: "terminal-status" });
    termBox.append(h("h2", {}, "Terminal"), h("div", { class: "toolbar" }, open, status), screen);
    open.addEventListener("click", async () => {
      open.disabled = true;
      screen.hidden = false;
      try {
        const { openTerminal } = await import("./terminal.js");
        terminal = await openTerminal(screen, uuid, status);
      } catch (error) {
        status.textContent = error.message;
        open.disabled = false;
      }
    });
  }

  loadFacts();
  drawCharts();
  loadTasks();
  permissions().catch((error) => showError(error.message));
  return () => {
    gone = true;
    if (terminal) terminal.close();
  };
}
