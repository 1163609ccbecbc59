// Sandkasten console: what every page shares. Plain JS, no inline handlers (the CSP forbids
// them): the CSRF header for API calls, confirmations, ANSI colours in command output.
"use strict";
(function () {
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const SK = (window.SK = { csrf: meta("csrf-token"), nonce: meta("csp-nonce") });

  // A call to the JSON API with the login cookie and the CSRF header; resolves to the parsed
  // body, rejects with the API's error message.
  SK.api = async function (method, url, body) {
    const headers = { "X-CSRF-Token": SK.csrf, Accept: "application/json" };
    let payload = body;
    if (body !== undefined && !(body instanceof FormData)) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const response = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!response.ok) {
      const err = new Error((data && data.message) || `${method} ${url}: HTTP ${response.status}`);
      err.status = response.status;
      err.code = data && data.error_code;
      throw err;
    }
    return data;
  };

  SK.setLive = function (state, text) {
    const el = document.getElementById("live");
    if (el) { el.dataset.state = state; el.textContent = text; }
  };

  // ---- ANSI SGR escape codes -> spans with classes (colours beyond 16 via CSSOM, allowed) ----
  const CUBE = [0, 95, 135, 175, 215, 255];
  function color256(n) {
    if (n < 16) return { cls: n };
    if (n >= 232) { const v = 8 + 10 * (n - 232); return { css: `rgb(${v},${v},${v})` }; }
    const i = n - 16;
    return { css: `rgb(${CUBE[Math.floor(i / 36)]},${CUBE[Math.floor(i / 6) % 6]},${CUBE[i % 6]})` };
  }
  function applySgr(state, params) {
    const codes = params === "" ? [0] : params.split(";").map((p) => parseInt(p || "0", 10));
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) { for (const k of Object.keys(state)) delete state[k]; }
      else if (c === 1) state.bold = true;
      else if (c === 2) state.dim = true;
      else if (c === 3) state.italic = true;
      else if (c === 4) state.underline = true;
      else if (c === 7) state.inverse = true;
      else if (c === 22) { delete state.bold; delete state.dim; }
      else if (c === 23) delete state.italic;
      else if (c === 24) delete state.underline;
      else if (c === 27) delete state.inverse;
      else if (c >= 30 && c <= 37) state.fg = { cls: c - 30 };
      else if (c >= 90 && c <= 97) state.fg = { cls: c - 90 + 8 };
      else if (c === 39) delete state.fg;
      else if (c >= 40 && c <= 47) state.bg = { cls: c - 40 };
      else if (c >= 100 && c <= 107) state.bg = { cls: c - 100 + 8 };
      else if (c === 49) delete state.bg;
      else if ((c === 38 || c === 48) && codes[i + 1] === 5) {
        state[c === 38 ? "fg" : "bg"] = color256(codes[i + 2] || 0); i += 2;
      } else if ((c === 38 || c === 48) && codes[i + 1] === 2) {
        const [r, g, b] = [codes[i + 2] || 0, codes[i + 3] || 0, codes[i + 4] || 0];
        state[c === 38 ? "fg" : "bg"] = { css: `rgb(${r},${g},${b})` }; i += 4;
      }
    }
  }
  function span(text, state) {
    if (!Object.keys(state).length) return document.createTextNode(text);
    const el = document.createElement("span");
    el.textContent = text;   // text, never markup: output that prints <script> shows as text
    let fg = state.fg, bg = state.bg;
    if (state.inverse) { [fg, bg] = [bg || { cls: 0 }, fg || { cls: 15 }]; }
    for (const flag of ["bold", "dim", "italic", "underline"]) if (state[flag]) el.classList.add(`ansi-${flag}`);
    if (fg) { if (fg.css) el.style.color = fg.css; else el.classList.add(`ansi-fg-${fg.cls}`); }
    if (bg) { if (bg.css) el.style.backgroundColor = bg.css; else el.classList.add(`ansi-bg-${bg.cls}`); }
    return el;
  }
  // ESC [ params letter (CSI), ESC ] ... BEL/ST (OSC), ESC ( x (charset), other ESC x
  const ESCAPES = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[()][0-9A-Za-z]|\x1b[^[\]()]/g;
  SK.ansi = function (text) {
    const out = document.createDocumentFragment();
    const state = {};
    let last = 0;
    text = text.replace(/\r\n/g, "\n");
    for (const m of text.matchAll(ESCAPES)) {
      if (m.index > last) out.appendChild(span(text.slice(last, m.index), state));
      if (m[2] === "m") applySgr(state, m[1]);
      last = m.index + m[0].length;
    }
    if (last < text.length) out.appendChild(span(text.slice(last), state));
    return out;
  };
  // Colour a <pre data-ansi>: its text (escaped by the server) becomes coloured spans.
  SK.paint = function (pre) {
    if (pre.dataset.raw === undefined) pre.dataset.raw = pre.textContent;
    pre.replaceChildren(SK.ansi(pre.dataset.raw));
  };
  SK.append = function (pre, text) {
    pre.dataset.raw = (pre.dataset.raw || "") + text;
    if (!pre._pending) {
      pre._pending = true;
      requestAnimationFrame(() => { pre._pending = false; SK.paint(pre); pre.scrollTop = pre.scrollHeight; });
    }
  };
  SK.paintAll = function (root) { root.querySelectorAll("pre[data-ansi]").forEach(SK.paint); };

  // ---- buttons that change something: confirm, then call the API ----
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-confirm]");
    if (!button) return;
    event.preventDefault();
    if (!window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      await SK.api(button.dataset.method || "POST", button.dataset.url);
      if (button.dataset.then === "reload") window.location.reload();
      else if (button.dataset.then) window.location.assign(button.dataset.then);
    } catch (err) {
      window.alert(err.message);
    } finally {
      button.disabled = false;
    }
  });

  document.addEventListener("DOMContentLoaded", () => SK.paintAll(document));
})();
