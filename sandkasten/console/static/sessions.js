// The sessions table, kept live by /console/feed/sessions (Server-Sent Events): rows appear,
// change and go without a reload; cpu and memory of running sessions as small plots.
"use strict";
(function () {
  const SK = window.SK;
  const rows = document.getElementById("session-rows");
  const empty = document.getElementById("no-sessions");
  const search = document.getElementById("search");
  const statusFilter = document.getElementById("status-filter");
  const showEnded = document.getElementById("show-ended");
  const showPool = document.getElementById("show-pool");
  const history = new Map();   // session id -> [{t, cpu, mem}]
  const SAMPLES = 40;
  let sessions = [];
  let source = null;

  function age(iso, now) {
    const s = Math.max(0, Math.floor((now - Date.parse(iso)) / 1000));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }
  function mib(bytes) { return `${(bytes / 1048576).toFixed(1)} MiB`; }

  function record(session) {
    const st = session.stats;
    if (!st) return;
    const list = history.get(session.id) || [];
    const prev = list[list.length - 1];
    if (prev && prev.t === st.t) return;
    // cpu: share of one core over the last interval, from the cumulative usage
    const cpu = prev ? Math.max(0, (st.cpu_usage_usec - prev.usec) / 1e6 / (st.t - prev.t)) : 0;
    list.push({ t: st.t, usec: st.cpu_usage_usec, cpu, mem: st.memory_bytes, limit: st.memory_limit });
    while (list.length > SAMPLES) list.shift();
    history.set(session.id, list);
  }

  const SVG = "http://www.w3.org/2000/svg";
  function spark(values, ceiling, label) {
    const wrap = document.createElement("span");
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", "80");
    svg.setAttribute("height", "20");
    svg.setAttribute("viewBox", "0 0 80 20");
    const line = document.createElementNS(SVG, "polyline");
    const top = Math.max(ceiling || 0, ...values, 1e-9);
    const step = values.length > 1 ? 80 / (SAMPLES - 1) : 0;
    const offset = 80 - step * (values.length - 1);
    line.setAttribute("points", values.map((v, i) => `${(offset + i * step).toFixed(1)},${(19 - (v / top) * 18).toFixed(1)}`).join(" "));
    svg.appendChild(line);
    const text = document.createElement("span");
    text.className = "spark-value";
    text.textContent = label;
    wrap.append(svg, text);
    return wrap;
  }

  function cell(content, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (content instanceof Node) td.appendChild(content); else td.textContent = content == null ? "—" : String(content);
    return td;
  }

  function matches(s) {
    if (statusFilter.value && s.status !== statusFilter.value) return false;
    if (!showPool.checked && s.pool === "idle") return false;
    const q = search.value.trim().toLowerCase();
    if (!q) return true;
    return [s.id, s.image, s.workspace_id, s.actor, s.status].some((v) => v && String(v).toLowerCase().includes(q));
  }

  function render(now) {
    const shown = sessions.filter(matches).reverse();   // newest first
    const fresh = document.createDocumentFragment();
    for (const s of shown) {
      const tr = document.createElement("tr");
      tr.dataset.id = s.id;
      tr.dataset.status = s.status;
      if (s.status === "destroyed" || s.status === "failed") tr.className = "gone";
      const link = document.createElement("a");
      link.href = `/console/sessions/${encodeURIComponent(s.id)}`;
      link.textContent = s.id;
      const status = document.createElement("span");
      status.className = `status status-${s.status}`;
      status.textContent = s.status + (s.pool === "idle" ? " (pool, idle)" : "");
      const h = history.get(s.id) || [];
      const last = h[h.length - 1];
      const cpu = s.status === "running" && last ? spark(h.map((x) => x.cpu), s.cpu_limit, `${(last.cpu * 100).toFixed(0)}%`) : "—";
      const mem = s.status === "running" && last ? spark(h.map((x) => x.mem), 0, mib(last.mem)) : "—";
      let action = "";
      if (!["destroyed", "destroying", "failed"].includes(s.status)) {
        action = document.createElement("button");
        action.type = "button";
        action.className = "danger";
        action.textContent = "Destroy";
        action.dataset.confirm = `Destroy session ${s.id}? Its sandbox and processes end.`;
        action.dataset.method = "DELETE";
        action.dataset.url = `/v1/sessions/${encodeURIComponent(s.id)}`;
      }
      tr.append(cell(link), cell(status), cell(s.image), cell(age(s.created_at, now)), cell(s.exec_count),
                cell(cpu, "plot"), cell(mem, "plot"), cell(s.pooled ? "yes" : "no"), cell(s.workspace_id || "—"),
                cell(action));
      fresh.appendChild(tr);
    }
    rows.replaceChildren(fresh);
    empty.hidden = shown.length > 0;
  }

  function connect() {
    if (source) source.close();
    source = new EventSource(`/console/feed/sessions?ended=${showEnded.checked}`);
    source.addEventListener("open", () => SK.setLive("live", "live"));
    source.addEventListener("error", () => SK.setLive("lost", "reconnecting…"));
    source.addEventListener("sessions", (event) => {
      const data = JSON.parse(event.data);
      sessions = data.sessions;
      sessions.forEach(record);
      render(Date.parse(data.now));
      SK.setLive("live", "live");
    });
  }

  for (const el of [search, statusFilter, showPool]) el.addEventListener("input", () => render(Date.now()));
  showEnded.addEventListener("change", connect);
  connect();
})();
