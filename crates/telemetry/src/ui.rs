//! The built-in status page (`GET /`): one self-contained HTML document, no
//! external assets, that polls `/v1/stats` and draws the queue, rates,
//! latencies, backends and the bottleneck, for operators without Grafana.
//!
//! Every number it shows sits in an element with `data-stat="<path in the
//! /v1/stats JSON>"` and the raw value in `data-value`, so a test (or a
//! scraper) can check what was rendered.

/// The page. The poll interval is `?every=<seconds>` (default 2).
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>convstore status</title>
<style>
  :root { --bg:#f5f6f8; --card:#fff; --ink:#1d2330; --muted:#6b7280; --line:#e3e6eb;
          --ok:#15803d; --warn:#b45309; --crit:#b91c1c; --accent:#2563eb; --accent2:#9333ea; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
         background:var(--bg); color:var(--ink); }
  header { display:flex; align-items:center; gap:16px; padding:14px 24px; background:var(--card);
           border-bottom:1px solid var(--line); }
  header h1 { font-size:18px; margin:0; }
  header .meta { color:var(--muted); }
  .badge { padding:3px 10px; border-radius:12px; font-weight:600; color:#fff; background:var(--muted);
           text-transform:uppercase; font-size:12px; letter-spacing:.04em; }
  .badge.healthy { background:var(--ok); } .badge.warning { background:var(--warn); }
  .badge.critical { background:var(--crit); }
  main { padding:16px 24px; display:grid; gap:16px;
         grid-template-columns:repeat(auto-fill, minmax(340px, 1fr)); }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
  section.wide { grid-column:1 / -1; }
  h2 { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 10px; }
  .big { font-size:26px; font-weight:600; font-variant-numeric:tabular-nums; }
  .row { display:flex; justify-content:space-between; gap:8px; padding:2px 0; }
  .row span:first-child { color:var(--muted); }
  .num { font-variant-numeric:tabular-nums; }
  .bar { height:14px; background:var(--line); border-radius:7px; overflow:hidden; margin:8px 0; }
  .bar > div { height:100%; width:0; background:var(--accent); transition:width .3s; }
  .bar.warn > div { background:var(--warn); } .bar.crit > div { background:var(--crit); }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th, td { text-align:right; padding:4px 6px; border-bottom:1px solid var(--line); }
  th:first-child, td:first-child { text-align:left; }
  th { color:var(--muted); font-weight:500; font-size:12px; }
  ul.reasons { margin:6px 0 0; padding-left:18px; }
  ul.reasons li.critical { color:var(--crit); } ul.reasons li.warning { color:var(--warn); }
  svg { width:100%; height:90px; display:block; }
  .legend { font-size:12px; color:var(--muted); }
  .legend b { display:inline-block; width:10px; height:3px; vertical-align:middle; margin:0 4px 0 10px; }
  #error { display:none; background:#fee2e2; color:var(--crit); padding:8px 24px; }
  footer { color:var(--muted); padding:0 24px 16px; font-size:12px; }
</style>
</head>
<body>
<header>
  <h1>convstore</h1>
  <span class="badge" id="health" data-stat="health.status">loading</span>
  <span class="meta">version <span data-stat="version">–</span> · up <span data-stat="uptime_seconds">–</span>
    · window <span data-stat="window_seconds">–</span></span>
