// callbridge ops page: plain JavaScript, no build step, nothing loaded from elsewhere.
// The API key is kept in sessionStorage (this tab only) and sent as the bearer of the same
// REST API requests docs/API.md describes. Everything shown is set with textContent.
"use strict";

const KEY = "callbridge.key";
const API = "/api/v1";
const POLL_MS = 1000;
let selected = null; // call id
let assistants = new Map(); // id -> assistant
let numbers = [];
let timer = null;
let ticks = 0;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (resp.status === 401) { logout("The key was refused."); throw new ApiError(401, data); }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

// --- login -----------------------------------------------------------------------------------

function logout(message) {
  sessionStorage.removeItem(KEY);
  if (timer) clearInterval(timer);
  timer = null;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("key-error").textContent = message || "";
}

async function login() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  try {
    await loadDirectory();
  } catch (err) {
    if (err.status !== 401) $("status").textContent = err.message;
    return;
  }
  // The analytics read every transfer in their range: the page asks for the last 30 days
  // (clear the date for all time), and refreshes them every 30 s, not every second's tick.
  if (!$("since").value) $("since").value = new Date(Date.now() - 30 * 86400e3).toISOString().slice(0, 10);
  await Promise.all([tick(), loadAnalytics(), loadTrunks()]);
  timer = setInterval(tick, POLL_MS);
}

// --- directory (assistants' destinations, numbers) -------------------------------------------

function destinationsOf(assistant) {
  const tools = (assistant && assistant.llm_config && assistant.llm_config.tools) || [];
  const out = [];
  for (const tool of tools) {
    if (tool.type !== "transfer_call") continue;
    for (const d of tool.destinations || []) {
      const target = d.number || d.sip || d.sip_uri || d.extension || d.queue;
      if (target) out.push({ target, label: d.description || target });
    }
  }
  return out;
}

async function loadDirectory() {
  const [a, n] = await Promise.all([api("GET", "/assistants"), api("GET", "/numbers")]);
  assistants = new Map(a.data.map((x) => [x.id, x]));
  numbers = n.data;
}

// --- live calls ------------------------------------------------------------------------------

async function tick() {
  try {
    const [health, calls] = await Promise.all([
      fetch(API + "/health").then((r) => r.json()),
      api("GET", "/calls?limit=30"),
    ]);
    const pbx = $("pbx");
    pbx.textContent = `${health.pbx || "PBX"} ${health.pbx_connected ? "connected" : "down"}`;
    pbx.className = "pill " + (health.pbx_connected ? "up" : "down");
    await renderCalls(calls.data);
    if (selected) await renderCall(selected);
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    ++ticks; // what changed meanwhile
    if (ticks % 5 === 0) loadTrunks();
    if (ticks % 30 === 0) loadAnalytics();
  } catch (err) {
    $("status").textContent = `error: ${err.message}`;
  }
}

async function renderCalls(calls) {
  // Calls in progress first, then the latest ended ones.
  const live = calls.filter((c) => c.status !== "ended");
  const ended = calls.filter((c) => c.status === "ended").slice(0, 10);
  const details = await Promise.all(live.map((c) => api("GET", `/calls/${c.id}`).catch(() => c)));
  const body = $("calls").tBodies[0];
  body.replaceChildren();
  for (const c of [...details, ...ended]) {
    const transfer = c.transfers && c.transfers.length ? c.transfers[c.transfers.length - 1] : null;
    const assistant = assistants.get(c.assistant_id);
    const row = el("tr", { "data-call-id": c.id, "data-status": c.status,
                           class: c.id === selected ? "selected" : "" },
      el("td", {}, time(c.started_at)),
      el("td", {}, c.caller_name || c.caller_number || ""),
      el("td", {}, c.number || ""),
      el("td", {}, assistant ? assistant.name : (c.assistant_id || "")),
      el("td", { class: `state-${c.status}` }, c.status),
      el("td", {}, transfer ? `${transfer.state}${transfer.outcome ? " · " + transfer.outcome : ""}` : ""));
    row.addEventListener("click", () => select(c.id));
    body.append(row);
  }
  $("no-calls").hidden = calls.length > 0;
}

