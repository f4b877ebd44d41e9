// The one way the page reaches the server: POST /ui/api with a JSON-RPC request that
// carries no token (the server adds the session's), the CSRF token in a header.

let csrf = "";
let nextId = 1;

export class RpcError extends Error {
  constructor(error) {
    super(error.message);
    this.code = error.code;
  }
}

export function setSession(session) {
  csrf = session ? session.csrf : "";
}

async function send(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": csrf },
    body: JSON.stringify(body),
  });
  if (response.status === 401) {
    window.dispatchEvent(new CustomEvent("taskd-logged-out"));
    throw new Error("Logged out");
  }
  if (!response.ok && response.status !== 204) {
    const detail = await response.json().catch(() => ({}));
    throw new Error(detail.error || `HTTP ${response.status}`);
  }
  return response.status === 204 ? null : response.json();
}

export async function rpc(method, params = []) {
  const reply = await send("api", { jsonrpc: "2.0", method, params, id: nextId++ });
  if (reply.error) throw new RpcError(reply.error);
  return reply.result;
}

export async function can(needs) {
  if (!needs.length) return [];
  return send("can", { needs });
}

export async function login(token) {
  const response = await fetch("login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

export async function session() {
  const response = await fetch("session", { credentials: "same-origin" });
  return response.ok ? response.json() : null;
}

export async function logout() {
  await send("logout", {}).catch(() => null);
}

export function socketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ui/${path}`;
}
