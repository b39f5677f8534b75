"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("llmtap-key") || "";
let cursor = null;

async function api(path) {
  const headers = {};
  const key = keyInput.value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const resp = await fetch(path, { headers });
  const body = await resp.json();
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function addRows(items) {
  const tbody = $("rows");
  for (const r of items) {
    const tr = document.createElement("tr");
    const failed = (r.status || 0) >= 400 || r.outcome !== "completed";
    tr.append(
      cell(r.created_at.replace("T", " ").slice(0, 23)), cell(r.provider), cell(r.model),
      cell(r.status ?? r.outcome, failed ? "err" : ""), cell(r.latency_ms?.toFixed(1), "num"),
      cell(r.total_tokens, "num"), cell(r.cost_usd === null ? null : r.cost_usd.toFixed(6), "num"),
      cell(r.user_id), cell(r.session_id), cell(r.id),
    );
    tr.addEventListener("click", () => showDetail(r.id));
    tbody.append(tr);
  }
}

async function showDetail(id) {
  const pre = $("detail");
  pre.hidden = false;
  try {
    pre.textContent = JSON.stringify(await api("/api/v1/requests/" + encodeURIComponent(id)), null, 2);
  } catch (e) { pre.textContent = "error: " + e.message; }
  pre.scrollIntoView({ behavior: "smooth" });
}

async function loadPage() {
  $("status").textContent = "loading…";
  try {
    const page = await api("/api/v1/requests?limit=50" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    addRows(page.items);
    cursor = page.next_cursor;
    $("more").hidden = !cursor;
    $("status").textContent = "";
  } catch (e) {
    $("status").innerHTML = "";
    const span = document.createElement("span");
    span.className = "err";
    span.textContent = e.message;
    $("status").append(span);
  }
}

async function loadTotals() {
  try {
    const s = (await api("/api/v1/stats")).overall;
    const t = $("totals");
    t.innerHTML = "";
    for (const [label, value] of [["requests", s.count], ["errors", (100 * s.error_rate).toFixed(1) + "%"],
        ["tokens", s.total_tokens], ["cost $", s.cost_usd.toFixed(4)],
        ["p50 latency ms", s.latency_ms.p50 === null ? "–" : s.latency_ms.p50.toFixed(0)]]) {
      const span = document.createElement("span");
      span.textContent = label + ": " + value;
      t.append(span);
    }
  } catch (e) { /* the table shows the error */ }
}

function reload() {
  localStorage.setItem("llmtap-key", keyInput.value.trim());
  cursor = null;
  $("rows").innerHTML = "";
  $("detail").hidden = true;
  loadPage();
  loadTotals();
}

$("reload").addEventListener("click", reload);
$("more").addEventListener("click", loadPage);
reload();
