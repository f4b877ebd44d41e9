// Tasks: task_query_task's conditions as a form, newest first, each result readable.

import { rpc } from "./api.js";
import { h, clear, table } from "./dom.js";
import { when } from "./format.js";
import { TASK_KINDS } from "./agent.js";
import { describeTask, resultView } from "./results.js";

export function render(main) {
  const uuid = h("input", { name: "uuid", placeholder: "agent UUID (any)", size: 38 });
  const kind = h("select", { name: "type" }, h("option", { value: "" }, "any kind"), [...TASK_KINDS, "web_shell"].map((k) => h("option", { value: k }, k)));
  const status = h(
    "select",
    { name: "status" },
    h("option", { value: "" }, "any state"),
    h("option", { value: "is_success" }, "succeeded"),
    h("option", { value: "is_failure" }, "failed"),
    h("option", { value: "is_running" }, "running"),
  );
  const cron = h("input", { name: "cron", placeholder: "cron name (any)" });
  const from = h("input", { name: "from", type: "datetime-local" });
  const to = h("input", { name: "to", type: "datetime-local" });
  const limit = h("input", { name: "limit", type: "number", min: 1, max: 10000, value: "100" });
  const results = h("div", { id: "task-results" });
  const form = h(
    "form",
    { id: "task-form", class: "toolbar wrap" },
    uuid, kind, status, cron, h("label", {}, "from ", from), h("label", {}, "to ", to),
    h("label", {}, "limit ", limit), h("button", { type: "submit" }, "Query"),
  );
  main.append(h("h1", {}, "Tasks"), form, results);

  async function query() {
    const condition = [];
    if (uuid.value.trim()) condition.push({ uuid: uuid.value.trim() });
    if (kind.value) condition.push({ type: kind.value });
    if (status.value) condition.push(status.value);
    if (cron.value.trim()) condition.push({ cron_source: cron.value.trim() });
    if (from.value) condition.push({ timestamp_from: new Date(from.value).getTime() });
    if (to.value) condition.push({ timestamp_to: new Date(to.value).getTime() });
    condition.push({ limit: Number(limit.value) || 100 });
    clear(results).append(h("p", { class: "muted" }, "Loading…"));
    try {
      const records = await rpc("task_query_task", { task_data_query: { condition } });
      clear(results).append(
        h("p", { class: "muted" }, `${records.length} task${records.length === 1 ? "" : "s"}, newest first`),
        table(
          ["Id", "Agent", "Task", "Cron", "Finished", "Result"],
          records.map((r) => [
            String(r.task_id),
            h("a", { href: `#/agent/${encodeURIComponent(r.uuid)}` }, r.uuid),
            describeTask(r.task_event_type),
            r.cron_source || "",
            when(r.timestamp),
            resultView(r),
          ]),
        ),
      );
    } catch (error) {
      clear(results).append(h("p", { class: "bad" }, error.message));
    }
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    query();
  });
  query();
}