</header>
<div id="error"></div>
<main>
  <section class="wide" id="health-section">
    <h2>Health</h2>
    <div id="health-summary">Waiting for the first snapshot…</div>
    <ul class="reasons" id="reasons"></ul>
  </section>

  <section>
    <h2>Queue</h2>
    <div class="big"><span data-stat="queue.depth">–</span> <small class="meta">/ <span data-stat="queue.capacity">–</span></small></div>
    <div class="bar" id="queue-bar"><div></div></div>
    <div class="row"><span>bytes</span><span class="num"><span data-stat="queue.bytes">–</span> / <span data-stat="queue.max_bytes">–</span></span></div>
    <div class="row"><span>in flight (workers)</span><span class="num"><span data-stat="queue.in_flight">–</span> (<span data-stat="queue.workers">–</span>)</span></div>
    <svg id="chart-queue" viewBox="0 0 300 90" preserveAspectRatio="none"></svg>
    <div class="legend"><b style="background:var(--accent)"></b>depth over the last minutes</div>
  </section>

  <section>
    <h2>Throughput (per second)</h2>
    <div class="row"><span>accepted</span><span class="num" data-stat="rates.accepted_per_second">–</span></div>
    <div class="row"><span>stored</span><span class="num" data-stat="rates.stored_per_second">–</span></div>
    <div class="row"><span>rejected</span><span class="num" data-stat="rates.rejected_per_second">–</span></div>
    <div class="row"><span>failed</span><span class="num" data-stat="rates.failed_per_second">–</span></div>
    <div class="row"><span>chunks</span><span class="num" data-stat="rates.chunks_per_second">–</span></div>
    <div class="row"><span>embedding requests</span><span class="num" data-stat="rates.embed_requests_per_second">–</span></div>
    <svg id="chart-rates" viewBox="0 0 300 90" preserveAspectRatio="none"></svg>
    <div class="legend"><b style="background:var(--accent)"></b>accepted<b style="background:var(--accent2)"></b>stored</div>
  </section>

  <section>
    <h2>Bottleneck</h2>
    <div class="big" data-stat="bottleneck.stage">–</div>
    <div class="row"><span>share of end-to-end time</span><span class="num" data-stat="bottleneck.share">–</span></div>
    <div class="row"><span>worker utilization</span><span class="num" data-stat="bottleneck.utilization">–</span></div>
    <p class="meta" id="bottleneck-summary"></p>
  </section>

  <section class="wide">
    <h2>Latency by stage (ms, last minute)</h2>
    <table>
      <thead><tr><th>stage</th><th>count</th><th>p50</th><th>p95</th><th>p99</th><th>mean</th><th>max</th></tr></thead>
      <tbody id="latency"></tbody>
    </table>
    <svg id="chart-latency" viewBox="0 0 300 90" preserveAspectRatio="none"></svg>
    <div class="legend"><b style="background:var(--accent)"></b>end-to-end p95<b style="background:var(--accent2)"></b>embed p95<b style="background:var(--warn)"></b>store p95</div>
  </section>

  <section>
    <h2>Embedding cache</h2>
    <div class="big" data-stat="cache.hit_ratio">–</div>
    <div class="row"><span>since start</span><span class="num" data-stat="cache.hit_ratio_total">–</span></div>
    <div class="row"><span>entries (L1)</span><span class="num" data-stat="cache.entries">–</span></div>
  </section>

  <section>
    <h2>Pending embeddings</h2>
    <div class="big"><span data-stat="pending_embedding.conversations">–</span> <small class="meta">conversations</small></div>
    <div class="row"><span>chunks</span><span class="num" data-stat="pending_embedding.chunks">–</span></div>
    <div class="row"><span>growing</span><span class="num" data-stat="pending_embedding.growing">–</span></div>
  </section>

  <section>
    <h2>Totals since start</h2>
    <div class="row"><span>accepted</span><span class="num" data-stat="totals.accepted">–</span></div>
    <div class="row"><span>stored</span><span class="num" data-stat="totals.stored">–</span></div>
    <div class="row"><span>rejected</span><span class="num" data-stat="totals.rejected">–</span></div>
    <div class="row"><span>failed</span><span class="num" data-stat="totals.failed">–</span></div>
    <div class="row"><span>duplicates</span><span class="num" data-stat="totals.duplicates">–</span></div>
    <div class="row"><span>chunks embedded / pending / failed</span><span class="num"><span data-stat="totals.chunks_embedded">–</span> / <span data-stat="totals.chunks_pending">–</span> / <span data-stat="totals.chunks_failed">–</span></span></div>
  </section>

  <section class="wide">
    <h2>Embedding backends</h2>
    <table>
      <thead><tr><th>backend</th><th>up</th><th>req/s</th><th>errors</th><th>p50 ms</th><th>p95 ms</th><th>requests</th><th>gauges</th></tr></thead>
      <tbody id="backends"></tbody>
    </table>
  </section>

  <section>
    <h2>Process</h2>
    <div class="row"><span>resident memory</span><span class="num" data-stat="process.rss_bytes">–</span></div>
    <div class="row"><span>CPU (cores)</span><span class="num" data-stat="process.cpu_ratio">–</span></div>
    <div class="row"><span>open files</span><span class="num"><span data-stat="process.open_fds">–</span> / <span data-stat="process.max_fds">–</span></span></div>
    <div class="row"><span>threads</span><span class="num" data-stat="process.threads">–</span></div>
  </section>
</main>
<footer>Polling <code>/v1/stats</code> every <span id="every">2</span> s · last update <span id="updated">never</span> · Prometheus metrics at <a href="metrics">/metrics</a></footer>
<script>
"use strict";
const EVERY = Math.max(0.5, Number(new URLSearchParams(location.search).get("every")) || 2);
document.getElementById("every").textContent = EVERY;
const HISTORY = 150;
const history = { depth: [], accepted: [], stored: [], e2e: [], embed: [], store: [] };

function get(obj, path) {
  return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
}
function fmtNumber(v) {
  if (v == null || Number.isNaN(v)) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  return v.toLocaleString("en-US", { maximumFractionDigits: a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3 });
}
function fmtBytes(v) {
  if (v == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : v) + " " + units[i];
}
function fmtPercent(v) { return v == null ? "–" : (v * 100).toFixed(1) + " %"; }
function fmtDuration(s) {
  if (s == null) return "–";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}