function select(id) {
  selected = id;
  $("control-result").textContent = "";
  for (const row of $("calls").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.callId === id);
  }
  renderCall(id);
}

async function renderCall(id) {
  const call = await api("GET", `/calls/${id}`);
  if (id !== selected) return;
  $("call").hidden = false;
  $("call-id").textContent = call.id;
  $("call-status").textContent = call.status;
  $("call-status").className = `state-${call.status}`;
  const transfer = call.transfers.length ? call.transfers[call.transfers.length - 1] : null;
  $("call-outcome").textContent = transfer
    ? [transfer.state, transfer.outcome, transfer.sip_code ? `SIP ${transfer.sip_code}` : null,
       transfer.reason].filter(Boolean).join(" · ")
    : "none";
  const select = $("transfer-dest");
  const key = call.assistant_id || "";
  if (select.dataset.assistant !== key) {
    select.dataset.assistant = key;
    select.replaceChildren(...destinationsOf(assistants.get(call.assistant_id))
      .map((d) => el("option", { value: d.target }, `${d.label} (${d.target})`)));
  }
  const live = call.status === "active";
  $("transfer-btn").disabled = !live;
  $("end-btn").disabled = call.status === "ended";
  const list = $("transcript");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...call.events.map(eventItem).filter(Boolean));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function eventItem(e) {
  if (e.type === "transcript") {
    const who = { caller: "Caller", assistant: "Assistant", tool_call: "Tool call",
                  tool_result: "Tool result" }[e.role] || e.role;
    const extra = e.role === "tool_call" ? ` ${e.tool}` : "";
    return el("li", { class: e.role }, el("b", {}, `${who}${extra}: `), e.text || "",
      el("span", { class: "muted" }, ` ${time(e.at)}`));
  }
  if (e.type.startsWith("transfer.") || e.type.startsWith("call.")) {
    const bits = [e.outcome, e.sip_code ? `SIP ${e.sip_code}` : null, e.destination, e.reason];
    return el("li", { class: "event" }, `${e.type} ${bits.filter(Boolean).join(" · ")} ${time(e.at)}`);
  }
  return null;
}

async function control(body) {
  if (!selected) return;
  $("control-result").textContent = "…";
  try {
    const accepted = await api("POST", `/calls/${selected}/control`, body);
    $("control-result").textContent = `accepted: ${accepted.accepted}`;
  } catch (err) {
    $("control-result").textContent = `refused: ${err.message}`;
  }
  await tick();
}

// --- analytics -------------------------------------------------------------------------------

const OUTCOMES = ["answered", "busy", "no_answer", "rejected", "unreachable", "failed",
                  "cancelled", "handed_off"];

function outcomeBar(outcomes) {
  const total = Object.values(outcomes).reduce((a, b) => a + b, 0);
  const bar = svg("svg", { viewBox: "0 0 100 10", preserveAspectRatio: "none" });
  let x = 0;
  for (const [name, n] of Object.entries(outcomes)) {
    const w = total ? (100 * n) / total : 0;
    const cls = OUTCOMES.includes(name) ? name : "other";
    const rect = svg("rect", { x, y: 0, width: w, height: 10, class: `o-${cls}` });
    rect.append(svg("title", {}));
    rect.firstChild.textContent = `${name}: ${n}`;
    bar.append(rect);
    x += w;
  }
  return bar;
}

function chart(target, groups, caption) {
  const legend = el("div", { class: "legend" },
    ...OUTCOMES.map((o) => el("span", {}, el("i", { class: `o-${o}` }), o)));
  const rows = groups.map((g) => el("div", { class: "chart-row", "data-group": g.id },
    el("span", {}, g.name || g.id),
    outcomeBar(g.outcomes),
    el("span", { class: "muted" }, caption(g))));
  $(target).replaceChildren(...(rows.length ? [legend, ...rows] : [el("p", { class: "muted" }, "No transfers in this range.")]));
}

