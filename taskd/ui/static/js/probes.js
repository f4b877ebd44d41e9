// Probes: every cron with its schedule and targets, enable/disable and edit where the
// token may write crons, and per cron a latency chart per agent with failures marked
// (min/avg/max per bucket when a range holds more points than the chart can show).

import { can, rpc } from "./api.js";
import { h, clear, showError, table } from "./dom.js";
import { when } from "./format.js";
import { uPlot } from "./chart.js";
import { describeTask } from "./results.js";

const RANGES = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };
const BUCKETS = 300;
const COLOURS = ["#2f6fde", "#d9822b", "#2a9d5c", "#b04ad6", "#5a6b7d"];
const LATENCY_KINDS = new Set(["ping", "tcp_ping", "http_ping"]);

export function render(main, [selected]) {
  const list = h("div", { id: "cron-list" });
  const detail = h("div", { id: "cron-detail" });
  main.append(h("h1", {}, "Probes"), list, detail);
  let writable = false;

  async function load() {
    let crons;
    try {
      [crons, [writable]] = await Promise.all([rpc("crontab_get"), can([["crontab", "write", null, null]])]);
    } catch (error) {
      clear(list).append(h("p", { class: "bad" }, error.message));
      return;
    }
    clear(list).append(
      table(
        ["Name", "Schedule", "Targets", "Task", "Enabled", "Last run", ""],
        crons.map((cron) => {
          const agentSpec = cron.cron_type.agent || [[], {}];
          const targets = agentSpec[0] || [];
          const task = (agentSpec[1] || {}).task;
          const toggle = writable
            ? h("button", { type: "button", class: "toggle", dataset: { cron: cron.name }, onclick: async () => {
                try {
                  await rpc("crontab_set_enable", [cron.name, !cron.enable]);
                  load();
                } catch (error) {
                  showError(error.message);
                }
              } }, cron.enable ? "Disable" : "Enable")
            : null;
          return [
            h("a", { href: `#/probes/${encodeURIComponent(cron.name)}` }, cron.name),
            h("code", {}, cron.cron_expression),
            `${targets.length} agent${targets.length === 1 ? "" : "s"}`,
            task ? describeTask(task) : JSON.stringify(cron.cron_type),
            cron.enable ? "yes" : "no",
            when(cron.last_run_time),
            toggle || "",
          ];
        }),
      ),
    );
    const chosen = crons.find((c) => c.name === selected) || crons[0];
    if (chosen) show(chosen);
  }

  function show(cron) {
    let range = "1h";
    const chartBox = h("div", { class: "chart", id: "probe-chart" });
    const ranges = h("div", { class: "toolbar" });
    const runs = h("div", { id: "cron-runs" });
    clear(detail).append(h("h2", {}, "Probe ", h("code", {}, cron.name)), ranges, chartBox);
    if (writable) detail.append(editor(cron));
    detail.append(h("h3", {}, "Recent runs"), runs);
    for (const name of Object.keys(RANGES)) {
      ranges.append(h("button", { type: "button", dataset: { range: name }, class: name === range ? "active" : "", onclick: () => { range = name; for (const b of ranges.children) b.classList.toggle("active", b.dataset.range === name); draw(); } }, name));
    }
    async function draw() {
      const to = Date.now();
      const from = to - RANGES[range];
      try {
        const [records, fires] = await Promise.all([
          rpc("task_query_task", { task_data_query: { condition: [{ cron_source: cron.name }, { timestamp_from_to: [from, to] }, { limit: 10000 }] } }),
          rpc("crontab-result_query", { query: { condition: [{ cron_name: cron.name }, { limit: 20 }] } }),
        ]);
        drawLatency(chartBox, records, from, to);
        clear(runs).append(
          table(["Time", "Dispatched", "Task", "Message"], fires.map((f) => [when(f.run_time), f.success ? "yes" : "no", f.relative_id === null ? "–" : String(f.relative_id), f.message])),
        );
      } catch (error) {
        clear(chartBox).append(h("p", { class: "bad" }, error.message));
      }
    }
    draw();
  }

  function editor(cron) {
    const expression = h("input", { name: "cron_expression", value: cron.cron_expression });
    const type = h("textarea", { name: "cron_type", rows: 5, cols: 70 });
    type.value = JSON.stringify(cron.cron_type, null, 1);
    const note = h("span", { class: "muted" });
    const form = h("form", { id: "cron-edit", class: "card" }, h("h3", {}, "Edit"), h("label", {}, "Schedule ", expression), h("label", {}, "Type (JSON) ", type), h("button", { type: "submit" }, "Save"), note);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await rpc("crontab_edit", [cron.name, expression.value.trim(), JSON.parse(type.value)]);
        note.textContent = "saved";
        load();
      } catch (error) {
        note.textContent = error.message;
      }
    });
    return form;
  }

  load();
}

