// A process's terminal: xterm.js fed by the process's output stream (SSE, raw bytes), read-only
// until the user ticks "allow input"; then keys go to POST …/stdin and the size follows the window.
"use strict";
(function () {
  const SK = window.SK;
  const page = document.getElementById("terminal-page");
  const url = page.dataset.url;
  const errorBox = document.getElementById("terminal-error");
  const statusBox = document.getElementById("process-status");
  const box = document.getElementById("terminal");
  let write;                  // (text, bytes) -> shown
  let term = null, fit = null, process = null;

  if (box && window.Terminal) {
    // xterm.js adds <style> elements at run time: give them this page's CSP nonce
    const create = document.createElement.bind(document);
    document.createElement = function (tag, options) {
      const el = create(tag, options);
      if (String(tag).toLowerCase() === "style") el.setAttribute("nonce", SK.nonce);
      return el;
    };
    term = new window.Terminal({ disableStdin: true, convertEol: false, scrollback: 5000, cursorBlink: false,
                                 fontFamily: "DejaVu Sans Mono, monospace", fontSize: 14 });
    fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    write = (text, bytes) => term.write(bytes || text);
  } else {
    const pre = document.getElementById("plain-output");
    write = (text) => SK.append(pre, text);
  }

  function decode(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // ---- input, only when asked for ----
  const allow = document.getElementById("allow-input");
  let pending = "", sending = false;
  async function flush() {
    if (sending || !pending) return;
    sending = true;
    const data = pending;
    pending = "";
    try {
      await SK.api("POST", `${url}/stdin`, { data });
    } catch (err) {
      errorBox.textContent = `input not sent: ${err.message}`;
    }
    sending = false;
    flush();
  }
  async function sendSize() {
    if (!term || !allow || !allow.checked || !process || !process.pty || process.status !== "running") return;
    try {
      await SK.api("POST", `${url}/resize`, { rows: term.rows, cols: term.cols });
    } catch (err) {
      errorBox.textContent = `resize failed: ${err.message}`;
    }
  }
  if (term) {
    term.onData((data) => {
      if (!allow.checked) return;
      pending += data;
      flush();
    });
    allow.addEventListener("change", () => {
      term.options.disableStdin = !allow.checked;
      box.dataset.readonly = String(!allow.checked);
      if (allow.checked) { fit.fit(); sendSize(); term.focus(); }
    });
    window.addEventListener("resize", () => { if (allow.checked) { fit.fit(); sendSize(); } });
  }

  function show(p) {
    process = p;
    document.getElementById("process-cmd").textContent = p.cmd;
    document.getElementById("process-pty").textContent = p.pty ? `${p.pty.cols}×${p.pty.rows}` : "none (pipes)";
    statusBox.textContent = p.status + (p.status === "exited"
      ? ` (${p.exit_code == null ? "signal " + p.signal : "exit " + p.exit_code})` : "");
    if (term) term.options.convertEol = !p.pty;   // pipes send bare newlines; a PTY sends CR LF itself
    if (term && p.pty && !(allow && allow.checked)) term.resize(p.pty.cols, p.pty.rows);
    if (term && !p.pty) fit.fit();
  }

  async function start() {
    try {
      show(await SK.api("GET", url));
    } catch (err) {
      errorBox.textContent = err.message;
      SK.setLive("lost", "unavailable");
      return;
    }
    const source = new EventSource(`${url}/stream?raw_output=true`);
    source.addEventListener("open", () => SK.setLive("live", "live"));
    source.addEventListener("chunk", (event) => {
      const c = JSON.parse(event.data);
      write(c.chunk, c.chunk_base64 ? decode(c.chunk_base64) : null);
    });
    source.addEventListener("done", async (event) => {
      source.close();
      const d = JSON.parse(event.data);
      write(`\r\n[process ended: ${d.exit_code == null ? "signal " + d.signal : "exit code " + d.exit_code}]\r\n`);
      SK.setLive("", "ended");
      try { show(await SK.api("GET", url)); } catch (err) { /* the page keeps what it showed */ }
    });
    source.addEventListener("error", (event) => {
      if (event.data) {
        source.close();
        errorBox.textContent = JSON.parse(event.data).message;
        SK.setLive("lost", "ended");
      } else {
        SK.setLive("lost", "reconnecting…");
      }
    });
  }
  start();
})();
