// The fleet: every agent the token may list, its host name, OS and live figures pushed
// once a second over /ui/live (one frame holds the whole fleet), a virtualised list (only the visible rows exist in the DOM, so 10,000
// agents cost what 40 do), search, sort and filters. Offline agents and disks over
// 90 % are counted in a banner and sorted first by default.

import { socketUrl } from "./api.js";
import { h } from "./dom.js";
import { ago, bytes, pct, percent, rate } from "./format.js";

const ROW_PX = 30;
const byName = new Intl.Collator(undefined, { numeric: true }).compare;
const DISK_FULL = 90;
const COLUMNS = [
  ["state", "State"],
  ["name", "Name"],
  ["os", "OS"],
  ["cpu", "CPU"],
  ["mem", "Memory"],
  ["disk", "Disk"],
  ["net", "Network ↓ / ↑"],
  ["seen", "Last report"],
];

function blank(uuid) {
  return { uuid, name: uuid, os: "", key: "", online: false, cpu: null, mem: null, disk: null };
}

export function render(main) {
  const agents = new Map();
  const state = { sort: "problems", filter: "all", search: "", view: [], dirty: true };
  let socket = null;
  let closed = false;
  let frame = 0;
  const seen = new Set();
  const loaded = { live: false };

  const search = h("input", { type: "search", placeholder: "Search name, host, OS, UUID", id: "fleet-search" });
  const filter = h(
    "select",
    { id: "fleet-filter" },
    h("option", { value: "all" }, "All agents"),
    h("option", { value: "online" }, "Online"),
    h("option", { value: "offline" }, "Offline"),
    h("option", { value: "full" }, "Disk over 90 %"),
  );
  const sort = h(
    "select",
    { id: "fleet-sort" },
    h("option", { value: "problems" }, "Problems first"),
    h("option", { value: "name" }, "Name"),
    h("option", { value: "cpu" }, "CPU"),
    h("option", { value: "mem" }, "Memory"),
    h("option", { value: "disk" }, "Disk"),
  );
  const banner = h("div", { id: "fleet-banner", class: "banner" });
  const count = h("span", { id: "fleet-count", class: "muted" });
  const head = h("div", { class: "fleet-row fleet-head" }, COLUMNS.map(([key, label]) => h("span", { class: `c-${key}` }, label)));
  const spacer = h("div", { class: "fleet-spacer" });
  const rowsBox = h("div", { class: "fleet-rows" });
  const scroller = h("div", { id: "fleet-list", class: "fleet-list" }, spacer, rowsBox);
  main.append(
    h("div", { class: "toolbar" }, search, filter, sort, count),
    banner,
    head,
    scroller,
  );

  search.addEventListener("input", () => {
    state.search = search.value.trim().toLowerCase();
    changed();
  });
  filter.addEventListener("change", () => {
    state.filter = filter.value;
    changed();
  });
  sort.addEventListener("change", () => {
    state.sort = sort.value;
    changed();
  });
  scroller.addEventListener("scroll", () => schedule());

  function changed() {
    state.dirty = true;
    schedule();
  }

  function schedule() {
    if (!frame) frame = requestAnimationFrame(draw);
  }

  function matches(agent) {
    if (state.filter === "online" && !agent.online) return false;
    if (state.filter === "offline" && agent.online) return false;
    if (state.filter === "full" && !(agent.disk >= DISK_FULL)) return false;
    if (!state.search) return true;
    return agent.key.includes(state.search);
  }

  function problem(agent) {
    return (agent.online ? 0 : 2) + (agent.disk >= DISK_FULL ? 1 : 0);
  }

  function compare(a, b) {
    switch (state.sort) {
      case "problems":
        return problem(b) - problem(a) || byName(a.name, b.name);
      case "cpu":
        return (b.cpu ?? -1) - (a.cpu ?? -1);
      case "mem":
        return (b.mem ?? -1) - (a.mem ?? -1);
      case "disk":
        return (b.disk ?? -1) - (a.disk ?? -1);
      default:
        return byName(a.name, b.name);
    }
  }

  function rebuild() {
    let offline = 0;
    let full = 0;
    const view = [];
    for (const agent of agents.values()) {
      if (!agent.online) offline += 1;
      if (agent.disk >= DISK_FULL) full += 1;
      if (matches(agent)) view.push(agent);
    }
    view.sort(compare);
    state.view = view;
    state.dirty = false;
    count.textContent = `${view.length} of ${agents.size} agents`;
    banner.replaceChildren();
    banner.className = offline || full ? "banner bad" : "banner good";
    if (offline) banner.append(h("button", { type: "button", class: "pill bad", id: "banner-offline", onclick: () => { filter.value = "offline"; state.filter = "offline"; changed(); } }, `${offline} offline`));
    if (full) banner.append(h("button", { type: "button", class: "pill bad", id: "banner-full", onclick: () => { filter.value = "full"; state.filter = "full"; changed(); } }, `${full} disk${full > 1 ? "s" : ""} over ${DISK_FULL} %`));
    if (!offline && !full) banner.append(`All ${agents.size} agents online, no disk over ${DISK_FULL} %`);
  }

  function draw() {
    frame = 0;
    if (state.dirty) rebuild();
    const view = state.view;
    spacer.style.height = `${view.length * ROW_PX}px`;
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_PX) - 5);
    const visible = Math.ceil(scroller.clientHeight / ROW_PX) + 10;
    const last = Math.min(view.length, first + visible);
    rowsBox.style.transform = `translateY(${first * ROW_PX}px)`;
    while (rowsBox.children.length < last - first) rowsBox.append(makeRow());
    while (rowsBox.children.length > last - first) rowsBox.lastChild.remove();
    const now = Date.now();
    for (let i = first; i < last; i++) fill(rowsBox.children[i - first], view[i], now);
    if (loaded.live && !window.taskdFleetReady) {
      // navigation to every row's data in the model and the visible rows drawn (P10)
      window.taskdFleetReady = performance.now();
      main.dataset.ready = "1";
    }
  }

  function makeRow() {
    const row = h("a", { class: "fleet-row" }, COLUMNS.map(([key]) => h("span", { class: `c-${key}` })));
    return row;
  }

  function bar(cell, value, text) {
    cell.textContent = text;
    cell.classList.toggle("full", value >= DISK_FULL);
    cell.style.setProperty("--fill", `${Math.min(100, value || 0)}%`);
  }

  function fill(row, agent, now) {
    const cells = row.children;
    row.href = `#/agent/${encodeURIComponent(agent.uuid)}`;
    row.dataset.uuid = agent.uuid;
    row.classList.toggle("offline", !agent.online);
    cells[0].textContent = agent.online ? "online" : "offline";
    cells[0].className = `c-state ${agent.online ? "good" : "bad"}`;
    cells[1].textContent = agent.name;
    cells[1].title = agent.uuid;
    cells[2].textContent = agent.os;
    bar(cells[3], agent.cpu, pct(agent.cpu));
    bar(cells[4], agent.mem, agent.mem === null ? "–" : `${pct(agent.mem)} of ${bytes(agent.memTotal)}`);
    bar(cells[5], agent.disk, agent.disk === null ? "–" : `${pct(agent.disk)} of ${bytes(agent.diskTotal)}`);
    cells[5].classList.toggle("bad", agent.disk >= DISK_FULL);
    cells[6].textContent = agent.rx === null ? "–" : `${rate(agent.rx)} / ${rate(agent.tx)}`;
    cells[7].textContent = ago(agent.time, now);
  }

  function keyOf(agent) {
    agent.key = `${agent.name} ${agent.os} ${agent.uuid}`.toLowerCase();
  }

  function apply(message) {
    const at = Object.fromEntries(message.fields.map((name, i) => [name, i]));
    const [U, ON, NAME, OS, CPU, MU, MT, DU, DT, RX, TX, T] = [
      at.uuid, at.online, at.name, at.os, at.cpu, at.used_memory, at.total_memory,
      at.used_space, at.total_space, at.receive_speed, at.transmit_speed, at.time,
    ];
    if (message.type === "full") seen.clear();
    for (const row of message.rows) {
      const uuid = row[U];
      let agent = agents.get(uuid);
      if (!agent) {
        agent = blank(uuid);
        agents.set(uuid, agent);
      }
      const name = row[NAME] || uuid;
      const os = row[OS] || "";
      if (name !== agent.name || os !== agent.os || !agent.key) {
        agent.name = name;
        agent.os = os;
        keyOf(agent);
      }
      agent.online = row[ON];
      agent.cpu = row[CPU];
      agent.mem = percent(row[MU], row[MT]);
      agent.memTotal = row[MT];
      agent.disk = percent(row[DU], row[DT]);
      agent.diskTotal = row[DT];
      agent.rx = row[RX];
      agent.tx = row[TX];
      agent.time = row[T];
      seen.add(uuid);
    }
    if (message.type === "full") {
      for (const uuid of [...agents.keys()]) if (!seen.has(uuid)) agents.delete(uuid);
      loaded.live = true;
    }
    for (const uuid of message.gone) agents.delete(uuid);
    changed();
  }

  function connect() {
    socket = new WebSocket(socketUrl("live"));
    socket.addEventListener("message", (event) => {
      apply(JSON.parse(event.data));
    });
    socket.addEventListener("close", (event) => {
      if (closed) return;
      if (event.code === 4401 || event.code === 1008) {
        window.dispatchEvent(new CustomEvent("taskd-logged-out"));
        return;
      }
      setTimeout(() => !closed && connect(), 2000);
    });
  }

  window.taskdFleet = { agents, state, scroller };
  connect();
  return () => {
    closed = true;
    if (socket) socket.close();
    if (frame) cancelAnimationFrame(frame);
  };
}
