// The operator console: polls /api/console (the same document scripts read) and draws it.
// No framework, no build step, nothing loaded from elsewhere (the page's CSP forbids it).
"use strict";

const EVERY_MS = 2000;
let last = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function num(n) {
  if (n === null || n === undefined) return "–";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}
function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 1000) return (v / 1000).toFixed(2) + " s";
  return (v >= 10 ? v.toFixed(0) : v.toFixed(1)) + " ms";
}
function pct(v) {
  return v === null || v === undefined ? "–" : (v * 100).toFixed(v >= 0.999 || v === 0 ? 0 : 1) + "%";
}
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(0) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(0) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function spark(series) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 26");
  svg.setAttribute("preserveAspectRatio", "none");
  const calls = series.calls || [];
  const errors = series.errors || [];
  const top = Math.max(1, ...calls.map((v) => v || 0));
  const line = (values, cls) => {
    if (values.length < 2) return;
    const step = 120 / (values.length - 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(25 - ((v || 0) / top) * 23).toFixed(1)}`);
    const poly = document.createElementNS(svgNS, "polyline");
    poly.setAttribute("points", points.join(" "));
    poly.setAttribute("class", cls);
    svg.append(poly);
  };
  line(calls, "calls");
  line(errors, "errors");
  const title = document.createElementNS(svgNS, "title");
  title.textContent = `calls (blue) and failures (red) per ${last ? last.sample_every_seconds : 10} s, last 30 min`;
  svg.append(title);
  return svg;
}

function tags(counts, cls) {
  const entries = Object.entries(counts || {});
  if (!entries.length) return "–";
  return entries.map(([k, v]) => el("span", { class: "tag " + cls, "data-reason": k }, `${k} ${v}`));
}

function rate(v) {
  if (v === null || v === undefined) return "";
  return v >= 0.99 ? "good" : v >= 0.9 ? "fair" : "poor";
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "muted", colspan: columns }, empty))]));
}

function drawServices(services) {
  const rows = services.map((s) => {
    const b = s.breaker;
    const breaker = b
      ? el("span", { class: "pill state-" + b.state, "data-field": "breaker" },
          b.state.replace("_", "-"), b.state === "open" ? ` (${b.half_open_in_seconds.toFixed(0)} s)` : "")
      : el("span", { class: "muted", "data-field": "breaker" }, "none");
    const paused = s.paused
      ? el("span", { class: "pill warn" }, `paused ${s.paused.seconds_left.toFixed(0)} s`)
      : null;
    return el("tr", { "data-service": s.name === null ? "(no service)" : s.name },
      el("td", {}, el("strong", {}, s.name === null ? "(no service)" : s.name), s.mode && s.mode !== "live" ? el("span", { class: "tag warn" }, s.mode) : null),
      el("td", { class: "num", "data-field": "calls" }, String(s.calls)),
      el("td", { class: "num", "data-field": "calls_per_min" }, num(s.calls_per_min)),
      el("td", { class: "num " + rate(s.success_rate), "data-field": "success_rate" }, pct(s.success_rate)),
      el("td", { class: "num", "data-field": "p50" }, ms(s.p50_ms)),
      el("td", { class: "num", "data-field": "p95" }, ms(s.p95_ms)),
      el("td", { class: "num", "data-field": "p99" }, ms(s.p99_ms)),
      el("td", { class: "wrap", "data-field": "refusals" }, tags(s.refusals, "warn")),
      el("td", { class: "wrap", "data-field": "upstream_errors" }, tags(s.upstream_errors, "bad")),
      el("td", {}, breaker, " ", paused),
      el("td", { class: "num", "data-field": "cache" }, s.cache ? `${pct(s.cache.hit_ratio)} of ${s.cache.lookups}` : "–"),
      el("td", {}, spark(s.spark)),
    );
  });
  fill(document.querySelector("#services tbody"), rows, "no services", 12);
}

function drawAgents(agents) {
  const rows = agents.map((a) => {
    const models = a.models.map((m) =>
      el("div", {}, el("code", {}, `${m.service}/${m.model}`), ` ${num(m.input_tokens)} in, ${num(m.output_tokens)} out`,
        m.cost !== null ? ` · ${m.cost.toFixed(4)}` : ""));
    const budgets = a.budgets.map((b) =>
      el("div", { "data-budget": b.budget },
        el("progress", { max: 100, value: Math.min(100, b.used_percent || 0) }),
        ` ${b.used_percent === null ? "–" : b.used_percent.toFixed(0) + "%"} of ${b.budget} (${b.service}), resets ${b.resets_at}`));
    return el("tr", { "data-agent": a.agent === null ? "(all agents)" : a.agent },
      el("td", {}, el("strong", {}, a.agent === null ? "(all agents)" : a.agent)),
      el("td", { class: "num", "data-field": "calls" }, a.calls === null ? "–" : String(a.calls)),
      el("td", { class: "num", "data-field": "refusals" }, a.refusals === null ? "–" : String(a.refusals)),
      el("td", { class: "wrap" }, models.length ? models : "–"),
      el("td", { class: "wrap" }, budgets.length ? budgets : "–"),
    );
  });
  fill(document.querySelector("#agents tbody"), rows, "no agent has called yet", 5);
}

async function post(url, button) {
  button.disabled = true;
  try {
    const r = await fetch(url, { method: "POST", credentials: "same-origin" });
    button.textContent = r.ok ? "done" : `failed (${r.status})`;
  } catch (e) {
    button.textContent = "failed";
  }
  setTimeout(refresh, 200);
}

function drawWebhooks(webhooks) {
  const endpoints = webhooks ? webhooks.endpoints : [];
  const rows = endpoints.map((e) =>
    el("tr", { "data-endpoint": `${e.webhook}/${e.endpoint}` },
      el("td", {}, e.webhook, el("span", { class: "muted" }, ` ${e.direction}`)),
      el("td", { class: "mono" }, e.endpoint),
      el("td", { class: "num", "data-field": "depth" }, String(e.depth)),
      el("td", { class: "num" }, ago(e.oldest_pending_seconds)),
      el("td", { class: "num" }, String(e.delivered)),
      el("td", { class: "num " + (e.dead ? "poor" : ""), "data-field": "dead" }, String(e.dead)),
      el("td", {}, e.disabled
        ? el("button", { onclick: (ev) => post(`webhooks/endpoints/${encodeURIComponent(e.endpoint)}/enable`, ev.target) }, "enable")
        : el("span", { class: "pill ok" }, "enabled")),
    ));
  fill(document.querySelector("#webhooks tbody"), rows, webhooks ? "no deliveries yet" : "no webhooks configured", 7);
  const dead = (webhooks && webhooks.dead_letters) || [];
  const deadRows = dead.map((d) =>
    el("tr", { "data-message": d.message_id },
      el("td", {}, clock(d.created)),
      el("td", {}, d.webhook),
      el("td", { class: "mono" }, d.endpoint),
      el("td", { class: "mono" }, d.event_type || "–"),
      el("td", { class: "wrap" }, d.last_error || "–"),
      el("td", {}, el("button", { class: "replay", onclick: (ev) => post(`webhooks/messages/${encodeURIComponent(d.message_id)}/retry`, ev.target) }, "replay")),
    ));
  fill(document.querySelector("#dead-letters tbody"), deadRows, "none", 6);
}

function drawPools(pools) {
  document.getElementById("pools-section").hidden = !pools.length;
  const rows = pools.map((p) =>
    el("tr", { "data-pool": p.name },
      el("td", {}, el("strong", {}, p.name)), el("td", {}, p.kind),
      el("td", { class: "num" }, String(p.in_use)), el("td", { class: "num" }, String(p.idle)),
      el("td", { class: "num" }, String(p.max)), el("td", { class: "num " + (p.waiting ? "poor" : "") }, String(p.waiting)),
      el("td", {}, el("progress", { max: 100, value: Math.round(p.saturation * 100) })),
    ));
  fill(document.querySelector("#pools tbody"), rows, "", 7);
}

function drawAlerts(alerts) {
  document.getElementById("alerts-count").textContent = String(alerts.length);
  const list = document.getElementById("alerts");
  const items = alerts.map((a) =>
    el("li", { class: a.state, "data-alert": a.alertname },
      el("strong", {}, `${a.state.toUpperCase()} ${a.alertname}`), ` [${a.severity}] `, a.summary,
      el("span", { class: "muted" }, ` since ${clock(a.since)}`)));
  list.replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none firing")]));
}

function drawProblems(problems) {
  document.getElementById("problems-count").textContent = String(problems.total);
  const needle = document.getElementById("problem-filter").value.trim().toLowerCase();
  const shown = problems.recent.filter((p) =>
    !needle || [p.service, p.agent, p.reason, String(p.status), p.method, p.trace_id || ""].some((v) => (v || "").toLowerCase().includes(needle)));
  const rows = shown.map((p) =>
    el("tr", { "data-reason": p.reason },
      el("td", {}, clock(p.at)), el("td", {}, p.service || "–"), el("td", {}, p.agent || "–"),
      el("td", {}, p.method), el("td", { class: "num" }, String(p.status)),
      el("td", {}, el("span", { class: "tag " + (p.reason === "upstream" ? "bad" : "warn") }, p.reason)),
      el("td", { class: "mono" }, p.trace_id || "–")));
  fill(document.querySelector("#problems tbody"), rows, needle ? "nothing matches" : "no problems", 7);
}

function drawPolicy(policy) {
  document.getElementById("policy-version").textContent = policy.version || "none";
  const status = document.getElementById("reload-status");
  const banner = document.getElementById("reload-error");
  const r = policy.last_reload;
  if (r && !r.ok) {
    status.className = "pill bad";
    status.textContent = `reload failed ${r.at}`;
    banner.hidden = false;
    banner.textContent = "The last reload failed; the last good policy keeps serving.\n" + r.errors.join("\n");
  } else {
    status.className = "pill ok";
    status.textContent = r ? `loaded ${r.at} (${r.trigger})` : "loaded";
    banner.hidden = true;
  }
}

function draw(doc) {
  last = doc;
  drawPolicy(doc.policy);
  drawAlerts(doc.alerts);
  drawServices(doc.services);
  drawAgents(doc.agents);
  drawWebhooks(doc.webhooks);
  drawPools(doc.pools);
  drawProblems(doc.problems);
  document.getElementById("updated").textContent = "updated " + clock(doc.generated_at);
  document.body.dataset.loaded = String(doc.generated_at);
}

async function refresh() {
  try {
    const r = await fetch("api/console", { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    draw(await r.json());
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the sidecar: " + e.message;
  }
}

document.getElementById("problem-filter").addEventListener("input", () => last && drawProblems(last.problems));
refresh();
// A tab in the background costs the sidecar nothing: no polls until it is seen again.
setInterval(() => document.hidden || refresh(), EVERY_MS);
document.addEventListener("visibilitychange", () => document.hidden || refresh());