async function loadAnalytics() {
  const since = $("since").value;
  // No date: all time (the API's own default is the last 30 days).
  const query = `?since=${encodeURIComponent((since || "1970-01-01") + "T00:00:00Z")}`;
  try {
    const data = await api("GET", `/analytics/transfers${query}`);
    const ring = (g) => (g.median_ring_seconds === null ? "" : ` · ring ${g.median_ring_seconds}s`);
    chart("chart-assistants", data.assistants,
      (g) => `${Math.round(g.transfer_rate * 100)}% of ${g.calls} calls${ring(g)}`);
    chart("chart-destinations", data.destinations,
      (g) => `${g.transfers} · ${Math.round(g.answer_rate * 100)}% answered${ring(g)}`);
    const reasons = data.assistants.flatMap((a) => a.reasons.map((r) => ({ ...r, who: a.name || a.id })));
    const said = reasons.filter((r) => r.caller_said.length).map((r) =>
      el("li", {}, el("b", {}, `“${r.caller_said.join(" … ")}”`),
        ` → ${r.destination} (${r.outcome}, ${r.who}, ${time(r.at)})`));
    $("reasons").replaceChildren(...(said.length ? said : [el("li", { class: "muted" },
      "No caller words before a transfer in this range (e.g. transfers made from the API before the caller spoke).")]));
  } catch (err) {
    $("chart-assistants").textContent = `error: ${err.message}`;
  }
}

// --- trunks and destination tests ------------------------------------------------------------

const TRUNK_STATE = {
  provisioned: "provisioned on the PBX",
  missing: "missing on the PBX (being provisioned again)",
  unknown: "unknown (PBX down)",
};

async function loadTrunks() {
  const trunks = await api("GET", "/ops/trunks");
  $("trunks").tBodies[0].replaceChildren(...trunks.data.map((t) => el("tr", { "data-trunk": t.id },
    el("td", {}, t.name), el("td", {}, `${t.host}:${t.port} (${t.transport})`),
    el("td", {}, t.registration ? "registers" : "no registration"),
    el("td", { class: `trunk-${t.pbx_state}` }, TRUNK_STATE[t.pbx_state] || t.pbx_state))));
}

async function testAll() {
  await loadDirectory();
  const body = $("tests").tBodies[0];
  body.replaceChildren();
  const jobs = [];
  for (const a of assistants.values()) {
    const number = numbers.find((n) => n.assistant_id === a.id);
    for (const d of destinationsOf(a)) {
      const cells = [el("td", {}, a.name), el("td", {}, d.label), el("td", {}, ""),
        el("td", { class: "outcome" }, "testing…"), el("td", {}, ""), el("td", {}, "")];
      body.append(el("tr", { "data-destination": d.target }, ...cells));
      const request = { destination: d.target, ring_timeout: 10 };
      if (number) request.number_id = number.id;
      jobs.push(api("POST", "/destinations/test", request).then((r) => {
        cells[2].textContent = r.route || "";
        cells[3].textContent = r.outcome;
        cells[4].textContent = r.sip_code || "";
        cells[5].textContent = r.ring_ms === null ? "" : `${r.ring_ms} ms`;
      }, (err) => { cells[3].textContent = `refused: ${err.message}`; }));
    }
  }
  await Promise.all(jobs);
}

// --- wiring ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    login();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("transfer-btn").addEventListener("click", () => {
    const destination = $("transfer-custom").value.trim() || $("transfer-dest").value;
    if (destination) control({ type: "transfer", destination });
  });
  $("end-btn").addEventListener("click", () => control({ type: "end_call" }));
  $("analytics-refresh").addEventListener("click", loadAnalytics);
  $("since").addEventListener("change", loadAnalytics);
  $("test-all").addEventListener("click", testAll);
  if (sessionStorage.getItem(KEY)) login(); else logout("");
});