const FORMAT = {
  "uptime_seconds": fmtDuration, "window_seconds": fmtDuration,
  "queue.bytes": fmtBytes, "queue.max_bytes": fmtBytes, "process.rss_bytes": fmtBytes,
  "bottleneck.share": fmtPercent, "bottleneck.utilization": fmtPercent,
  "cache.hit_ratio": fmtPercent, "cache.hit_ratio_total": fmtPercent,
  "process.cpu_ratio": v => v == null ? "–" : v.toFixed(2),
};
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function cell(row, value, path) {
  const td = el("td", typeof value === "string" ? value : fmtNumber(value));
  if (path) { td.dataset.stat = path; td.dataset.value = value == null ? "" : String(value); }
  row.appendChild(td);
}
function spark(id, series, colors) {
  const svg = document.getElementById(id);
  const max = Math.max(1e-9, ...series.flat().filter(v => v != null));
  svg.innerHTML = "";
  series.forEach((values, i) => {
    if (values.length < 2) return;
    const pts = values.map((v, j) => `${(j / (HISTORY - 1)) * 300},${88 - ((v || 0) / max) * 84}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colors[i]);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  });
}
function push(name, v) {
  history[name].push(v);
  if (history[name].length > HISTORY) history[name].shift();
}

function render(s) {
  for (const e of document.querySelectorAll("[data-stat]")) {
    if (e.closest("tbody")) continue;
    const path = e.dataset.stat;
    const v = get(s, path);
    e.dataset.value = v == null ? "" : String(v);
    e.textContent = (FORMAT[path] || fmtNumber)(v);
  }
  const badge = document.getElementById("health");
  badge.className = "badge " + s.health.status;

  const reasons = document.getElementById("reasons");
  reasons.innerHTML = "";
  for (const r of s.health.reasons) reasons.appendChild(el("li", r.message, r.severity));
  document.getElementById("health-summary").textContent = s.health.reasons.length
    ? `${s.health.reasons.length} reason(s):` : "Everything within thresholds.";

  const fill = s.queue.utilization || 0;
  const bar = document.getElementById("queue-bar");
  bar.firstElementChild.style.width = Math.min(100, fill * 100) + "%";
  bar.className = "bar" + (fill >= 0.9 ? " crit" : fill >= 0.5 ? " warn" : "");

  document.getElementById("bottleneck-summary").textContent =
    s.bottleneck ? s.bottleneck.summary : "Nothing stored in the window.";

  const stages = [["enqueue", "enqueue"], ["queue_wait", "queue wait"], ["embed", "embed (per request)"],
                  ["store", "store (per batch)"], ["end_to_end", "end to end"]];
  const lat = document.getElementById("latency");
  lat.innerHTML = "";
  for (const [key, label] of stages) {
    const l = s.latency[key], tr = el("tr");
    cell(tr, label);
    cell(tr, l.count, `latency.${key}.count`);
    for (const q of ["p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"]) cell(tr, l[q], `latency.${key}.${q}`);
    lat.appendChild(tr);
  }

  const be = document.getElementById("backends");
  be.innerHTML = "";
  s.backends.forEach((b, i) => {
    const tr = el("tr");
    cell(tr, b.name, `backends.${i}.name`);
    cell(tr, b.up == null ? "?" : b.up ? "up" : "DOWN", `backends.${i}.up`);
    cell(tr, b.requests_per_second, `backends.${i}.requests_per_second`);
    cell(tr, fmtPercent(b.error_ratio), `backends.${i}.error_ratio`);
    cell(tr, b.p50_ms, `backends.${i}.p50_ms`);
    cell(tr, b.p95_ms, `backends.${i}.p95_ms`);
    cell(tr, b.requests, `backends.${i}.requests`);
    cell(tr, Object.entries(b.gauges).map(([k, v]) => `${k}=${fmtNumber(v)}`).join(" "));
    be.appendChild(tr);
  });
  if (!s.backends.length) {
    const tr = el("tr"); cell(tr, "no embedding call yet"); be.appendChild(tr);
  }

  push("depth", s.queue.depth);
  push("accepted", s.rates.accepted_per_second);
  push("stored", s.rates.stored_per_second);
  push("e2e", s.latency.end_to_end.p95_ms);
  push("embed", s.latency.embed.p95_ms);
  push("store", s.latency.store.p95_ms);
  spark("chart-queue", [history.depth], ["var(--accent)"]);
  spark("chart-rates", [history.accepted, history.stored], ["var(--accent)", "var(--accent2)"]);
  spark("chart-latency", [history.e2e, history.embed, history.store],
        ["var(--accent)", "var(--accent2)", "var(--warn)"]);
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}

async function poll() {
  const err = document.getElementById("error");
  try {
    const r = await fetch("v1/stats", { cache: "no-store" });
    if (!r.ok) throw new Error(`/v1/stats answered HTTP ${r.status}`);
    render(await r.json());
    err.style.display = "none";
  } catch (e) {
    err.textContent = "Cannot read /v1/stats: " + e.message + " (retrying)";
    err.style.display = "block";
  } finally {
    setTimeout(poll, EVERY * 1000);
  }
}
poll();
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn page_is_self_contained() {
        // No external scripts, styles, fonts or images.
        for needle in ["src=\"http", "href=\"http", "@import", "url(", "<link"] {
            assert!(!PAGE.contains(needle), "external asset: {needle}");
        }
        assert!(PAGE.contains("fetch(\"v1/stats\""));
    }
}
