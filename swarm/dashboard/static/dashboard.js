// The swarm dashboard: draws /api/status (schema version 1) and follows /events (one status a second).
// Every value shown comes from the network (peer ids, addresses, causes): it is inserted as text
// (textContent), never as HTML, and cut to a bounded length.
"use strict";
(() => {
  const MAX_TEXT = 200;        // characters shown of any string from the status
  const MAX_ROWS = 500;        // peer/run/stage/ban rows drawn
  const MAX_ROUND_ROWS = 50;   // averaging rounds listed (newest first); the chart shows up to 200
  const STALE_MS = 5000;       // no message for this long: reconnect
  const COLORS = ["#2f6fdb", "#e07b28", "#2e9d5b", "#8e44ad", "#d64545"];

  const $ = (id) => document.getElementById(id);
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const list = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : {});

  function text(v, max = MAX_TEXT) {
    if (v === null || v === undefined) return "–";
    let s = typeof v === "string" ? v : typeof v === "number" || typeof v === "boolean" ? String(v) : JSON.stringify(v);
    if (s === undefined) s = "–";
    return s.length > max ? s.slice(0, max - 1) + "…" : s;
  }
  function setText(id, v, max) { const e = $(id); if (e) e.textContent = text(v, max); }
  function cell(content, cls, title) {
    const td = document.createElement("td");
    td.textContent = text(content);
    if (cls) td.className = cls;
    if (title !== undefined) td.title = text(title, 1000);
    return td;
  }
  function badge(value) {
    const td = document.createElement("td");
    const span = document.createElement("span");
    const s = text(value, 40);
    span.textContent = s;
    span.className = "badge " + (/^[a-z]+$/.test(s) ? s : "unknown");
    td.appendChild(span);
    return td;
  }
  function fmt(v, digits = 2) {
    v = num(v);
    if (v === null) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(digits);
    if (a >= 1000) return Math.round(v).toLocaleString("en-US");
    return v.toFixed(a >= 100 ? 0 : a >= 10 ? Math.min(digits, 1) : digits);
  }
  function fmtInt(v) { v = num(v); return v === null ? "–" : Math.round(v).toLocaleString("en-US"); }
  function fmtBytes(v) {
    v = num(v);
    if (v === null) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }
  function fmtAgo(s) {
    s = num(s);
    if (s === null) return "–";
    s = Math.max(s, 0);
    if (s < 2) return "now";
    if (s < 90) return s.toFixed(0) + " s ago";
    if (s < 5400) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  function fmtDuration(s) {
    s = num(s);
    if (s === null) return "–";
    if (s < 90) return s.toFixed(0) + " s";
    if (s < 5400) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtClock(t) {
    t = num(t);
    if (t === null) return "–";
    const d = new Date(t * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }
  function fill(tbodyId, emptyId, rows, build) {
    const body = $(tbodyId);
    const frag = document.createDocumentFragment();
    rows.slice(0, MAX_ROWS).forEach((r) => frag.appendChild(build(obj(r))));
    body.replaceChildren(frag);
    $(emptyId).classList.toggle("hidden", rows.length > 0);
  }

  // ---------------------------------------------------------------- charts on <canvas>

  function niceStep(span, count) {
    const raw = span / Math.max(count, 1);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  }
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
  function timeStep(span, count) {
    const raw = span / Math.max(count, 1);
    for (const s of TIME_STEPS) if (s >= raw) return s;
    return Math.ceil(raw / 86400) * 86400;
  }
  function prepare(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(canvas.clientWidth, 100), h = Math.max(canvas.clientHeight, 80);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, w, h };
  }
  function waiting(ctx, w, h, message) {
    ctx.fillStyle = "#6b7385";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(message, w / 2, h / 2);
  }

  // series: [{label, x: [unix s], y: [number|null], color, step}]; opts: {zero, integer, format}
  function lineChart(canvas, series, opts = {}) {
    const { ctx, w, h } = prepare(canvas);
    const pad = { l: 58, r: 14, t: 20, b: 24 };
    let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity, points = 0;
    for (const s of series) {
      const n = Math.min(s.x.length, s.y.length);
      for (let i = 0; i < n; i++) {
        const x = num(s.x[i]), y = num(s.y[i]);
        if (x === null || y === null) continue;
        xmin = Math.min(xmin, x); xmax = Math.max(xmax, x);
        ymin = Math.min(ymin, y); ymax = Math.max(ymax, y);
        points++;
      }
    }
    canvas.dataset.points = String(points);
    const first = series[0];
    const lastY = first ? [...first.y].reverse().find((v) => num(v) !== null) : undefined;
    canvas.dataset.last = lastY === undefined ? "" : String(lastY);
    if (points === 0) { waiting(ctx, w, h, "waiting for data…"); return; }
    if (opts.zero) { ymin = Math.min(ymin, 0); ymax = Math.max(ymax, 0); }
    if (ymax - ymin < 1e-12) { const d = Math.abs(ymax) * 0.1 || 1; ymin -= d; ymax += d; }
    else if (!opts.zero) { const d = (ymax - ymin) * 0.06; ymin -= d; ymax += d; }
    else { ymax += (ymax - ymin) * 0.06; }
    if (xmax - xmin < 1) { xmin -= 1; xmax += 1; }
    const sx = (x) => pad.l + ((x - xmin) / (xmax - xmin)) * (w - pad.l - pad.r);
    const sy = (y) => h - pad.b - ((y - ymin) / (ymax - ymin)) * (h - pad.t - pad.b);

    // grid and axes
    ctx.strokeStyle = "#e1e4ea"; ctx.fillStyle = "#6b7385"; ctx.lineWidth = 1;
    let ystep = niceStep(ymax - ymin, 4);
    if (opts.integer) ystep = Math.max(1, Math.round(ystep));
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (let v = Math.ceil(ymin / ystep) * ystep; v <= ymax + ystep * 1e-9; v += ystep) {
      const y = Math.round(sy(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
      ctx.fillText((opts.format || fmt)(Math.abs(v) < ystep * 1e-9 ? 0 : v), pad.l - 6, y);
    }
    const xstep = timeStep(xmax - xmin, Math.max(2, Math.floor((w - pad.l - pad.r) / 90)));
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (let v = Math.ceil(xmin / xstep) * xstep; v <= xmax; v += xstep) {
      const x = Math.round(sx(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(x, pad.t); ctx.lineTo(x, h - pad.b); ctx.stroke();
      const label = fmtClock(v), half = ctx.measureText(label).width / 2 + 1;
      ctx.fillText(label, Math.min(Math.max(x, half), w - half), h - pad.b + 5);  // kept inside the canvas
    }
    ctx.strokeStyle = "#b8bdc8";
    ctx.beginPath(); ctx.moveTo(pad.l + 0.5, pad.t); ctx.lineTo(pad.l + 0.5, h - pad.b + 0.5);
    ctx.lineTo(w - pad.r, h - pad.b + 0.5); ctx.stroke();

    // the series: lines broken at nulls, a dot for an isolated point and at the newest point
    series.forEach((s, k) => {
      const color = s.color || COLORS[k % COLORS.length];
      ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2; ctx.lineJoin = "round";
      const n = Math.min(s.x.length, s.y.length);
      let drawing = false, prevY = null, run = 0, lastPoint = null;
      ctx.beginPath();
      for (let i = 0; i < n; i++) {
        const x = num(s.x[i]), y = num(s.y[i]);
        if (x === null || y === null) {
          if (run === 1 && lastPoint) ctx.fillRect(lastPoint[0] - 2, lastPoint[1] - 2, 4, 4);
          drawing = false; run = 0; continue;
        }
        const px = sx(x), py = sy(y);
        if (!drawing) { ctx.moveTo(px, py); drawing = true; }
        else if (s.step && prevY !== null) { ctx.lineTo(px, prevY); ctx.lineTo(px, py); }
        else ctx.lineTo(px, py);
        prevY = py; run++; lastPoint = [px, py];
      }
      ctx.stroke();
      if (lastPoint) { ctx.beginPath(); ctx.arc(lastPoint[0], lastPoint[1], 3, 0, 2 * Math.PI); ctx.fill(); }
    });

    // legend
    ctx.textAlign = "left"; ctx.textBaseline = "middle";
    let lx = pad.l + 6;
    series.forEach((s, k) => {
      const color = s.color || COLORS[k % COLORS.length];
      const last = [...s.y].reverse().find((v) => num(v) !== null);
      const label = s.label + (last === undefined ? "" : " " + (opts.format || fmt)(last));
      ctx.fillStyle = color; ctx.fillRect(lx, 6, 10, 3);
      ctx.fillStyle = "#1d2433"; ctx.fillText(label, lx + 14, 8);
      lx += ctx.measureText(label).width + 32;
    });
  }

  // rounds: [{t, seconds, group_size, result}] -> one bar per round (height: seconds), label: group size
  function roundsChart(canvas, rounds) {
    const { ctx, w, h } = prepare(canvas);
    const shown = rounds.slice(-200);
    canvas.dataset.points = String(shown.length);
    if (shown.length === 0) { waiting(ctx, w, h, "no averaging rounds yet"); return; }
    const pad = { l: 58, r: 14, t: 20, b: 24 };
    let ymax = 0;
    for (const r of shown) ymax = Math.max(ymax, num(r.seconds) || 0);
    ymax = ymax > 0 ? ymax * 1.15 : 1;
    const sy = (y) => h - pad.b - (y / ymax) * (h - pad.t - pad.b);
    ctx.strokeStyle = "#e1e4ea"; ctx.fillStyle = "#6b7385"; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    const ystep = niceStep(ymax, 4);
    for (let v = 0; v <= ymax + 1e-9; v += ystep) {
      const y = Math.round(sy(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
      ctx.fillText(fmt(v) + " s", pad.l - 6, y);
    }
    const slot = (w - pad.l - pad.r) / shown.length;
    const bar = Math.max(1, Math.min(28, slot * 0.7));
    ctx.textAlign = "center"; ctx.textBaseline = "bottom";
    let failed = 0;
    shown.forEach((r0, i) => {
      const r = obj(r0);
      const ok = r.result === "ok";
      if (!ok) failed++;
      const x = pad.l + slot * (i + 0.5);
      const top = sy(num(r.seconds) || 0);
      ctx.fillStyle = ok ? "#2e9d5b" : "#d64545";
      ctx.fillRect(x - bar / 2, top, bar, Math.max(h - pad.b - top, 1));
      if (slot >= 14) { ctx.fillStyle = "#1d2433"; ctx.fillText(text(num(r.group_size), 6), x, top - 2); }
    });
    ctx.textBaseline = "top"; ctx.fillStyle = "#6b7385";
    ctx.fillText(fmtClock(obj(shown[0]).t), pad.l + slot / 2, h - pad.b + 5);
    if (shown.length > 1) {
      ctx.textAlign = "right";
      ctx.fillText(fmtClock(obj(shown[shown.length - 1]).t), w - pad.r, h - pad.b + 5);
    }
    ctx.textAlign = "left"; ctx.textBaseline = "middle";
    ctx.fillStyle = "#2e9d5b"; ctx.fillRect(pad.l + 6, 6, 10, 3);
    ctx.fillStyle = "#1d2433"; ctx.fillText("ok " + (shown.length - failed), pad.l + 20, 8);
    ctx.fillStyle = "#d64545"; ctx.fillRect(pad.l + 70, 6, 10, 3);
    ctx.fillStyle = "#1d2433"; ctx.fillText("failed " + failed, pad.l + 84, 8);
  }

  // ---------------------------------------------------------------- panels

  function renderSummary(st) {
    const p = obj(st.progress);
    const peers = list(st.peers);
    const online = peers.filter((x) => obj(x).state !== "left");
    setText("run-id", p.run_id !== null && p.run_id !== undefined ? p.run_id :
      obj(st.self).run_id || (list(st.runs).length ? list(st.runs).length + " runs" : "no run"), 80);
    setText("epoch", fmtInt(p.epoch));
    const target = num(p.target_batch_size), samples = num(p.samples);
    $("epoch-meter").style.width = target && samples !== null ? Math.min(100, (100 * samples) / target) + "%" : "0";
    setText("epoch-samples", target ? fmtInt(samples) + " / " + fmtInt(target) + " samples to the next epoch"
      : samples !== null ? fmtInt(samples) + " samples" : "–");
    setText("peer-count", String(online.length));
    const roles = {};
    online.forEach((x) => { const r = text(obj(x).role, 20); roles[r] = (roles[r] || 0) + 1; });
    const left = peers.length - online.length;
    setText("peer-roles", Object.keys(roles).sort().map((r) => roles[r] + " " + r + (roles[r] === 1 ? "" : "s")).join(", ") +
      (left ? (online.length ? ", " : "") + left + " left" : "") || "–");
    setText("samples-per-second", fmt(p.samples_per_second, 1));
    setText("loss", fmt(p.loss, 4));
    setText("heldout", fmt(p.heldout, 4));
  }

  function renderSelf(me) {
    if (me === null || typeof me !== "object") {
      setText("self-peer-id", "–"); setText("self-line", "no local peer"); $("self-addresses").replaceChildren();
      return;
    }
    setText("self-peer-id", me.peer_id);
    setText("self-line", [text(me.role, 20), text(me.state, 40), "up " + fmtDuration(me.uptime_s),
      me.run_id ? "run " + text(me.run_id, 60) : "no run"].join(" · "));
    const frag = document.createDocumentFragment();
    list(me.addresses).slice(0, 8).forEach((a) => {
      const div = document.createElement("div");
      div.textContent = text(a);
      frag.appendChild(div);
    });
    $("self-addresses").replaceChildren(frag);
  }

  function renderCharts(history, rounds) {
    const hs = obj(history);
    const t = list(hs.t);
    lineChart($("chart-loss"), [
      { label: "loss", x: t, y: list(hs.loss), color: COLORS[0] },
      { label: "held-out", x: t, y: list(hs.heldout), color: COLORS[1] },
    ], { format: (v) => fmt(v, 3) });
    lineChart($("chart-sps"), [{ label: "samples/s", x: t, y: list(hs.samples_per_second), color: COLORS[2] }],
      { zero: true, format: (v) => fmt(v, 1) });
    lineChart($("chart-epoch"), [{ label: "epoch", x: t, y: list(hs.epoch), color: COLORS[3], step: true }],
      { integer: true, format: fmtInt });
    roundsChart($("chart-rounds"), rounds);
  }

  function renderPeers(peers) {
    setText("peers-total", peers.length ? "(" + peers.length + ")" : "");
    fill("peers-body", "peers-empty", peers, (p) => {
      const tr = document.createElement("tr");
      tr.dataset.peerId = text(p.peer_id, 128);
      tr.dataset.state = text(p.state, 20);
      if (p.state === "left") tr.className = "left";
      tr.appendChild(cell(p.peer_id, "mono", p.peer_id));
      tr.appendChild(cell(p.address, "mono", p.address));
      const stage = num(p.stage);
      tr.appendChild(cell(text(p.role, 20) + (stage === null ? "" : " / stage " + stage)));
      tr.appendChild(cell(fmt(p.samples_per_second, 1), "num"));
      tr.appendChild(badge(p.reachability));
      tr.appendChild(cell(fmtAgo(p.last_seen_s), "num"));
      tr.appendChild(badge(p.state));
      return tr;
    });
  }

  function renderRuns(runs) {
    setText("runs-total", runs.length ? "(" + runs.length + ")" : "");
    fill("runs-body", "runs-empty", runs, (r) => {
      const tr = document.createElement("tr");
      tr.dataset.runId = text(r.run_id, 128);
      tr.appendChild(cell(r.run_id, "mono"));
      tr.appendChild(cell(fmtInt(r.peers), "num"));
      tr.appendChild(cell(fmtInt(r.epoch), "num"));
      tr.appendChild(cell(fmt(r.samples_per_second, 1), "num"));
      tr.appendChild(cell(fmtAgo(r.last_seen_s), "num"));
      return tr;
    });
  }

  function renderRounds(rounds) {
    const failed = rounds.filter((r) => obj(r).result !== "ok").length;
    setText("rounds-total", rounds.length ? "(" + rounds.length + (failed ? ", " + failed + " failed" : "") + ")" : "");
    const newest = rounds.slice(-MAX_ROUND_ROWS).reverse();
    fill("rounds-body", "rounds-empty", newest, (r) => {
      const tr = document.createElement("tr");
      tr.appendChild(cell(fmtClock(r.t)));
      tr.appendChild(cell(fmtInt(r.group_size), "num"));
      tr.appendChild(cell(fmt(r.seconds, 2), "num"));
      tr.appendChild(cell(fmtBytes(r.bytes_sent), "num"));
      tr.appendChild(cell(fmtBytes(r.bytes_received), "num"));
      tr.appendChild(badge(r.result));
      tr.appendChild(cell(r.cause === null || r.cause === undefined ? "" : r.cause, null, r.cause));
      return tr;
    });
  }

  // stages and bans: filled by later issues; drawn generically (one column per key of the first row)
  function renderGeneric(name, rows) {
    setText(name + "-total", rows.length ? "(" + rows.length + ")" : "");
    const keys = rows.length ? Object.keys(obj(rows[0])).slice(0, 12) : [];
    const head = document.createElement("tr");
    keys.forEach((k) => { const th = document.createElement("th"); th.textContent = text(k, 40); head.appendChild(th); });
    $(name + "-head").replaceChildren(...(keys.length ? [head] : []));
    fill(name + "-body", name + "-empty", rows, (r) => {
      const tr = document.createElement("tr");
      keys.forEach((k) => tr.appendChild(cell(r[k])));
      return tr;
    });
  }

  let latest = null;
  function render(st) {
    if (st === null || typeof st !== "object" || st.version !== 1) {
      setText("error", "unsupported status (version " + text(obj(st).version, 20) + ")");
      return;
    }
    latest = st;
    renderSummary(st);
    renderSelf(st.self);
    renderCharts(st.history, list(obj(st.averaging).rounds));
    renderPeers(list(st.peers));
    renderRuns(list(st.runs));
    renderRounds(list(obj(st.averaging).rounds));
    renderGeneric("stages", list(st.stages));
    renderGeneric("bans", list(st.bans));
    setText("generated", "status of " + new Date((num(st.generated_at) || 0) * 1000).toLocaleString());
    setText("error", "");
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  // ---------------------------------------------------------------- live updates

  let source = null, lastMessage = 0, retryTimer = null;
  function connection(state, label) {
    const e = $("connection");
    e.className = "connection " + state;
    e.textContent = label;
  }
  function connect() {
    if (retryTimer !== null) { clearTimeout(retryTimer); retryTimer = null; }
    if (source !== null) source.close();
    source = new EventSource("/events");
    lastMessage = Date.now();
    source.onmessage = (event) => {
      lastMessage = Date.now();
      let st;
      try { st = JSON.parse(event.data); } catch (err) { setText("error", "bad status message"); return; }
      try { render(st); } catch (err) { setText("error", "drawing failed: " + text(String(err), 120)); }
      connection("live", "live");
    };
    source.onerror = () => {
      connection("down", "peer unreachable: reconnecting…");
      if (source.readyState === EventSource.CLOSED) {  // the browser gave up (e.g. a 503): retry ourselves
        source.close(); source = null;
        retryTimer = setTimeout(connect, 2000);
      }
    };
  }
  setInterval(() => {  // a stream that went silent (peer frozen, proxy): reopen it
    if (source !== null && Date.now() - lastMessage > STALE_MS) { connection("stale", "stale: reconnecting…"); connect(); }
  }, 1000);
  window.addEventListener("resize", () => { if (latest) renderCharts(latest.history, list(obj(latest.averaging).rounds)); });

  fetch("/api/status", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : null))
    .then((st) => { if (st && Number(document.body.dataset.updates) === 0) render(st); })
    .catch(() => {});
  connect();
})();
