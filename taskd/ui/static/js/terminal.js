// A web terminal: a web_shell task tells the agent to open a slot on the /terminal relay,
// and the page attaches through /ui/terminal (the server adds the session's token).

import { Terminal } from "../vendor/xterm.mjs";
import { FitAddon } from "../vendor/addon-fit.mjs";
import { rpc, socketUrl } from "./api.js";

export async function openTerminal(screen, uuid, status) {
  const terminalId = crypto.randomUUID();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  status.textContent = "asking the agent to open a shell…";
  await rpc("task_create_task", [
    uuid,
    { web_shell: { url: `${scheme}//${location.host}/auto_gen`, terminal_id: terminalId } },
  ]);
  const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 14 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  fit.fit();
  const query = new URLSearchParams({ agent_uuid: uuid, terminal_id: terminalId });
  const socket = new WebSocket(`${socketUrl("terminal")}?${query}`);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  socket.addEventListener("open", () => {
    status.textContent = "connected";
    socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  });
  socket.addEventListener("message", (event) => {
    if (typeof event.data === "string") {
      try {
        const error = JSON.parse(event.data);
        if (error.error_message) {
          status.textContent = error.error_message;
          return;
        }
      } catch (e) {
        // not a control frame: shown as output
      }
      term.write(event.data);
    } else {
      term.write(new Uint8Array(event.data));
    }
  });
  socket.addEventListener("close", () => {
    if (!status.textContent.startsWith("connected")) return;
    status.textContent = "closed";
  });
  term.onData((data) => socket.readyState === WebSocket.OPEN && socket.send(encoder.encode(data)));
  term.onResize(({ cols, rows }) => socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify({ type: "resize", cols, rows })));
  window.taskdTerminal = term;
  return { close: () => { socket.close(); term.dispose(); } };
}
