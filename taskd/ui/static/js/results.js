// A task and its result as people read them: execute output as text, an HTTP
// response's status and headers, DNS records as a table, latencies in ms.

import { h, table } from "./dom.js";

export function kindOf(taskType) {
  return typeof taskType === "string" ? taskType : Object.keys(taskType || {})[0] || "?";
}

export function describeTask(taskType) {
  const kind = kindOf(taskType);
  const spec = typeof taskType === "string" ? null : taskType[kind];
  if (spec === null || spec === undefined) return kind;
  if (typeof spec === "string") return `${kind} ${spec}`;
  if (kind === "execute") return `execute ${[spec.cmd, ...(spec.args || [])].join(" ")}`;
  if (kind === "http_request") return `http_request ${spec.method} ${spec.url}`;
  if (kind === "dns") return `dns ${spec.domain} ${(spec.record_types || []).join(",")}`;
  return `${kind} ${JSON.stringify(spec)}`;
}

export function resultView(record) {
  if (record.success === null || record.success === undefined) {
    return h("span", { class: "muted" }, "running…");
  }
  if (!record.success) {
    return h("pre", { class: "result bad" }, record.error_message || "failed");
  }
  const result = record.task_event_result;
  if (result === null || result === undefined) return h("span", { class: "muted" }, "(no result)");
  const kind = kindOf(result);
  const value = typeof result === "string" ? null : result[kind];
  switch (kind) {
    case "ping":
    case "tcp_ping":
    case "http_ping":
      return h("span", { class: "result" }, `${Number(value).toFixed(2)} ms`);
    case "execute":
      return h("pre", { class: "result" }, value);
    case "read_config":
      return h("pre", { class: "result" }, value);
    case "http_request":
      return h(
        "div",
        { class: "result" },
        h("div", {}, `HTTP ${value.status}`),
        table(
          ["Header", "Value"],
          (value.headers || []).flatMap((pair) => Object.entries(pair)),
        ),
        value.body !== undefined && value.body !== null
          ? h("pre", {}, value.body)
          : value.body_base64
            ? h("pre", {}, `(binary body, ${value.body_base64.length} base64 characters)`)
            : null,
      );
    case "dns":
      return table(
        ["Type", "Time", "Data"],
        (value || []).map((record) => [record.record_type, `${Number(record.time).toFixed(1)} ms`, record.data]),
      );
    case "ip":
      return h("span", { class: "result" }, (value || []).filter(Boolean).join(", ") || "(none)");
    default:
      return h("pre", { class: "result" }, JSON.stringify(value, null, 2));
  }
}