function latencyOf(record) {
  const result = record.task_event_result;
  if (!result || typeof result !== "object") return null;
  const kind = Object.keys(result)[0];
  return LATENCY_KINDS.has(kind) ? Number(result[kind]) : null;
}

export function drawLatency(box, records, from, to) {
  clear(box);
  const finished = records.filter((r) => r.timestamp !== null);
  const agents = [...new Set(finished.map((r) => r.uuid))].sort();
  const failures = finished.filter((r) => !r.success);
  box.dataset.results = String(finished.length);
  box.dataset.failures = String(failures.length);
  if (!finished.length) {
    box.append(h("p", { class: "muted" }, "No results in this range."));
    return;
  }
  const bucketed = finished.length / Math.max(1, agents.length) > BUCKETS;
  const step = bucketed ? (to - from) / BUCKETS : 0;
  const times = bucketed
    ? Array.from({ length: BUCKETS }, (_, i) => from + (i + 0.5) * step)
    : [...new Set(finished.map((r) => r.timestamp))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const slot = (t) => (bucketed ? Math.min(BUCKETS - 1, Math.floor((t - from) / step)) : index.get(t));
  const series = [{}];
  const data = [times.map((t) => t / 1000)];
  agents.forEach((uuid, n) => {
    const colour = COLOURS[n % COLOURS.length];
    const sums = new Array(times.length).fill(null);
    const counts = new Array(times.length).fill(0);
    const mins = new Array(times.length).fill(null);
    const maxs = new Array(times.length).fill(null);
    for (const r of finished) {
      if (r.uuid !== uuid || !r.success) continue;
      const v = latencyOf(r);
      if (v === null) continue;
      const i = slot(r.timestamp);
      sums[i] = (sums[i] || 0) + v;
      counts[i] += 1;
      mins[i] = mins[i] === null ? v : Math.min(mins[i], v);
      maxs[i] = maxs[i] === null ? v : Math.max(maxs[i], v);
    }
    const label = uuid.slice(0, 8);
    series.push({ label: bucketed ? `${label} avg` : label, stroke: colour, width: 1.5, spanGaps: false, points: { show: !bucketed } });
    data.push(sums.map((s, i) => (counts[i] ? s / counts[i] : null)));
    if (bucketed) {
      series.push({ label: `${label} min`, stroke: colour, dash: [4, 4], width: 1 });
      data.push(mins);
      series.push({ label: `${label} max`, stroke: colour, dash: [2, 6], width: 1 });
      data.push(maxs);
    }
  });
  // failed probes: a red mark at the top of the chart at the time they failed
  const top = Math.max(1, ...data.slice(1).flat().filter((v) => v !== null)) * 1.1;
  const failed = new Array(times.length).fill(null);
  for (const r of failures) failed[slot(r.timestamp)] = top;
  series.push({ label: "failed", stroke: "#c23c3c", paths: () => null, points: { show: true, size: 10, fill: "#c23c3c", stroke: "#c23c3c" } });
  data.push(failed);
  const chart = new uPlot(
    { width: Math.max(400, box.clientWidth || 800), height: 260, series, scales: { x: { time: true } }, axes: [{}, { label: "ms", size: 60 }] },
    data,
    box,
  );
  box.dataset.failedPoints = String(failed.filter((v) => v !== null).length);
  return chart;
}
