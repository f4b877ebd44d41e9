// Start-up: log in (a credential in the URL fragment, the login form, or the session
// cookie), then route between the pages by the fragment (#/fleet, #/agent/<uuid>, ...).

import * as api from "./api.js";
import { h, clear, showError } from "./dom.js";
// each page's module is loaded when first shown (the fleet does not wait for the charts)
const pages = {
  fleet: () => import("./fleet.js"),
  agent: () => import("./agent.js"),
  probes: () => import("./probes.js"),
  tasks: () => import("./tasks.js"),
  alerts: () => import("./alerts.js"),
};

const main = document.getElementById("main");
let leave = null;
let routed = 0;
let stopBadge = null;

function loginForm(message) {
  const input = h("input", {
    type: "password",
    name: "token",
    autocomplete: "current-password",
    placeholder: "KEY:SECRET or USERNAME|PASSWORD",
    required: true,
  });
  const note = h("p", { class: "bad" }, message || "");
  const form = h(
    "form",
    { class: "login", id: "login" },
    h("h1", {}, "Log in to taskd"),
    h("label", {}, "Token ", input),
    h("button", { type: "submit" }, "Log in"),
    note,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      started(await api.login(input.value));
    } catch (error) {
      note.textContent = error.message;
    }
  });
  clear(main).append(form);
  input.focus();
}

function started(session) {
  api.setSession(session);
  document.getElementById("who").textContent = `token ${session.key}`;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  showAlerts();
  if (!location.hash || location.hash === "#") location.hash = "#/fleet";
  else route();
}

function loggedOut(message) {
  if (leave) leave();
  leave = null;
  api.setSession(null);
  if (stopBadge) stopBadge();
  stopBadge = null;
  document.querySelector("#nav a[data-page=alerts]").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  loginForm(message);
}

async function showAlerts() {
  // the Alerts link and its firing count only for a token that may read alerts
  const [readable] = await api.can([["alert", "read", null, null]]).catch(() => [false]);
  if (!readable || stopBadge) return;
  document.querySelector("#nav a[data-page=alerts]").hidden = false;
  const { watchFiring } = await pages.alerts();
  if (stopBadge || document.getElementById("nav").hidden) return;
  stopBadge = watchFiring(document.getElementById("alert-badge"));
}

async function route() {
  if (document.getElementById("nav").hidden) return;
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const chosen = pages[name] ? name : "fleet";
  const turn = ++routed;
  if (leave) leave();
  leave = null;
  showError("");
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === chosen);
  }
  const page = await pages[chosen]();
  if (turn !== routed) return; // another route began meanwhile
  leave = page.render(clear(main), rest.map(decodeURIComponent)) || null;
}

async function boot() {
  pages.fleet(); // fetched while the session is checked
  window.addEventListener("hashchange", route);
  window.addEventListener("taskd-logged-out", () => loggedOut("Your session ended; log in again."));
  document.getElementById("logout").addEventListener("click", async () => {
    await api.logout();
    loggedOut("");
  });
  const fragment = location.hash.match(/^#login=(.+)$/);
  if (fragment) {
    // the credential came in the fragment (never sent to the server in a URL): take it
    // out of the address bar and the history before anything else
    history.replaceState(null, "", location.pathname + "#/fleet");
    try {
      started(await api.login(decodeURIComponent(fragment[1])));
    } catch (error) {
      loginForm(error.message);
    }
    return;
  }
  const session = await api.session();
  if (session) started(session);
  else loginForm("");
}

boot();
