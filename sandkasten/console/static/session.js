// One session: its timeline kept live by /console/feed/sessions/<sid> (rendered entries replace
// or extend the list), running commands' output streamed from the exec stream as it arrives,
// its processes, and running a command or starting a terminal through the JSON API.
"use strict";
(function () {
  const SK = window.SK;
  const root = document.getElementById("session");
  const sid = root.dataset.sid;
  const list = document.getElementById("timeline");
  const streams = new Map();   // exec id -> EventSource of its output

  function follow(entry) {
    const key = entry.dataset.key;
    const url = entry.dataset.stream;
    const pre = entry.querySelector("pre[data-live]");
    if (!url || !pre || streams.has(key)) return;
    const source = new EventSource(url);
    streams.set(key, source);
    source.addEventListener("chunk", (event) => SK.append(pre, JSON.parse(event.data).chunk));
    const end = () => { source.close(); if (streams.get(key) === source) streams.delete(key); };
    source.addEventListener("done", end);
    source.addEventListener("error", (event) => { if (event.data || source.readyState === EventSource.CLOSED) end(); });
  }

  function upsert(key, html) {
    const holder = document.createElement("template");
    holder.innerHTML = html.trim();   // rendered by the server's templates: every value escaped
    const fresh = holder.content.firstElementChild;
    if (!fresh) return;
    const old = document.getElementById(`entry-${key}`);
    if (old) {
      const wasOpen = old.querySelector("details") && old.querySelector("details").open;
      const details = fresh.querySelector("details");
      if (details && wasOpen) details.open = true;
      const source = streams.get(key);
      if (source && fresh.dataset.status !== old.dataset.status) { source.close(); streams.delete(key); }
      old.replaceWith(fresh);
    } else {
      list.appendChild(fresh);
    }
    SK.paintAll(fresh);
    follow(fresh);
  }

  function connect() {
    const source = new EventSource(`/console/feed/sessions/${encodeURIComponent(sid)}?after=${root.dataset.after}`);
    source.addEventListener("open", () => SK.setLive("live", "live"));
    source.addEventListener("error", () => SK.setLive("lost", "reconnecting…"));
    source.addEventListener("entry", (event) => {
      const data = JSON.parse(event.data);
      upsert(data.key, data.html);
      root.dataset.after = event.lastEventId;
    });
    source.addEventListener("head", (event) => {
      const holder = document.createElement("template");
      holder.innerHTML = JSON.parse(event.data).html.trim();
      const head = document.getElementById("session-head");
      if (head && holder.content.firstElementChild) head.replaceWith(holder.content.firstElementChild);
    });
  }

  // ---- run a command: the exec stream route journals it; the feed shows it ----
  const runForm = document.getElementById("run-form");
  runForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("run-cmd");
    const error = document.getElementById("run-error");
    error.textContent = "";
    if (!input.value.trim()) return;
    try {
      const response = await fetch(runForm.dataset.url, {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRF-Token": SK.csrf, "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ cmd: input.value }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.message || `HTTP ${response.status}`);
      }
      response.body.cancel();   // the command runs on; its output arrives through the timeline
      input.value = "";
    } catch (err) {
      error.textContent = err.message;
    }
  });

  // ---- processes (the processes API) ----
  const procBox = document.getElementById("processes");
  const procTable = document.getElementById("process-table");
  const procRows = document.getElementById("process-rows");
  const procNote = document.getElementById("processes-note");
  const shellForm = document.getElementById("shell-form");
  let procTimer = null;

  function td(text) { const c = document.createElement("td"); c.textContent = text == null ? "—" : String(text); return c; }
  async function loadProcesses() {
    let items;
    try {
      items = await SK.api("GET", `${procBox.dataset.url}?all=true`);
    } catch (err) {
      if (err.status === 404 && err.code === "NOT_FOUND") {
        procNote.textContent = "This daemon has no processes API.";
        shellForm.hidden = true;
        clearInterval(procTimer);
        return;
      }
      procNote.textContent = err.message;
      return;
    }
    procNote.textContent = items.length ? "" : "No processes.";
    procTable.hidden = !items.length;
    const fresh = document.createDocumentFragment();
    for (const p of items) {
      const tr = document.createElement("tr");
      tr.dataset.process = p.process_id;
      const open = document.createElement("a");
      open.href = `/console/sessions/${encodeURIComponent(sid)}/processes/${encodeURIComponent(p.process_id)}`;
      open.textContent = p.process_id;
      const first = document.createElement("td");
      first.appendChild(open);
      const status = p.status + (p.status === "exited" ? ` (${p.exit_code == null ? p.signal : p.exit_code})` : "");
      tr.append(first, td(p.cmd), td(status), td(p.pid), td(p.pty ? `${p.pty.cols}×${p.pty.rows}` : "no"),
                td(p.started_at ? p.started_at.replace("T", " ").slice(0, 19) : null),
                td(`${p.output_bytes == null ? 0 : p.output_bytes} B`));
      const kill = document.createElement("td");
      if (p.status === "running") {
        const b = document.createElement("button");
        b.type = "button"; b.className = "danger"; b.textContent = "Kill";
        b.dataset.confirm = `Kill process ${p.process_id}?`;
        b.dataset.method = "DELETE";
        b.dataset.url = `${procBox.dataset.url}/${encodeURIComponent(p.process_id)}`;
        kill.appendChild(b);
      }
      tr.appendChild(kill);
      fresh.appendChild(tr);
    }
    procRows.replaceChildren(fresh);
  }
  shellForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = document.getElementById("shell-error");
    error.textContent = "";
    try {
      const p = await SK.api("POST", procBox.dataset.url,
                             { cmd: document.getElementById("shell-cmd").value || "sh", pty: { rows: 24, cols: 100 } });
      window.location.assign(`/console/sessions/${encodeURIComponent(sid)}/processes/${encodeURIComponent(p.process_id)}`);
    } catch (err) {
      error.textContent = err.message;
    }
  });

  list.querySelectorAll("li.entry").forEach(follow);
  connect();
  loadProcesses();
  procTimer = setInterval(loadProcesses, 2000);
})();
