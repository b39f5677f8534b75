// llmtap dashboard: a small ES-module app over the JSON API (/api/v1).
//
// Rules this file keeps: every stored value reaches the page as text (h() builds elements and
// text nodes, never HTML strings); links are made only for http(s) URLs; all view state lives in
// the URL hash (a link reproduces the view, Back works); nothing is fetched from another origin.

// uPlot (145 KB) is loaded by the overview only, in parallel with its data.
let uPlotModule = null;
const loadUPlot = () => (uPlotModule ||= import("./vendor/uplot/uPlot.esm.js").then((m) => m.default));

const KEY = "llmtap-key";
const main = document.getElementById("main");
const drawer = document.getElementById("drawer");
const banner = document.getElementById("banner");

// -- DOM helpers ---------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "href") { const safe = safeHref(v); if (safe) el.setAttribute("href", safe); }
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Hash links of this app, and absolute http(s) URLs; anything else (javascript:, data:) is no link. */
function safeHref(v) {
  const s = String(v);
  if (s.startsWith("#/") || s.startsWith("api/") || s.startsWith("blob:")) return s;
  try {
    const u = new URL(s);
    if (u.protocol === "http:" || u.protocol === "https:") return u.href;
  } catch (e) { /* not a URL */ }
  return null;
}

const clear = (el) => { el.replaceChildren(); return el; };
/** Replace an element's children (null and false skipped, arrays flattened, values as text). */
const fill = (el, ...children) => append(clear(el), children);
let renders = 0; // how many times a view drew main (an error before its first draw clears it)
//: What had the focus when the view began (Enter in a filter, a sort), found again in the view
//: as soon as it is drawn: until the data came, the focus sat on the page and keys typed meanwhile
//: were lost (a review typed "gpt", Enter, "-4o": the "-4o" went nowhere).
let focusAfter = null; // { key, caret }
const caretOf = (el) => (el && typeof el.selectionStart === "number" ? [el.selectionStart, el.selectionEnd] : null);
function focusOn(el, caret) {
  el.focus({ preventScroll: true });
  if (typeof el.selectionStart !== "number") return;
  const end = el.value.length;  // no caret known: after the text, where typing goes on
  try { el.setSelectionRange(Math.min(caret ? caret[0] : end, end), Math.min(caret ? caret[1] : end, end)); } catch (e) { /* not a text field */ }
}
const render = (...children) => {
  renders += 1;
  // A focused element drawn again (the filter bar kept from "Loading…" to the data) is taken
  // out and put back, which drops the focus: it gets it back (the caret where it was).
  const had = document.activeElement;
  const caret = caretOf(had);
  const out = fill(main, ...children);
  if (had && had !== document.body && had.isConnected && document.activeElement !== had) focusOn(had, caret);
  const lost = !document.activeElement || document.activeElement === document.body;
  const counterpart = focusAfter && lost ? main.querySelector(focusAfter.key) : null;
  if (counterpart) { focusOn(counterpart, focusAfter.caret); focusAfter = null; }
  return out;
};

/**
 * A view's heading and filter bar at once, its data to come: a bad filter value leaves the bar
 * on screen to fix it, and the previous view's data never stays under an error.
 */
function renderPending(title, bar) {
  render(h("h1", {}, title), bar, h("p", { class: "muted", id: "pending" }, "Loading…"));
}

// -- formatting ----------------------------------------------------------------------------------

const nf = new Intl.NumberFormat("en-US");
const fmtInt = (v) => (v === null || v === undefined ? "–" : nf.format(v));
function fmtUsd(v) {
  if (v === null || v === undefined) return null;
  if (v === 0) return "$0";
  const a = Math.abs(v);
  if (a >= 0.01) return "$" + v.toFixed(v < 100 ? 4 : 2);
  if (a < 1e-9) return "<$0.000000001";
  // Three significant digits written out (toPrecision writes 3.00e-7), trailing zeros dropped.
  return "$" + v.toFixed(2 - Math.floor(Math.log10(a))).replace(/0+$/, "");
}
function fmtMs(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 1 : 2) + " s";
  return Math.round(v) + " ms";
}

// Times: one rule everywhere. The page shows and reads every time in UTC (the API's zone, and the
// zone of the overview's buckets) and says so, whatever the browser's zone: a time copied from
// the table into From/To selects the same instant in every view.
const pad = (n, w = 2) => String(n).padStart(w, "0");
/** "2025-01-31 13:45:07" in UTC, for cells under a "(UTC)" header. */
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
}
/** The same with its zone, for a time standing alone. */
const fmtTimeUtc = (iso) => (iso ? fmtTime(iso) + " UTC" : "–");
/** To the millisecond, with its zone (the drawer's timing). */
const fmtInstant = (iso) => (iso ? `${fmtTime(iso)}.${pad(new Date(iso).getUTCMilliseconds(), 3)} UTC` : "–");

const TIME_RE = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?)?\s*(Z|UTC|[+-]\d{2}:?\d{2})?$/i;

/**
 * A From/To field's text as a Date: UTC unless the text names its zone (Z, UTC, +02:00). Throws an
 * error naming the field, so a typo is reported as such and not as "Invalid time value".
 */
function parseFieldTime(label, text) {
  const m = TIME_RE.exec(String(text).trim());
  if (m) {
    const [, y, mo, d, hh = "00", mi = "00", ss = "00", frac = "", zone = "Z"] = m;
    const z = /^(z|utc)$/i.test(zone) ? "Z" : zone.replace(/^([+-]\d{2})(\d{2})$/, "$1:$2");
    const date = new Date(`${y}-${mo}-${d}T${hh}:${mi}:${ss}${frac.slice(0, 4)}${z}`);
    if (!Number.isNaN(date.getTime())) return date;
  }
  throw new Error(`${label}: “${text}” is not a time; write it in UTC, e.g. 2025-01-31 13:45`);
}
function fmtBytes(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1024) return v + " B";
  if (v < 1048576) return (v / 1024).toFixed(1) + " KiB";
  return (v / 1048576).toFixed(1) + " MiB";
}
const pct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%");

/**
 * A cost, or why there is none: a request whose usage is missing (a failed one, mostly) has
 * nothing to price ("–"); "unpriced" is kept for usage with no known price for its model.
 * `row` is a request (list or detail); aggregates pass none.
 */
function costCell(v, row) {
  // A call that generated nothing (a 429, a look-up) costs 0: shown as "–" like one without usage.
  if (row && row.usage_source === "missing" && !v) return h("span", { class: "muted nocost", title: v === 0 ? "nothing generated: not billed" : "no usage reported: nothing to price" }, "–");
  const s = fmtUsd(v);
  if (s !== null) return s;
  const why = row && row.usage_source === "partial" ? "the stream ended before its final token counts" : "no price known for this model";
  return h("span", { class: "badge unpriced", title: why + ": cost is unknown, not $0" }, "unpriced");
}

/** A group's cost (a user, a session, a model): unknown when none of its requests is priced,
 *  else the sum of those that are, saying how many are left out. */
function groupCost(g) {
  if (g.unpriced_count && g.unpriced_count === g.count) return costCell(null);
  if (!g.unpriced_count) return fmtUsd(g.cost_usd);
  return h("span", {}, fmtUsd(g.cost_usd) ?? "$0",
    h("div", { class: "sub", title: "requests with no known price: not in this sum" }, `+ ${fmtInt(g.unpriced_count)} unpriced`));
}

function statusCell(row) {
  const failed = row.status !== null && row.status >= 400;
  const cut = row.outcome !== "completed";
  const code = h("span", { class: "status " + (failed || cut || row.error ? "bad" : "ok"), title: row.error || row.outcome },
    row.status === null ? "–" : String(row.status));
  // A 200 can still have gone wrong (a stream cut short, an error event inside it): a badge says so.
  const streamError = row.outcome === "upstream_error" || (row.error && !failed && !cut);
  const badge = streamError ? h("span", { class: "badge err", title: row.error || "the stream ended in an error event" }, "error")
    : cut ? h("span", { class: "badge warn", title: row.error || "the response did not complete" }, row.outcome) : null;
  return badge ? h("span", { class: "statuscell" }, code, " ", badge) : code;
}

// -- API -----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, opts = {}) {
  const used = sessionStorage.getItem(KEY);
  const resp = await fetch(path, { ...opts, headers: { ...authHeaders(), ...(opts.headers || {}) } });
  if (resp.status === 401) { askKey(undefined, used); throw new ApiError(401, "sign in required"); }
  const ctype = resp.headers.get("content-type") || "";
  const body = ctype.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) throw new ApiError(resp.status, (body && body.error && body.error.message) || String(resp.status));
  return body;
}

// -- sign-in -------------------------------------------------------------------------------------

const signin = document.getElementById("signin");
function askKey(message, used) {
  const now = sessionStorage.getItem(KEY);
  // A call made with an earlier key (the overview's slow stats, answered after a new sign-in):
  // its 401 says nothing of the key in use now, which must not be forgotten for it (review).
  if (used !== undefined && now && used !== now) return;
  // A key the server refused is forgotten at once: kept, the header said "signed in" with it.
  const refused = !!now;
  if (refused) { sessionStorage.removeItem(KEY); updateAuth(); }
  const said = message || (refused ? "That key was refused." : null);
  // (A view's other calls answer 401 too, after the key is gone: they leave the message be.)
  if (said !== null || !signin.open) document.getElementById("signin-error").textContent = said || "";
  if (!signin.open) signin.showModal();
}
// Closed without a key (Escape): a view still waiting for its data says why, with a way back
// (it said "Loading…" for ever). A view already drawn (the live tail) stays as it is.
signin.addEventListener("close", () => {
  const pending = document.getElementById("pending");
  if (sessionStorage.getItem(KEY) || !pending) return;
  fill(pending, "Nothing shown: this server needs a tenant's API key. ",
    h("button", { type: "button", id: "signin-again", onclick: () => askKey() }, "Sign in"));
  pending.className = "";
});
document.getElementById("signin-form").addEventListener("submit", () => {
  const key = document.getElementById("signin-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  document.getElementById("signin-key").value = "";
  updateAuth();
  lastRoute = null;
  route();
});
document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  updateAuth();
  closeDrawer(false);  // the tenant's request open beside the view goes with it (review)
  clear(main);
  askKey();
});
function updateAuth() {
  const has = !!sessionStorage.getItem(KEY);
  document.getElementById("signout").hidden = !has;
  document.getElementById("tenant").textContent = has ? "signed in with a tenant key" : "";
}

// -- routing: #/<view>[/<id>]?<params> ------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?", 2);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { view: parts[0] || "requests", id: parts[1] || null, params: new URLSearchParams(query || "") };
}

function hashFor(view, id, params) {
  const q = params && params.toString();
  return "#/" + view + (id ? "/" + encodeURIComponent(id) : "") + (q ? "?" + q : "");
}

function go(view, id, params) {
  navigated = true;
  const next = hashFor(view, id, params);
  if (location.hash !== next) location.hash = next;
  else route();
}

let cleanup = [];
function onLeave(fn) { cleanup.push(fn); }

let lastRoute = null;
let viewTitle = "llmtap"; // the page's title while no request is open in the drawer

// Scroll: a navigation made on the page (a link, Apply, a key) opens the next view at its top;
// Back and Forward return to where that view was left. (The browser's own restoration runs
// before a view has drawn, so it is turned off.)
let navigated = false;
const scrollMemo = new Map(); // hash -> scrollY when it was left
let shownHash = location.hash;
history.scrollRestoration = "manual";
document.addEventListener("click", (ev) => { if (ev.target.closest && ev.target.closest('a[href^="#/"]')) navigated = true; }, true);

async function route() {
  const byPage = navigated;
  navigated = false;
  const { view, id, params } = parseHash();
  // Only the open request changed (J/K, Esc, a row click): keep the view (and a live tail) as it is.
  const key = view + "?" + params.toString();
  if (lastRoute === key && (view === "requests" || view === "live") && document.getElementById("requests-table")) {
    if (id) await openDrawer(id, params, view); else closeDrawer(false);
    return;
  }
  lastRoute = key;
  for (const fn of cleanup.splice(0)) { try { fn(); } catch (e) { /* ignore */ } }
  if (!id || (view !== "requests" && view !== "live")) closeDrawer(false);
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === view);
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const focusKey = byPage ? focusKeyOf(document.activeElement) : null;
  focusAfter = focusKey ? { key: focusKey, caret: caretOf(document.activeElement) } : null;
  banner.hidden = true;
  const views = { requests: viewRequests, overview: viewOverview, sessions: viewSessions, users: viewUsers, live: viewLive, pipeline: viewPipeline };
  const fn = views[view] || viewNotFound;
  viewTitle = "llmtap · " + (views[view] ? view[0].toUpperCase() + view.slice(1) + (id && view === "sessions" ? " " + id : "") : "No such page");
  document.title = viewTitle;
  // Until the view draws: a neutral "Loading…", never the previous view (its data, or its empty
  // state read as this view's answer). A view with a filter bar replaces it at once with its own.
  render(h("p", { class: "muted", id: "pending" }, "Loading…"));
  const drawn = renders;
  const hash = location.hash;
  if (byPage) window.scrollTo(0, 0);
  try {
    await fn(id, params);
    if (!byPage && scrollMemo.has(hash) && location.hash === hash) window.scrollTo(0, scrollMemo.get(hash));
    // Only a focus that fell off with the old view goes back: one the user put somewhere
    // while the view loaded stays there (typing into a filter lost it to the sort's header).
    const lost = !document.activeElement || document.activeElement === document.body;
    if (byPage && location.hash === hash && lost) refocus(focusKey);
    if (location.hash === hash) focusAfter = null;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return;
    showError(e);
    const pending = document.getElementById("pending");
    if (pending) fill(pending, "Nothing shown: " + e.message).className = "err";
    else if (renders === drawn) render(h("p", { class: "err", id: "pending" }, "Nothing shown: " + e.message));
  }
}

/**
 * What had the focus before a view was drawn again (Apply, a sort, the next page), as a selector
 * that finds its counterpart in the new view: the new view's elements are new, and the focus
 * fell to the page's start (a keyboard user had to tab back through the header and filters).
 */
function focusKeyOf(el) {
  if (!el || el === document.body || !main.contains(el)) return null;
  if (el.id) return "#" + CSS.escape(el.id);
  if (el.name) return `#filters [name="${CSS.escape(el.name)}"]`;
  if (el.dataset.sort) return `th a[data-sort="${CSS.escape(el.dataset.sort)}"]`;
  if (el.closest("#filters")) return "#filters button[type=submit]";
  return null;
}
function refocus(key) {
  const el = (key && main.querySelector(key)) || main.querySelector("h1");
  if (!el) return;
  if (el.tagName === "H1") el.setAttribute("tabindex", "-1");
  focusOn(el, null);
}

function viewNotFound() {
  render(h("h1", {}, "No such page"),
    h("p", {}, "This dashboard has no page “", location.hash, "”. Try ", h("a", { href: "#/requests" }, "Requests"), " or ", h("a", { href: "#/overview" }, "Overview"), "."));
}

/** Said by screen readers without moving the focus (a list redrawn after Apply). */
function announce(text) {
  const el = document.getElementById("announce");
  el.textContent = "";
  setTimeout(() => { el.textContent = text; }, 50);  // a change, even when the text is the same
}

function showError(e) {
  banner.hidden = false;
  banner.textContent = "Error: " + (e && e.message ? e.message : String(e));
  // The field a message names ("From (UTC): … is not a time") is marked for assistive tech.
  for (const input of document.querySelectorAll("#filters input[name=since], #filters input[name=until]")) {
    const label = input.closest("label");
    const named = label && banner.textContent.includes(label.firstChild.textContent + ":");
    if (named) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
  }
}

window.addEventListener("hashchange", () => {
  scrollMemo.set(shownHash, window.scrollY);
  shownHash = location.hash;
  route();
});

// -- filters shared by requests, overview, live and export ----------------------------------------

const RANGES = { "15m": 900, "1h": 3600, "24h": 86400, "7d": 604800, "30d": 2592000, all: null };
const FILTER_KEYS = ["user_id", "session_id", "model", "provider", "status_class", "outcome", "error", "min_cost_usd", "max_cost_usd", "min_latency_ms", "max_latency_ms"];
const OUTCOMES = ["completed", "client_disconnected", "upstream_cut", "upstream_timeout", "upstream_unreachable", "upstream_error"];

/**
 * The API's filter parameters for the view's URL params (range presets become since/until).
 * `search` adds the body search `q`, which only the list, the export and the live tail take
 * (the stats endpoints read rollups, which hold no text).
 */
function apiFilters(params, defaultRange = "24h", { search = false } = {}) {
  const out = new URLSearchParams();
  const range = params.get("range") || defaultRange;
  if (range === "custom") {
    const { since, until } = customRange(params);
    if (since) out.set("since", since.toISOString());
    if (until) out.set("until", until.toISOString());
  } else if (RANGES[range]) {
    out.set("since", new Date(Date.now() - RANGES[range] * 1000).toISOString());
  }
  for (const k of FILTER_KEYS) if (params.get(k)) out.set(k, params.get(k));
  for (const [k, v] of params) if (k.startsWith("property.") && v) out.set(k, v);
  if (search && params.get("q")) out.set("q", params.get("q"));
  return out;
}

/** A custom range's bounds (null where a field is empty), read by the one rule of parseFieldTime. */
function customRange(params) {
  const read = (name, label) => (params.get(name) ? parseFieldTime(label, params.get(name)) : null);
  return { since: read("since", "From (UTC)"), until: read("until", "To (UTC)") };
}

function rangeOf(params, defaultRange) {
  const range = params.get("range") || defaultRange;
  if (range === "custom") {
    const { since, until } = customRange(params);
    return { since: since || new Date(Date.now() - 86400000), until: until || new Date() };
  }
  const secs = RANGES[range] || 2592000;
  return { since: new Date(Date.now() - secs * 1000), until: new Date() };
}

/** The filter bar; `onApply(newParams)` gets the view's params with the filters replaced. */
function filterBar(params, view, { defaultRange = "24h", extra = [], search = false } = {}) {
  const field = (name, label, attrs = {}) =>
    h("label", {}, label, h("input", { name, value: params.get(name) || "", autocomplete: "off", ...attrs }));
  const range = params.get("range") || defaultRange;
  const rangeSel = h("select", { name: "range" },
    ...Object.keys(RANGES).concat(["custom"]).map((r) => h("option", { value: r, selected: r === range }, r === "all" ? "all time" : r === "custom" ? "custom…" : "last " + r)));
  const props = propsText(params);
  const statusSel = h("select", { name: "status_class" },
    h("option", { value: "" }, "any"),
    ...["2xx", "3xx", "4xx", "5xx"].map((c) => h("option", { value: c, selected: params.get("status_class") === c }, c)));
  // Errors a status cannot find (a 200 whose stream was cut, a client gone, no answer at all):
  // "errors" is what the Errors tile counts (the API's error=true), or one outcome.
  const picked = params.get("error") === "true" ? "error" : params.get("error") === "false" ? "ok"
    : params.get("outcome") ? "outcome:" + params.get("outcome") : "";
  const outcomeSel = h("select", { name: "outcome_pick", title: "errors: status 400 or more, or any outcome but completed" },
    h("option", { value: "" }, "any"),
    h("option", { value: "error", selected: picked === "error" }, "errors"),
    h("option", { value: "ok", selected: picked === "ok" }, "no errors"),
    ...OUTCOMES.map((o) => h("option", { value: "outcome:" + o, selected: picked === "outcome:" + o }, o.replace(/_/g, " "))));
  const form = h("form", { class: "filters", id: "filters" },
    search ? field("q", "Search bodies", { type: "search", size: 20, maxlength: 200, placeholder: "prompt or reply text", title: "case-insensitive text search over request and response bodies" }) : null,
    view === "live" ? null : h("label", {}, "Time", rangeSel),
    field("since", "From (UTC)", { class: "custom", placeholder: "2025-01-31 00:00", size: 16, title: "a UTC time, as the table shows them" }),
    field("until", "To (UTC)", { class: "custom", placeholder: "2025-02-01 00:00", size: 16, title: "a UTC time, as the table shows them; the range ends before it" }),
    field("model", "Model", { size: 14 }),
    field("provider", "Provider", { size: 9 }),
    field("user_id", "User", { size: 12 }),
    field("session_id", "Session", { size: 12 }),
    h("label", {}, "Status", statusSel),
    h("label", {}, "Outcome", outcomeSel),
    h("label", {}, "Property", h("input", { name: "props", value: props, placeholder: "name=value, …", title: "name=value pairs, comma-separated; write a comma inside a value as \\,", size: 16, autocomplete: "off" })),
    field("min_cost_usd", "Cost ≥ $", { size: 5, inputmode: "decimal" }),
    field("max_cost_usd", "≤ $", { size: 5, inputmode: "decimal", "aria-label": "Cost at most (USD)" }),
    field("min_latency_ms", "Latency ≥ ms", { size: 5, inputmode: "numeric" }),
    field("max_latency_ms", "≤ ms", { size: 5, inputmode: "numeric", "aria-label": "Latency at most (ms)" }),
    ...extra,
    h("button", { type: "submit" }, "Apply"),
    h("a", { href: hashFor(view, null, new URLSearchParams()), class: "button" }, "Reset"));
  const syncCustom = () => { for (const el of form.querySelectorAll(".custom")) el.closest("label").hidden = rangeSel.value !== "custom"; };
  syncCustom();
  rangeSel.addEventListener("change", syncCustom);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of params) if (!FILTER_KEYS.includes(k) && !k.startsWith("property.") && !["range", "since", "until", "cursor", "q"].includes(k)) next.set(k, v);
    const data = new FormData(form);
    for (const [k, v] of data) {
      const val = String(v).trim();
      if (!val || k === "props" || k === "props_col") continue;
      if ((k === "since" || k === "until") && data.get("range") !== "custom") continue;
      if (k === "range" && val === defaultRange) continue;
      if (k === "outcome_pick") {
        if (val === "error" || val === "ok") next.set("error", String(val === "error"));
        else next.set("outcome", val.slice("outcome:".length));
        continue;
      }
      next.set(k, val);
    }
    for (const [name, value] of parseProps(String(data.get("props") || ""))) next.set("property." + name, value);
    go(view, null, next);
  });
  return form;
}

// The property filters share one text field, "name=value, name=value": a comma or backslash in a
// name or value is written \, or \\ (and = in a name \=), so a value like "a,b=c" survives Apply.
const escProp = (t, chars) => t.replace(chars, (c) => "\\" + c);
function propsText(params) {
  return [...params].filter(([k]) => k.startsWith("property."))
    .map(([k, v]) => escProp(k.slice(9), /[\\,=]/g) + "=" + escProp(v, /[\\,]/g)).join(", ");
}

/** [name, value] pairs of the property field; the first unescaped = ends a name. */
function parseProps(text) {
  const pairs = [];
  let cur = [""];
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length) cur[cur.length - 1] += text[(i += 1)];
    else if (c === ",") { pairs.push(cur); cur = [""]; }
    else if (c === "=" && cur.length === 1) cur.push("");
    else cur[cur.length - 1] += c;
  }
  pairs.push(cur);
  return pairs.filter((p) => p.length === 2 && p[0].trim()).map(([k, v]) => [k.trim(), v.trim()]);
}

function withParam(params, key, value) {
  const next = new URLSearchParams(params);
  next.delete("cursor");
  if (value === null || value === undefined || value === "") next.delete(key); else next.set(key, value);
  return next;
}

// -- requests ------------------------------------------------------------------------------------

let tableRows = []; // ids of the rows shown, for J/K
let currentParams = new URLSearchParams();

function requestColumns(params) {
  const propCols = (params.get("cols") || "").split(",").map((s) => s.trim()).filter(Boolean);
  return propCols;
}

function sortHeader(label, key, params, cls) {
  const sort = params.get("sort") || "time";
  const order = params.get("order") || "desc";
  const active = sort === key;
  const next = withParam(withParam(params, "sort", key === "time" ? null : key), "order", active && order === "desc" ? "asc" : null);
  return h("th", { class: cls, "aria-sort": active ? (order === "desc" ? "descending" : "ascending") : null },
    h("a", { href: hashFor("requests", null, next), class: active ? "sorted" : "", title: "sort by " + key, "data-sort": key },
      label, active ? (order === "desc" ? " ▼" : " ▲") : ""));
}

function requestRow(row, params, propCols, view = "requests") {
  const filterLink = (key, value, text) =>
    value === null || value === undefined ? h("span", { class: "muted" }, "–")
      : h("a", { href: hashFor("requests", null, withParam(params, key, value)), title: `${value} (click to filter by ${key})` }, h("bdi", {}, text ?? value));
  const tr = h("tr", { "data-id": row.id, tabindex: "-1" },
    // The time opens the request: a link, so Tab reaches every row (a click anywhere else does too).
    h("td", { class: "nowrap", title: row.created_at },
      h("a", { class: "open", href: hashFor(view, row.id, params), "aria-label": `${fmtTimeUtc(row.created_at)}, ${row.model || "no model"}: open the request` }, fmtTime(row.created_at))),
    h("td", {}, statusCell(row)),
    h("td", {}, filterLink("provider", row.provider)),
    h("td", { class: "model" }, filterLink("model", row.model)),
    h("td", { class: "ellipsis" }, filterLink("user_id", row.user_id)),
    h("td", { class: "ellipsis" }, filterLink("session_id", row.session_id)),
    h("td", { class: "num" }, fmtInt(row.prompt_tokens),
      row.cached_tokens ? h("div", { class: "sub", title: "cached input tokens" }, "cached " + fmtInt(row.cached_tokens)) : null,
      row.cache_write_tokens ? h("div", { class: "sub", title: "cache-write tokens" }, "write " + fmtInt(row.cache_write_tokens)) : null),
    h("td", { class: "num" }, fmtInt(row.completion_tokens),
      row.reasoning_tokens ? h("div", { class: "sub", title: "reasoning tokens" }, "reasoning " + fmtInt(row.reasoning_tokens)) : null),
    h("td", { class: "num" }, costCell(row.cost_usd, row)),
    h("td", { class: "num" }, fmtMs(row.latency_ms)),
    h("td", { class: "num" }, fmtMs(row.time_to_first_token_ms)),
    h("td", {}, row.streamed ? "yes" : "no"),
    ...propCols.map((c) => h("td", { class: "ellipsis" }, capped((row.properties || {})[c] ?? "–"))));
  tr.addEventListener("click", (ev) => {
    if (ev.target.closest("a")) return;
    go(view, row.id, params);
  });
  return tr;
}

function requestTable(rows, params, view = "requests") {
  const propCols = requestColumns(params);
  const sortable = view === "requests";
  const th = (label, key, cls) => (sortable && key ? sortHeader(label, key, params, cls) : h("th", { class: cls }, label));
  return scroller(h("table", { class: "grid", id: "requests-table" },
    h("thead", {}, h("tr", {},
      th("Time (UTC)", "time"), th("Status"), th("Provider"), th("Model"), th("User"), th("Session"),
      th("Tokens in", null, "num"), th("Tokens out", null, "num"), th("Cost", "cost", "num"),
      th("Latency", "latency", "num"), th("TTFT", null, "num"), th("Streamed"),
      ...propCols.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => requestRow(r, params, propCols, view)))));
}

/** A wide table scrolls sideways in its own box, never the whole page. */
const scroller = (table) => h("div", { class: "table-scroll" }, table);
/** A long value cut with an ellipsis (CSS: td.ellipsis > *), whole in its tooltip. */
const capped = (v) => h("span", { title: String(v), dir: "auto" }, String(v));

/** The empty state: with filters, say so; with none, how to send the first request. */
function noRequests(params) {
  const filtered = [...params.keys()].some((k) => !["range", "since", "until", "cols", "sort", "order", "cursor"].includes(k));
  if (filtered) return h("p", { class: "empty" }, "No requests match these filters.");
  const base = `http://${location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname}:8787`;
  return h("div", { class: "empty first-run" },
    h("p", {}, "No requests in this range. To log one, send it through the gateway (port 8787 unless LLMTAP_GATEWAY_PORT says otherwise); it shows here a second later:"),
    h("pre", { class: "raw", tabindex: 0 },
      `OpenAI(base_url="${base}/openai/v1")\n` +
      `Anthropic(base_url="${base}/anthropic")\n` +
      `genai.Client(http_options={"base_url": "${base}/gemini"})`));
}

async function viewRequests(id, params) {
  currentParams = params;
  const colsInput = h("label", {}, "Columns", h("input", { name: "cols", value: params.get("cols") || "", placeholder: "property names", size: 12, autocomplete: "off" }));
  const bar = filterBar(params, "requests", { extra: [colsInput], search: true });
  renderPending("Requests", bar);
  const q = apiFilters(params, "24h", { search: true });
  for (const k of ["sort", "order", "cursor"]) if (params.get(k)) q.set(k, params.get(k));
  q.set("limit", "50");
  const exportQ = apiFilters(params, "24h", { search: true });
  const exp = (fmt) => h("button", { type: "button", class: "export", "data-format": fmt, onclick: () => download(fmt, exportQ) }, "Export " + fmt.toUpperCase());
  const page = await api("api/v1/requests?" + q.toString());
  tableRows = page.items.map((r) => r.id);
  const nav = h("div", { class: "pager" },
    params.get("cursor") ? h("a", { class: "button", href: hashFor("requests", null, withParam(params, "cursor", null)) }, "⇤ Newest") : null,
    page.next_cursor ? h("a", { class: "button", id: "next-page", href: hashFor("requests", null, withParam(withParam(params, "cursor", null), "cursor", page.next_cursor)) }, "Next page →") : null,
    h("span", { class: "spacer" }), exp("csv"), exp("jsonl"));
  announce(page.items.length ? `${page.items.length} requests shown${page.next_cursor ? ", more on the next page" : ""}` : "no requests match");
  render(
    h("h1", {}, "Requests"),
    bar,
    page.items.length ? requestTable(page.items, params) : noRequests(params),
    nav,
    h("p", { class: "hint muted" }, "Keys: J / K next / previous request, Esc closes, / focuses the search. Click a value to filter by it."));
  if (id) await openDrawer(id, params, "requests"); else closeDrawer(false);
}

async function download(fmt, q) {
  const query = new URLSearchParams(q);
  query.set("format", fmt);
  const url = "api/v1/requests/export?" + query.toString();
  if (!sessionStorage.getItem(KEY)) {
    // No key to send: a plain download link lets the browser stream any size straight to disk.
    const a = h("a", { href: url, download: "", hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    return;
  }
  // A key must go in a header, which a link cannot carry: fetch, then hand the blob over.
  const resp = await fetch(url, { headers: authHeaders() });
  if (!resp.ok) { showError(new Error("export failed: " + resp.status)); return; }
  const blob = await resp.blob();
  const a = h("a", { href: URL.createObjectURL(blob), download: "llmtap-requests." + fmt, hidden: true });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// -- detail drawer -------------------------------------------------------------------------------

let drawerState = null; // { id, params, view }
let drawerOpener = null; // what had the focus when the drawer opened: it gets it back
const narrow = window.matchMedia("(max-width: 800px)"); // the drawer covers the page (app.css)

/** While the drawer covers the page, what is under it is out of reach of Tab and screen readers. */
function coverPage(on) {
  for (const el of [main, header, banner, document.getElementById("skip")]) el.inert = on && narrow.matches;
}
narrow.addEventListener("change", () => coverPage(!drawer.hidden));

function closeDrawer(navigate = true) {
  if (drawer.hidden && !drawerState) return;
  // The focus was in the drawer, or nowhere (Tab went past its end): it goes back to the table.
  const had = drawer.contains(document.activeElement) || !document.activeElement || document.activeElement === document.body;
  const id = drawerState && drawerState.id;
  drawer.hidden = true;
  document.title = viewTitle;
  coverPage(false);
  clear(drawer);
  if (had) {
    // Back to the row it was opened from (or the one J/K reached), else what opened it.
    const row = id && [...document.querySelectorAll("#requests-table tr[data-id]")].find((t) => t.dataset.id === id);
    const back = (row && row.querySelector("a.open")) || (drawerOpener && drawerOpener.isConnected ? drawerOpener : null);
    if (back) back.focus(); else refocus(null);
  }
  drawerOpener = null;
  document.querySelectorAll("tr.selected").forEach((tr) => tr.classList.remove("selected"));
  if (navigate && drawerState) {
    const { view, params } = drawerState;
    drawerState = null;
    go(view, null, params);
  }
  drawerState = null;
}

async function openDrawer(id, params, view) {
  drawerState = { id, params, view };
  document.querySelectorAll("tr.selected").forEach((tr) => tr.classList.remove("selected"));
  const tr = [...document.querySelectorAll("tr[data-id]")].find((t) => t.dataset.id === id);
  if (tr) { tr.classList.add("selected"); tr.scrollIntoView({ block: "nearest" }); }
  if (drawer.hidden && !drawer.contains(document.activeElement)) drawerOpener = document.activeElement;
  drawer.hidden = false;
  coverPage(true);
  fill(drawer, h("p", { class: "muted" }, "Loading…"));
  let row;
  try {
    row = await api("api/v1/requests/" + encodeURIComponent(id));
  } catch (e) {
    if (drawerState && drawerState.id === id) {
      fill(drawer, closeButton(), h("p", { class: "err" }, e.message));
      drawer.querySelector(".close").focus();
    }
    return;
  }
  if (!drawerState || drawerState.id !== id) return;
  fill(drawer, ...detailView(row, params, view));
  drawer.scrollTop = 0;
  document.title = `llmtap · Request ${row.model || row.id} (${fmtTimeUtc(row.created_at)})`;
  // The focus goes to the request's heading: Tab goes on into its detail, Esc closes it.
  const heading = drawer.querySelector(".dhead h2");
  if (heading) { heading.setAttribute("tabindex", "-1"); heading.focus({ preventScroll: true }); }
}

const closeButton = () => h("button", { class: "close", type: "button", title: "close (Esc)", "aria-label": "Close the request detail", onclick: () => closeDrawer() }, "×");

function curlFor(id) {
  const key = sessionStorage.getItem(KEY) ? " -H 'Authorization: Bearer $LLMTAP_KEY'" : "";
  const url = new URL("api/v1/requests/" + encodeURIComponent(id), document.baseURI).href;
  return "curl -s" + key + " '" + url.replace(/'/g, "'\\''") + "'";
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === null || v === undefined || v === "" ? "–" : v)]));
}

function section(title, ...body) {
  return h("section", { class: "dsec" }, h("h3", {}, title), ...body);
}

// Encoded media in JSON (an image in a message, `b64_json`, a speech answer's audio): shown in
// full, one 6 MB request made a 4 MB block of text. It is shown by its size (the API's body
// still holds it whole): a `data:` URL, also inside prose (a Markdown image), whatever its
// letters; in a place that says it is media (mediaPlace: Anthropic's base64 source, Gemini's
// inline_data, input_audio, an audio answer, b64_json, an image generation's result) a string
// of base64's letters, whatever they are (silent or quiet audio uses few); elsewhere one over
// 1 KiB that looks random: base64 of media uses most of its 64 letters in any 200 (~60), a
// path, an identifier, a DNA sequence or a hex digest few, and a password or a list of
// identifiers of a few hundred letters is text, as is a function's `result` or a text
// document's `data`. Three places are looked at: audio that begins with silence begins with
// "AAAA". MIME base64 wraps its lines. The search index (store/search.py) has the same rules.
const B64 = /^[A-Za-z0-9+/_\r\n-]+=*$/;
const B64_RUN = /(?:[A-Za-z0-9+/_-]|\\[nr/])+=*/g; // in text (a cut body): JSON's \n and \/ inside
const DATA_URL_IN_TEXT = /;base64,([A-Za-z0-9+/_-]{200,}=*)/g;
const ALWAYS_MEDIA = new Set(["b64_json", "partial_image_b64", "bytesBase64Encoded", "embedding", "audio", "file_data"]);
const random = (s) => [0, s.length >> 1, Math.max(0, s.length - 200)].some((i) => new Set(s.slice(i, i + 200)).size >= 40);
/** Whether holder[key] is media by its place (store/search.py's `_media`). */
function mediaPlace(holder, key) {
  if (ALWAYS_MEDIA.has(key)) return true;
  if (!holder || typeof holder !== "object" || Array.isArray(holder)) return false;
  if (key === "result") return holder.type === "image_generation_call";
  if (key !== "data") return false;
  if ("media_type" in holder) return holder.type === "base64";
  return ["mime_type", "mimeType", "format", "transcript", "expires_at"].some((k) => k in holder);
}
function isBlob(s, keyed) {
  if (s.length < 200 || s.includes(" ")) return false;
  if (s.startsWith("data:")) return s.slice(0, 200).includes(";base64,");
  if (!keyed && s.length < 1024) return false;
  return B64.test(s) && (keyed || random(s));
}
const blobNote = (kind, chars) => `«${kind}, ${fmtBytes(Math.floor(chars * 3 / 4))}: not shown, the API's body holds it»`;
/** Prose with a `data:` URL in it (a Markdown image): its payload elided. */
const inText = (s) => (s.length < 200 || !s.includes(";base64,") ? s : s.replace(DATA_URL_IN_TEXT, (m, b64) => ";base64," + blobNote("base64 data", b64.length)));
function elide(key, value) {
  // `this` is the object holding `key` (JSON.stringify's replacer): a media place is known by it.
  if (typeof value !== "string" || value.length < 200) return value;
  if (isBlob(value, mediaPlace(this, key))) {
    return blobNote(value.startsWith("data:") ? value.slice(5, value.indexOf(";")) || "data" : "base64 data", value.length);
  }
  return value.includes(" ") ? inText(value) : value;
}

function pretty(v) {
  if (v === null || v === undefined) return "(none)";
  // A body cut at the size limit is text, no JSON: its base64 runs are elided in place.
  if (typeof v === "string") return v.length < 200 ? v : v.replace(B64_RUN, (m) => (m.length >= 200 && random(m) ? blobNote("base64 data", m.length) : m));
  return JSON.stringify(v, elide, 2);
}

/**
 * The facts one opens a request for, above its conversation (which may be 80 KB long): the
 * user and the session link to their requests and their session page.
 */
function summary(row) {
  const link = (value, href, title) => (value === null || value === undefined ? "–" : h("a", { href, title }, value));
  return h("dl", { class: "summary", id: "summary" },
    [
      ["Status", statusCell(row)],
      ["Model", row.model || "–"],
      ["Cost", costCell(row.cost_usd, row)],
      ["Tokens in / out", `${fmtInt(row.prompt_tokens)} / ${fmtInt(row.completion_tokens)}`],
      ["Latency", fmtMs(row.latency_ms)],
      ["TTFT", fmtMs(row.time_to_first_token_ms)],
      ["User", link(row.user_id, hashFor("requests", null, new URLSearchParams({ user_id: row.user_id ?? "", range: "all" })), `${row.user_id} (their requests)`)],
      ["Session", link(row.session_id, hashFor("sessions", row.session_id ?? "", null), `${row.session_id} (the session page)`)],
      ["Time", fmtTimeUtc(row.created_at)],
    ].map(([k, v]) => h("div", { "data-fact": k }, h("dt", {}, k), h("dd", { title: typeof v === "string" ? v : undefined }, v))));
}

function detailView(row, params, view) {
  const curl = curlFor(row.id);
  const copyBtn = h("button", { type: "button", class: "copy", onclick: async (ev) => {
    try { await navigator.clipboard.writeText(curl); ev.target.textContent = "Copied"; } catch (e) { ev.target.textContent = "Copy failed: select the text"; }
  } }, "Copy as curl");
  const permalink = hashFor("requests", row.id, new URLSearchParams());
  const idx = tableRows.indexOf(row.id);
  const out = [
    h("div", { class: "dhead" },
      closeButton(),
      h("h2", { id: "drawer-title" }, row.model || "(no model)"),
      h("div", { class: "muted" }, row.provider, " · ", row.method, idx >= 0 ? ` · ${idx + 1} of ${tableRows.length}` : ""),
      summary(row),
      h("div", { class: "actions" }, h("a", { href: permalink, class: "button" }, "Permalink"), copyBtn),
      h("code", { class: "curl" }, curl)),
    ((conv) => section(conv.classList.contains("embeddings") ? "Embeddings" : "Conversation", conv))(conversation(row)),
    section("Timing", kv([
      ["Started", fmtInstant(row.created_at)], ["First byte", fmtInstant(row.first_byte_at)], ["Ended", fmtInstant(row.ended_at)],
      ["Latency", fmtMs(row.latency_ms)], ["Time to first token", fmtMs(row.time_to_first_token_ms)], ["Streamed", row.streamed ? "yes" : "no"]])),
    section("Cost and usage", kv([
      ["Cost", costCell(row.cost_usd, row)], ["Price table", row.price_version], ["Usage source", row.usage_source],
      ["Prompt tokens", fmtInt(row.prompt_tokens)], ["Cached tokens", fmtInt(row.cached_tokens)], ["Cache-write tokens", fmtInt(row.cache_write_tokens)],
      ["Completion tokens", fmtInt(row.completion_tokens)], ["Reasoning tokens", fmtInt(row.reasoning_tokens)], ["Total tokens", fmtInt(row.total_tokens)],
      // Priced apart, where the provider reports them (none: not shown).
      row.cache_write_1h_tokens != null ? ["1-hour cache-write tokens", fmtInt(row.cache_write_1h_tokens)] : null,
      row.input_audio_tokens != null || row.output_audio_tokens != null ? ["Audio tokens in / out", `${fmtInt(row.input_audio_tokens)} / ${fmtInt(row.output_audio_tokens)}`] : null,
      row.web_search_requests != null ? ["Web searches", fmtInt(row.web_search_requests)] : null,
      row.audio_seconds != null ? ["Audio seconds", fmtInt(row.audio_seconds)] : null,
      row.input_characters != null ? ["Input characters", fmtInt(row.input_characters)] : null,
      row.service_tier != null ? ["Service tier", row.service_tier] : null])),
    section("Request", kv([
      ["Id", row.id], ["Method", row.method], ["Path", row.path], ["Target", row.target_url], ["User", row.user_id], ["Session", row.session_id],
      ["Route", row.route], ["Gateway", row.gateway], ["Error", row.error]])),
    section("Properties", Object.keys(row.properties || {}).length ? kv(Object.entries(row.properties)) : h("p", { class: "muted" }, "none")),
    section("Headers", h("h4", {}, "Request"), kv(Object.entries(row.request_headers || {})), h("h4", {}, "Response"), kv(Object.entries(row.response_headers || {}))),
  ];
  if (row.response_events) out.push(section("Stream events", rawBody(row, "response_events")));
  out.push(section("Raw request body", rawBody(row, "request_body")));
  out.push(section("Raw response body", rawBody(row, "response_body")));
  return out;
}

/** A body as the API gave it, saying why there is none, or that it is binary (in base64). */
function rawBody(row, part) {
  const meta = (row.bodies || {})[part];
  const value = row[part];
  if (meta && meta.unavailable) {
    return h("p", { class: "muted" }, `Logged (${fmtInt(meta.size)} bytes), but the body store would not give it just now: ${meta.unavailable}. Reload to try again.`);
  }
  if (meta && meta.missing) {
    return h("p", { class: "muted" }, `Logged (${fmtInt(meta.size)} bytes) but not found in the body store: deleted by retention, damaged, or written to another host's disk (LLMTAP_BODIES=file on separate hosts).`);
  }
  const cut = meta && meta.truncated ? h("p", { class: "muted cut" }, cutNote(meta)) : null;
  const form = meta && typeof value === "string" ? formParts(meta, value) : null;
  if (form) {
    // An upload (a transcription's audio, a file): its fields by name, each file by its size.
    const shown = value.length > 4096 ? value.slice(0, 4096) + "…" : value;
    return h("div", { class: "form" },
      cut,
      h("p", { class: "muted" }, `Form (multipart/form-data, ${fmtInt(meta.size)} bytes), ${form.length} field${form.length === 1 ? "" : "s"}:`),
      kv(form.map((f) => [f.name, f.filename !== undefined
        ? `file ${JSON.stringify(f.filename)}, ${f.cut ? "cut: its first " : ""}${fmtInt(f.bytes)} bytes${f.cut ? " kept" : ""}${f.type ? ", " + f.type : ""}`
        : textPart(f.text)])),
      h("details", {}, h("summary", {}, meta.encoding === "base64" ? "the body in base64" : "the body as sent"),
        h("pre", { class: "raw", tabindex: 0 }, shown)));
  }
  if (meta && meta.encoding === "base64" && typeof value === "string") {
    const shown = value.length > 4096 ? value.slice(0, 4096) + "…" : value;
    const holds = meta.truncated ? "what was kept" : "all of it";
    return h("div", {},
      cut,
      h("p", { class: "muted" }, `Binary body: ${fmtInt(meta.size)} bytes of ${meta.content_type || "unknown type"}, in base64 (the API's ${part} holds ${holds}).`),
      h("pre", { class: "raw", tabindex: 0 }, shown));
  }
  return cut ? h("div", {}, cut, h("pre", { class: "raw", tabindex: 0 }, pretty(value))) : h("pre", { class: "raw", tabindex: 0 }, pretty(value));
}

/** A multipart/form-data body's fields: {name, text} or {name, filename, bytes, type}; null
 * when it is none or cannot be read as one. `value` is the API's text or base64 of it. Read as
 * the gateway reads it (`providers/forms.py`, rev21): a delimiter starts a line and ends it,
 * the close delimiter ends the form, at most 1000 parts, heads of at most 8 KiB, 128 KiB in all. */
function formParts(meta, value) {
  const ctype = meta.content_type || "";
  if (!/^\s*multipart\/form-data\b/i.test(ctype)) return null;
  const boundary = headerParams(ctype).get("boundary");
  if (!boundary) return null;
  if (value.length > 32e6) return null; // read in the browser: not a whole large upload
  let bin = ""; // one character per byte
  try {
    if (meta.encoding === "base64") bin = atob(value);
    else {
      const bytes = new TextEncoder().encode(value);
      for (let i = 0; i < bytes.length; i += 8192) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
    }
  } catch (e) {
    return null;
  }
  const utf8 = (s) => new TextDecoder().decode(Uint8Array.from(s, (c) => c.charCodeAt(0)));
  const body = "\r\n" + bin;
  const delim = "\r\n--" + utf8ToBin(boundary);
  const next = (from) => { // [offset, closes the form, where the next part's head starts]
    for (let s = from; ; ) {
      const pos = body.indexOf(delim, s);
      if (pos < 0) return [-1, false, -1];
      const after = pos + delim.length;
      if (body.startsWith("--", after)) return [pos, true, -1];
      let eol = after;
      while (eol < body.length && eol - after < 64 && (body[eol] === " " || body[eol] === "\t")) eol++;
      if (body.startsWith("\r\n", eol)) return [pos, false, eol + 2];
      s = pos + 1; // the boundary's letters inside a line: no delimiter
    }
  };
  const out = [];
  let heads = 0;
  let [pos, close, start] = next(0);
  for (let n = 0; n < 1000 && pos >= 0 && !close; n++) {
    let after;
    [pos, close, after] = next(start);
    const stop = pos < 0 ? body.length : pos;
    let head = "";
    let at = start + 2;
    if (!body.startsWith("\r\n", start)) {
      const end = body.slice(start, Math.min(stop, start + 8196)).indexOf("\r\n\r\n");
      if (end < 0) { // a head too long to be one, or cut at the size limit inside it
        start = after;
        continue;
      }
      head = body.slice(start, start + end);
      at = start + end + 4;
      heads += end;
      if (heads > 128 * 1024) break; // the gateway reads no more heads than this (rev23)
    }
    const part = body.slice(at, stop);
    const disp = (/^content-disposition:[^\r\n]*/im.exec(head) || [""])[0];
    const params = headerParams(disp.slice(disp.indexOf(":") + 1));
    const name = params.get("name*") ?? params.get("name");
    const file = params.get("filename") ?? params.get("filename*");
    const type = /^content-type:[ \t]*([^\r\n]*)/im.exec(head);
    const field = { name: name !== undefined ? utf8(name) : "(no name)" };
    // The part the size limit cut (no delimiter after it): its bytes are only those kept.
    const cut = pos < 0 && meta.truncated;
    if (file !== undefined) Object.assign(field, { filename: utf8(file), bytes: part.length, cut, type: type ? type[1] : "" });
    else field.text = utf8(part);
    out.push(field);
    start = after;
  }
  return out.length ? out : null;
}

/** The parameters of a header value (`; key=value`, quoted with `\` escapes or not), keys
 * lowercased, at most 16: a quoted `;` or `boundary=` stays in its value (rev21). RFC 8187's
 * `key*=UTF-8''value` is percent-decoded, one character per byte, as `utf8` then reads it. */
function headerParams(value) {
  const out = new Map();
  // A quote never closed is no quoted value: taken as sent (rev23: `name="modelx` read as `model`)
  const re = /;\s*([^\s=;"]+)\s*(?:=\s*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|([^;]*)))?/g;
  for (let m, n = 0; n < 16 && (m = re.exec(value)); n++) {
    const key = m[1].toLowerCase();
    const v = m[2] !== undefined ? m[2].replace(/\\(.)/gs, "$1") : (m[3] || "").trim();
    const ext = key.endsWith("*") ? /^([\w-]+)'[^']*'(.*)$/.exec(v) : null;
    // Not UTF-8 (`ISO-8859-1''mod%E8l`): its characters, as UTF-8 bytes for `utf8` (rev22)
    const decoded = ext && (/^utf-8$/i.test(ext[1]) ? unescape(ext[2]) : utf8ToBin(unescape(ext[2])));
    if (!out.has(key)) out.set(key, ext ? decoded : v);
  }
  return out;
}

/** A string's UTF-8 bytes, one character per byte (a boundary past ASCII, as the client sent it). */
function utf8ToBin(s) {
  return Array.from(new TextEncoder().encode(s), (b) => String.fromCharCode(b)).join("");
}

/** Why a body shows only its start: it was larger than the gateway keeps. */
function cutNote(meta) {
  return `Cut: this body was ${fmtInt(meta.size)} bytes, more than the gateway keeps (LLMTAP_MAX_BODY_BYTES); only its start was logged.`;
}

// -- conversations: OpenAI chat, OpenAI Responses, Anthropic messages, Gemini ---------------------

/** A message; Gemini's "model" turns keep their name and look like any assistant's. */
function msg(role, ...parts) {
  const cls = role === "model" ? "assistant" : String(role).replace(/[^a-z_]/gi, "");
  return h("div", { class: "msg role-" + cls }, h("div", { class: "role" }, role), ...parts);
}
/** A message's text; a long one shows its first lines and a toggle to show it all. */
const textPart = (t) => folding(h("div", { class: "text", dir: "auto" }, inText(String(t))));
/** A tool's arguments or result, code and its output: preformatted, long ones folded the same way. */
const codePart = (t) => folding(h("pre", {}, String(t)));
function folding(el) {
  const s = el.textContent;
  if (s.length <= LONG_CHARS && lineCount(s, LONG_LINES) <= LONG_LINES) return el;
  const more = `show all (${nf.format(s.length)} characters)`;
  el.classList.add("collapsed");
  const button = h("button", { type: "button", class: "more", "aria-expanded": "false" }, more);
  button.addEventListener("click", () => {
    const collapsed = el.classList.toggle("collapsed");
    button.textContent = collapsed ? more : "show less";
    button.setAttribute("aria-expanded", String(!collapsed));
  });
  return h("div", { class: "longtext" }, el, button);
}
const LONG_CHARS = 1200;
const LONG_LINES = 12;
/** Lines in s, counted up to limit + 1. */
function lineCount(s, limit) {
  let n = 1;
  for (let i = s.indexOf("\n"); i >= 0 && n <= limit; i = s.indexOf("\n", i + 1)) n += 1;
  return n;
}
function imagePart(url) {
  const s = String(url || "");
  if (s.startsWith("data:")) return h("div", { class: "attach" }, `[inline image, ${fmtBytes(s.length)}]`);
  const safe = safeHref(s);
  return h("div", { class: "attach" }, "[image] ", safe ? h("a", { href: safe, target: "_blank", rel: "noopener noreferrer" }, s) : s);
}
const toolCall = (name, args, id) => h("div", { class: "tool" }, h("span", { class: "tname" }, "→ tool call " + (name || "?")), id ? h("span", { class: "muted" }, " " + id) : null, codePart(typeof args === "string" ? tryPretty(args) : pretty(args)));
const toolResult = (content, id) => h("div", { class: "tool result" }, h("span", { class: "tname" }, "← tool result"), id ? h("span", { class: "muted" }, " " + id) : null, codePart(typeof content === "string" ? content : pretty(content)));
const reasoning = (t) => h("details", { class: "reasoning" }, h("summary", {}, "reasoning"), h("div", { class: "text", dir: "auto" }, String(t)));
function tryPretty(s) { try { return JSON.stringify(JSON.parse(s), null, 2); } catch (e) { return s; } }

function openaiContent(content) {
  if (content === null || content === undefined) return [];
  if (typeof content === "string") return [textPart(content)];
  if (!Array.isArray(content)) return [h("pre", {}, pretty(content))];
  return content.map((p) => {
    if (!p || typeof p !== "object") return textPart(p);
    if (p.type === "text" || p.type === "input_text" || p.type === "output_text") return textPart(p.text ?? "");
    if (p.type === "image_url") return imagePart(p.image_url && (p.image_url.url ?? p.image_url));
    if (p.type === "input_image") return imagePart(p.image_url);
    if (p.type === "refusal") return textPart("[refusal] " + p.refusal);
    return h("pre", {}, pretty(p));
  });
}

function anthropicBlocks(content) {
  if (typeof content === "string") return [textPart(content)];
  if (!Array.isArray(content)) return [h("pre", {}, pretty(content))];
  return content.map((b) => {
    if (!b || typeof b !== "object") return textPart(b);
    switch (b.type) {
      case "text": return textPart(b.text ?? "");
      case "thinking": return reasoning(b.thinking ?? "");
      case "redacted_thinking": return reasoning("[redacted]");
      case "tool_use": return toolCall(b.name, b.input, b.id);
      case "tool_result": return toolResult(Array.isArray(b.content) ? b.content.map((c) => c.text ?? pretty(c)).join("\n") : b.content, b.tool_use_id);
      case "image": return b.source && b.source.type === "url" ? imagePart(b.source.url) : h("div", { class: "attach" }, "[inline image]");
      default: return h("pre", {}, pretty(b));
    }
  });
}

// Gemini (generateContent, streamGenerateContent): the API takes proto JSON, where a field may be
// spelled camelCase (what the API and the SDKs send) or snake_case; both are read.
const gget = (o, camel, snake) => (o && typeof o === "object" ? (camel in o ? o[camel] : o[snake]) : undefined);

function geminiParts(parts) {
  if (!Array.isArray(parts)) return parts === undefined || parts === null ? [] : [h("pre", {}, pretty(parts))];
  return parts.map((p) => {
    if (!p || typeof p !== "object") return textPart(p);
    const call = gget(p, "functionCall", "function_call");
    const result = gget(p, "functionResponse", "function_response");
    const inline = gget(p, "inlineData", "inline_data");
    const file = gget(p, "fileData", "file_data");
    const code = gget(p, "executableCode", "executable_code");
    const codeResult = gget(p, "codeExecutionResult", "code_execution_result");
    if (typeof p.text === "string") return p.thought ? reasoning(p.text) : textPart(p.text);
    if (call) return toolCall(call.name, call.args, call.id);
    if (result) return toolResult(result.response, result.name || result.id);
    if (inline) {
      const mime = gget(inline, "mimeType", "mime_type") || "data";
      return h("div", { class: "attach" }, `[inline ${mime}, ${fmtBytes(String(inline.data || "").length)}]`);
    }
    if (file) {
      const uri = String(gget(file, "fileUri", "file_uri") || "");
      const safe = safeHref(uri);
      return h("div", { class: "attach" }, `[${gget(file, "mimeType", "mime_type") || "file"}] `, safe ? h("a", { href: safe, target: "_blank", rel: "noopener noreferrer" }, uri) : uri);
    }
    if (code) return h("div", { class: "tool" }, h("span", { class: "tname" }, "→ code (" + (code.language || "?") + ")"), codePart(code.code ?? ""));
    if (codeResult) return h("div", { class: "tool result" }, h("span", { class: "tname" }, "← code result (" + (codeResult.outcome || "?") + ")"), codePart(codeResult.output ?? ""));
    return h("pre", {}, pretty(p));
  });
}

/** A Content: its role ("user", "model"; a turn of function responses only is the tools'). */
function geminiContent(c) {
  if (typeof c === "string") return msg("user", textPart(c));
  if (!c || typeof c !== "object") return msg("user", textPart(c));
  const parts = Array.isArray(c.parts) ? c.parts : [];
  const onlyResults = parts.length && parts.every((p) => p && gget(p, "functionResponse", "function_response"));
  return msg(onlyResults ? "tool" : c.role || "user", ...geminiParts(c.parts));
}

/** The candidates of a response, or of the chunks of a stream answered as one JSON array. */
function geminiCandidates(resp) {
  if (Array.isArray(resp)) {
    const merged = new Map();
    for (const chunk of resp) {
      for (const c of (chunk && Array.isArray(chunk.candidates) ? chunk.candidates : [])) {
        const i = Number.isInteger(c.index) ? c.index : 0;
        const acc = merged.get(i) || { content: { role: "model", parts: [] } };
        const parts = c.content && Array.isArray(c.content.parts) ? c.content.parts : [];
        for (const p of parts) {
          const last = acc.content.parts[acc.content.parts.length - 1];
          if (last && typeof last.text === "string" && typeof p.text === "string" && !!last.thought === !!p.thought) last.text += p.text;
          else acc.content.parts.push({ ...p });
        }
        if (c.finishReason) acc.finishReason = c.finishReason;
        merged.set(i, acc);
      }
    }
    return [...merged.keys()].sort((a, b) => a - b).map((k) => merged.get(k));
  }
  return resp && typeof resp === "object" && Array.isArray(resp.candidates) ? resp.candidates : [];
}

function geminiConversation(req, resp, out) {
  const system = gget(req, "systemInstruction", "system_instruction");
  if (system) out.push(msg("system", ...(typeof system === "string" ? [textPart(system)] : geminiParts(system.parts))));
  const contents = Array.isArray(req.contents) ? req.contents : req.contents ? [req.contents] : [];
  for (const c of contents) out.push(geminiContent(c));
  for (const cand of geminiCandidates(resp)) {
    const reason = gget(cand, "finishReason", "finish_reason");
    const note = reason && reason !== "STOP" ? h("div", { class: "attach" }, "finish reason: " + reason) : null;
    out.push(msg((cand.content && cand.content.role) || "model", ...geminiParts(cand.content && cand.content.parts), note));
  }
  const feedback = resp && !Array.isArray(resp) && typeof resp === "object" ? gget(resp, "promptFeedback", "prompt_feedback") : null;
  const blocked = feedback && gget(feedback, "blockReason", "block_reason");
  if (blocked) out.push(msg("error", textPart("prompt blocked: " + blocked)));
}

const isGemini = (row, req) => req && typeof req === "object" && !Array.isArray(req)
  && ("contents" in req || (row.provider === "gemini" && gget(req, "systemInstruction", "system_instruction")));

// Embeddings (OpenAI and Azure /embeddings, Gemini embedContent and batchEmbedContents): the
// inputs as text, the reply as how many vectors of how many dimensions (the numbers say nothing).

/** { inputs: [text or token ids], vectors: [dimensions], base64 } or null when not embeddings. */
function embeddingsOf(row, req, resp) {
  const path = String(row.path || "").split("?")[0];
  const r = resp && typeof resp === "object" && !Array.isArray(resp) ? resp : {};
  const geminiText = (c) => (c && Array.isArray(c.parts) ? c.parts.map((p) => (p && typeof p.text === "string" ? p.text : pretty(p))).join("\n") : pretty(c));
  if (/:embedContent$/.test(path) || (req && typeof req === "object" && "content" in req && r.embedding)) {
    const values = r.embedding && r.embedding.values;
    return { inputs: [geminiText(req && req.content)], vectors: Array.isArray(values) ? [values.length] : [], base64: false };
  }
  if (/:batchEmbedContents$/.test(path)) {
    const reqs = req && Array.isArray(req.requests) ? req.requests : [];
    const embs = Array.isArray(r.embeddings) ? r.embeddings : [];
    return { inputs: reqs.map((x) => geminiText(x && x.content)), vectors: embs.map((e) => (e && Array.isArray(e.values) ? e.values.length : 0)), base64: false };
  }
  const data = Array.isArray(r.data) ? r.data.filter((d) => d && typeof d === "object" && "embedding" in d) : [];
  if (!/\/embeddings$/.test(path) && !data.length) return null;
  const input = req && typeof req === "object" ? req.input : undefined;
  let inputs;
  if (typeof input === "string") inputs = [input];
  else if (Array.isArray(input) && input.length && input.every((x) => typeof x === "number")) inputs = [input];  // one input as token ids
  else if (Array.isArray(input)) inputs = input;
  else inputs = input === undefined ? [] : [input];
  const base64 = data.some((d) => typeof d.embedding === "string");
  // A base64 vector is little-endian float32s: 4 bytes a dimension.
  const dims = (e) => (Array.isArray(e) ? e.length : typeof e === "string" ? Math.floor((e.replace(/=+$/, "").length * 3) / 4 / 4) : 0);
  return { inputs, vectors: data.map((d) => dims(d.embedding)), base64 };
}

function embeddingsView(emb) {
  const n = emb.inputs.length;
  const out = emb.inputs.map((x, i) => h("div", { class: "msg role-input" },
    h("div", { class: "role" }, n > 1 ? `input ${i + 1} of ${n}` : "input"),
    typeof x === "string" ? textPart(x)
      : Array.isArray(x) && x.every((t) => typeof t === "number") ? textPart(`[${nf.format(x.length)} token ids] ${x.slice(0, 20).join(", ")}${x.length > 20 ? ", …" : ""}`)
        : h("pre", {}, pretty(x))));
  if (emb.vectors.length) {
    const lo = Math.min(...emb.vectors);
    const hi = Math.max(...emb.vectors);
    const dims = lo === hi ? nf.format(lo) : `${nf.format(lo)}–${nf.format(hi)}`;
    const count = emb.vectors.length;
    out.push(h("div", { class: "msg role-embedding" }, h("div", { class: "role" }, "embeddings"),
      h("div", { class: "text vectors" }, `${nf.format(count)} vector${count === 1 ? "" : "s"} of ${dims} dimension${dims === "1" ? "" : "s"}${emb.base64 ? " (base64)" : ""}`)));
  }
  return out;
}

/**
 * The request and its reply as messages; `where` says what the fallback may point at (the
 * drawer shows the raw bodies below it; the session page links to the request's details).
 */
function conversation(row, where = "drawer") {
  const req = row.request_body;
  const resp = row.response_body;
  const out = [];
  let kind = "conversation";
  try {
    const emb = embeddingsOf(row, req, resp);
    if (emb) {
      kind = "embeddings";
      out.push(...embeddingsView(emb));
    } else if (isGemini(row, req)) {
      geminiConversation(req, resp, out);
    } else if (req && typeof req === "object" && Array.isArray(req.messages) && (row.provider === "anthropic" || "system" in req && !req.messages.some((m) => m.role === "system") && row.path && row.path.includes("messages"))) {
      if (req.system) out.push(msg("system", ...(typeof req.system === "string" ? [textPart(req.system)] : anthropicBlocks(req.system))));
      for (const m of req.messages) out.push(msg(m.role, ...anthropicBlocks(m.content)));
      if (resp && typeof resp === "object" && Array.isArray(resp.content)) out.push(msg("assistant", ...anthropicBlocks(resp.content)));
    } else if (req && typeof req === "object" && Array.isArray(req.messages)) {
      for (const m of req.messages) {
        const parts = openaiContent(m.content);
        if (m.role === "tool") { out.push(msg("tool", toolResult(m.content, m.tool_call_id))); continue; }
        for (const c of m.tool_calls || []) parts.push(toolCall(c.function && c.function.name, c.function && c.function.arguments, c.id));
        out.push(msg(m.role, ...parts));
      }
      const choices = resp && typeof resp === "object" && Array.isArray(resp.choices) ? resp.choices : [];
      for (const ch of choices) {
        const m = ch.message || ch.delta || {};
        const parts = [];
        if (m.reasoning_content || m.reasoning) parts.push(reasoning(m.reasoning_content || m.reasoning));
        parts.push(...openaiContent(m.content));
        for (const c of m.tool_calls || []) parts.push(toolCall(c.function && c.function.name, c.function && c.function.arguments, c.id));
        out.push(msg(m.role || "assistant", ...parts));
      }
    } else if (req && typeof req === "object" && "input" in req) {
      if (req.instructions) out.push(msg("system", textPart(req.instructions)));
      const items = typeof req.input === "string" ? [{ role: "user", content: req.input }] : Array.isArray(req.input) ? req.input : [];
      for (const it of items) out.push(responsesItem(it));
      const output = resp && typeof resp === "object" && Array.isArray(resp.output) ? resp.output : [];
      for (const it of output) out.push(responsesItem(it));
    }
  } catch (e) {
    out.length = 0;
  }
  // A body cut at the size limit is no JSON any more: the turns it held are missing here.
  const cut = [["request_body", "request"], ["response_body", "response"]]
    .filter(([part]) => ((row.bodies || {})[part] || {}).truncated)
    .map(([part, name]) => h("p", { class: "muted cut" }, `The ${name} was cut: ${cutNote(row.bodies[part]).slice(5)} Its part of the conversation may be missing here; see the raw body.`));
  if (!out.length) {
    return h("div", {}, ...cut, h("p", { class: "muted" }, "Not a conversation this dashboard renders; ",
      where === "drawer" ? "see the raw bodies below." : h("a", { href: hashFor("requests", row.id, new URLSearchParams({ session_id: row.session_id || "", range: "all" })) }, "see its raw bodies")));
  }
  if (row.error) out.push(msg("error", textPart(row.error)));
  return h("div", { class: kind === "embeddings" ? "conversation embeddings" : "conversation" }, ...cut, out);
}

function responsesItem(it) {
  if (!it || typeof it !== "object") return msg("user", textPart(it));
  if (it.type === "function_call") return msg("assistant", toolCall(it.name, it.arguments, it.call_id));
  if (it.type === "function_call_output") return msg("tool", toolResult(it.output, it.call_id));
  if (it.type === "reasoning") return msg("assistant", reasoning((it.summary || []).map((s) => s.text).join("\n") || "(encrypted)"));
  return msg(it.role || it.type || "item", ...openaiContent(it.content));
}

// -- keyboard ------------------------------------------------------------------------------------

document.addEventListener("keydown", (ev) => {
  const t = ev.target;
  const typing = t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
  if (ev.key === "Escape") {
    if (typing) { t.blur(); return; }
    if (!drawer.hidden) { ev.preventDefault(); closeDrawer(); }
    return;
  }
  if (typing || ev.ctrlKey || ev.metaKey || ev.altKey || signin.open) return;
  if (ev.key === "/") {
    const first = document.querySelector("#filters input[name=q]") || document.querySelector("#filters input[name=model]") || document.querySelector("#filters input");
    if (first) { ev.preventDefault(); first.focus(); }
  } else if (ev.key === "j" || ev.key === "k") {
    const ids = [...document.querySelectorAll("#requests-table tr[data-id]")].map((tr) => tr.dataset.id);
    if (!ids.length) return;
    const { view, params } = drawerState || { view: parseHash().view, params: parseHash().params };
    const cur = drawerState ? ids.indexOf(drawerState.id) : -1;
    const next = ev.key === "j" ? Math.min(cur + 1, ids.length - 1) : Math.max(cur - 1, 0);
    if (next !== cur || !drawerState) { ev.preventDefault(); go(view, ids[next], params); }
  }
});

// -- overview ------------------------------------------------------------------------------------

function bucketFor(seconds) {
  if (seconds <= 6 * 3600) return "minute";
  if (seconds <= 14 * 86400) return "hour";
  return "day";
}
const BUCKET_SECS = { minute: 60, hour: 3600, day: 86400 };
// Day buckets a chart asks for at most (the API's limit is 10,000 buckets).
const MAX_DAYS = 9990;

// The gateway records a non-streamed request's time to first token as its whole latency, and the
// stats cannot be limited to streamed requests: the TTFT tile says what its percentiles cover.
const TTFT_NOTE = "all requests (non-streamed: their whole latency)";

/** "620 ms / 1.50 s", wrapping (in a narrow tile) between the two, never inside one. */
const pair = (a, b) => [h("span", { class: "nowrap" }, a), " / ", h("span", { class: "nowrap" }, b)];

function tile(label, value, sub, cls) {
  // A figure never breaks mid-number ("1,373,407,46" / "5"): it stays on one line, smaller when long.
  let vcls = "tvalue";
  if (typeof value === "string") {
    if (/^[-+$\d.,%]+$/.test(value)) vcls += " figure";
    if (value.length > 11) vcls += " long";
  }
  return h("div", { class: "tile " + (cls || "") }, h("div", { class: "tlabel" }, label), h("div", { class: vcls }, value), sub ? h("div", { class: "tsub" }, sub) : null);
}

/** An x-axis tick in 24-hour UTC, like every time on these pages: the hour, or the day at
 *  midnight and on spans of more than two days. */
function axisTime(ts, span) {
  const iso = new Date(ts * 1000).toISOString();
  if (span > 300 * 86400) return iso.slice(0, 7);  // months and years ("all time"): the year too
  return span > 2 * 86400 || iso.slice(11, 16) === "00:00" ? iso.slice(5, 10) : iso.slice(11, 16);
}

function chart(uPlot, el, title, unit, xs, series, opts = {}) {
  el.dataset.points = xs.length;  // for tests and curious readers: how many buckets are drawn
  const width = Math.max(240, el.clientWidth - 16);
  const fmt = opts.fmt || ((v) => (v === null ? "–" : nf.format(v)));
  const colors = ["#2f6fdf", "#d9534f", "#2a9d62", "#e69b00", "#7952b3"];
  const axis = getComputedStyle(document.documentElement).getPropertyValue("--muted").trim() || "#555";  // dark mode too
  const plot = new uPlot({
    title, width, height: 220,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),  // the axis in UTC, as every time here
    scales: { x: { time: true, range: opts.xRange && (() => opts.xRange) }, y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] } },
    axes: [
      { label: "time (UTC)", labelSize: 20, stroke: axis, values: (u, splits) => splits.map((ts) => axisTime(ts, u.scales.x.max - u.scales.x.min)) },
      { label: unit, labelSize: 22, size: 82, stroke: axis, values: (u, vals) => vals.map(opts.tick || fmt) },
    ],
    series: [{ label: "time", value: (u, ts) => (ts == null ? "–" : new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ")) }, ...series.map((s, i) => ({
      label: s.label, stroke: colors[i % colors.length], width: 2, spanGaps: false, dash: DASHES[i % DASHES.length],
      fill: opts.fill && i === 0 ? colors[0] + "22" : undefined,
      paths: opts.bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
      value: (u, v) => fmt(v),
    }))],
    legend: { live: true },
  }, [xs, ...series.map((s) => s.data)], el);
  onLeave(() => plot.destroy());
  // uPlot draws on a canvas, which says nothing to a screen reader: the chart is named, and its
  // numbers are one click away as a table (for anyone who wants the exact figures, too).
  plot.root.setAttribute("role", "img");
  plot.root.setAttribute("aria-label", `${title}: chart of ${series.map((s) => s.label).join(", ")} per bucket; the numbers are in the table below it`);
  const table = () => scroller(h("table", { class: "grid compact" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "bucket start (UTC)"), series.map((s) => h("th", { scope: "col", class: "num" }, s.label)))),
    h("tbody", {}, xs.map((ts, row) => h("tr", {}, h("th", { scope: "row", class: "nowrap" }, fmtTime(new Date(ts * 1000).toISOString())),
      series.map((s) => h("td", { class: "num" }, fmt(s.data[row] ?? null))))))));
  const details = h("details", { class: "chart-data" }, h("summary", {}, "Show the numbers"));
  // Built when opened: 30 days of hours are 720 rows a chart.
  details.addEventListener("toggle", () => { if (details.open && details.children.length === 1) details.append(table()); });
  el.append(details);
  return plot;
}
// Solid, dashed, dotted: p50 / p95 / p99 (and any two series) apart without their colours.
const DASHES = [undefined, [8, 4], [2, 3], [12, 3, 2, 3], [4, 4]];

async function viewOverview(id, params) {
  const defaultRange = "24h";
  const groupProp = params.get("group") || "";
  const groupInput = h("label", {}, "Group by property", h("input", { name: "group", value: groupProp, placeholder: "e.g. feature", size: 12, autocomplete: "off" }));
  const bar = filterBar(params, "overview", { defaultRange, extra: [groupInput] });
  renderPending("Overview", bar);
  let range = rangeOf(params, defaultRange);
  const allTime = (params.get("range") || defaultRange) === "all";
  if (allTime) {
    // All time starts at the oldest request the filters match: the list's first row, oldest
    // first (a walk of the time index that stops there, whatever the filters).
    const fq = apiFilters(params, defaultRange);
    fq.set("order", "asc"); fq.set("limit", "1");
    const oldest = (await api("api/v1/requests?" + fq)).items[0];
    const now = new Date();
    range = { since: oldest ? new Date(oldest.created_at) : new Date(now - 86400000), until: now };
  }
  // "All time" or a custom range reaching past what a chart can hold is charted to its end.
  let olderThanShown = null;
  if (range.until - range.since > MAX_DAYS * 86400000) {
    olderThanShown = range.since;
    range = { since: new Date(range.until - MAX_DAYS * 86400000), until: range.until };
  }
  const bucket = bucketFor((range.until - range.since) / 1000);
  // The range widens to whole (UTC) buckets: every bucket charted is complete at its start, and
  // bucket-aligned bounds let the store answer from its rollups (a few hundred rows instead of
  // every request of the range: at 1M requests, milliseconds instead of seconds).
  const step = BUCKET_SECS[bucket];
  const since = new Date(Math.floor(range.since.getTime() / 1000 / step) * step * 1000);
  const custom = (params.get("range") || defaultRange) === "custom";
  const until = custom ? new Date(Math.ceil(range.until.getTime() / 1000 / step) * step * 1000) : range.until;
  const q = apiFilters(params, defaultRange);
  q.set("since", since.toISOString());
  // A preset runs to now, its last bucket's end: the tiles count what the charts draw, and no
  // request stamped later (a gateway's clock hours ahead, an import dated 2999) is in them.
  q.set("until", custom ? until.toISOString() : new Date(Math.ceil(until.getTime() / 1000 / step) * step * 1000).toISOString());
  const withGroup = (g) => { const x = new URLSearchParams(q); x.set("group_by", g); return x; };
  // One call gives the totals, the time series and the top models.
  const bq = withGroup("model"); bq.set("bucket", bucket);
  // Top users come from the per-user day rollups, asked for beside the charts' data (both are
  // rollup reads). Users are rolled up per whole UTC day: over 3 days or more, the top users'
  // range starts at the day's start (the box says so), which the rollups answer (at 1M requests,
  // 7 days of raw rows took seconds); a shorter range reads its few raw rows.
  const usersQ = withGroup("user_id");
  let usersSince = since;
  if ((until.getTime() - since.getTime()) / 1000 >= 3 * 86400) {
    usersSince = new Date(Math.floor(since.getTime() / 86400e3) * 86400e3);
    usersQ.set("since", usersSince.toISOString());
  }
  const usersP = api("api/v1/stats?" + usersQ);
  usersP.catch(() => {});
  const [uPlot, series] = await Promise.all([loadUPlot(), api("api/v1/stats?" + bq)]);
  // A property not rolled up is answered from raw rows, which takes seconds at volume: asked
  // once the charts' data is in (running at the same time, a scan slowed the rollup read on a
  // busy machine), shown when it comes.
  const propsP = groupProp ? api("api/v1/stats?" + withGroup("property." + groupProp)) : null;
  if (propsP) propsP.catch(() => {});
  const o = series.overall;
  // Every bucket of the range, empty ones included, so the x axis is honest about gaps.
  const start = since.getTime() / 1000;
  const byStart = new Map(series.buckets.map((b) => [Math.floor(new Date(b.start).getTime() / 1000), b]));
  const xs = [];
  const end = until.getTime() / 1000;
  for (let t = start; t < end; t += step) xs.push(t);  // buckets starting before the range's end
  const xRange = [start, end];  // the axis ends where the range does, not at the last bucket's start
  const col = (f) => xs.map((t) => { const b = byStart.get(t); return b ? f(b) : null; });
  const zero = (f) => xs.map((t) => { const b = byStart.get(t); return b ? f(b) : 0; });
  const charts = h("div", { class: "charts" });
  const usersBox = pendingBox("Top users");
  const propsBox = propsP ? pendingBox(`Property “${groupProp}”`) : h("div", { class: "topbox" }, h("h2", {}, "Group by a property"), h("p", { class: "muted" }, "Type a property name in “Group by property” to break totals down by its values."));
  render(
    h("h1", {}, "Overview"),
    bar,
    h("p", { class: "hint muted", id: "overview-range" }, `${fmtTime(since.toISOString())} to ${custom ? fmtTime(until.toISOString()) : "now"} (UTC), in whole ${bucket}s`,
      series.source === "rollups" ? ` · from rollups (percentiles within ${Math.round(series.percentile_relative_error * 100)}%)` : "",
      olderThanShown ? (allTime ? ` · the oldest request, at ${fmtTime(olderThanShown.toISOString())}, is older than the ${fmtInt(MAX_DAYS)} days charted`
        : ` · the range asked for starts at ${fmtTime(olderThanShown.toISOString())}: a chart holds its last ${fmtInt(MAX_DAYS)} days`) : ""),
    h("div", { class: "tiles" },
      tile("Requests", fmtInt(o.count), o.count ? `${bucket} buckets` : "none yet in this range"),
      tile("Errors", fmtInt(o.error_count), o.error_count ? [pct(o.error_rate) + " of requests · ",
        h("a", { id: "list-errors", href: hashFor("requests", null, withParam(withParam(params, "group", null), "error", "true")) }, "list them")]
        : pct(o.error_rate) + " of requests", o.error_count ? "warn" : ""),
      tile("Cost", fmtUsd(o.cost_usd) ?? "$0", o.unpriced_count ? `+ ${fmtInt(o.unpriced_count)} unpriced` : o.count ? "all priced" : ""),
      tile("Unpriced requests", fmtInt(o.unpriced_count), "cost unknown: excluded from cost", o.unpriced_count ? "warn" : ""),
      tile("Tokens", fmtInt(o.total_tokens), `${fmtInt(o.prompt_tokens)} in · ${fmtInt(o.completion_tokens)} out`),
      tile("Latency p50 / p95", pair(fmtMs(o.latency_ms.p50), fmtMs(o.latency_ms.p95)), "p99 " + fmtMs(o.latency_ms.p99)),
      tile("TTFT p50 / p95", pair(fmtMs(o.time_to_first_token_ms.p50), fmtMs(o.time_to_first_token_ms.p95)), TTFT_NOTE)),
    charts,
    h("div", { class: "tops" }, topTable("Top models", "model", series.groups, params), usersBox, propsBox));
  const slot = (name) => { const el = h("div", { class: "chart", "data-chart": name }); charts.append(el); return el; };
  chart(uPlot, slot("requests"), "Requests and errors per " + bucket, "requests", xs,
    [{ label: "requests", data: zero((b) => b.count) }, { label: "errors", data: zero((b) => b.error_count) }], { xRange, bars: false, fill: true });
  chart(uPlot, slot("cost"), "Cost per " + bucket + " (priced requests)", "USD", xs,
    [{ label: "cost", data: zero((b) => b.cost_usd) }], { xRange, fmt: (v) => (v === null ? "–" : fmtUsd(v)), tick: (v) => (Math.abs(v) < 0.01 ? fmtUsd(v) : "$" + +v.toPrecision(3)), fill: true });
  chart(uPlot, slot("tokens"), "Tokens per " + bucket, "tokens", xs,
    [{ label: "input", data: zero((b) => b.prompt_tokens) }, { label: "output", data: zero((b) => b.completion_tokens) }],
    { xRange, tick: (v) => (v >= 1e6 ? v / 1e6 + "M" : v >= 1e3 ? v / 1e3 + "k" : String(v)) });
  const msFmt = (v) => (v === null ? "–" : Math.round(v) + " ms");
  chart(uPlot, slot("latency"), "Latency percentiles", "ms", xs,
    [{ label: "p50", data: col((b) => b.latency_ms.p50) }, { label: "p95", data: col((b) => b.latency_ms.p95) }, { label: "p99", data: col((b) => b.latency_ms.p99) }], { xRange, fmt: msFmt });
  chart(uPlot, slot("ttft"), "Time to first token percentiles", "ms", xs,
    [{ label: "p50", data: col((b) => b.time_to_first_token_ms.p50) }, { label: "p95", data: col((b) => b.time_to_first_token_ms.p95) }, { label: "p99", data: col((b) => b.time_to_first_token_ms.p99) }], { xRange, fmt: msFmt });
  let alive = true;
  onLeave(() => { alive = false; });
  const settle = (box, p, title, key, note) => p.then(
    (st) => { if (alive) box.replaceWith(topTable(title, key, st.groups, params, note)); },
    (e) => { if (alive && !(e instanceof ApiError && e.status === 401)) fill(box, h("h2", {}, title), h("p", { class: "err" }, e.message)); });
  await Promise.all([
    settle(usersBox, usersP, "Top users", "user_id", usersSince.getTime() !== since.getTime()
      ? `since ${fmtTimeUtc(usersSince.toISOString())} (whole UTC days)` : null),
    propsP ? settle(propsBox, propsP, `Property “${groupProp}”`, "property." + groupProp) : null,
  ]);
}

function pendingBox(title) {
  return h("div", { class: "topbox pending" }, h("h2", {}, title), h("p", { class: "muted" }, "Loading…"));
}

function topTable(title, key, groups, params, note) {
  const rows = groups.slice(0, 10);
  const total = rows.reduce((a, g) => Math.max(a, g.count), 0) || 1;
  return h("div", { class: "topbox", "data-top": key }, h("h2", {}, title),
    note ? h("p", { class: "hint muted topnote" }, note) : null,
    rows.length ? scroller(h("table", { class: "grid compact" },
      h("thead", {}, h("tr", {}, h("th", {}, key.startsWith("property.") ? "value" : key), h("th", { class: "num" }, "requests"), h("th", { class: "num" }, "cost"), h("th", { class: "num" }, "errors"))),
      h("tbody", {}, rows.map((g) => {
        const next = new URLSearchParams();
        for (const [k, v] of apiFiltersView(params)) next.set(k, v);
        if (g.key !== null) next.set(key, String(g.key));
        return h("tr", {},
          h("td", { class: "ellipsis" }, g.key === null ? h("span", { class: "muted" }, "(none)") : h("a", { href: hashFor("requests", null, next), title: String(g.key), dir: "auto" }, String(g.key)),
            h("div", { class: "bar", "data-w": Math.round((g.count / total) * 100) })),
          h("td", { class: "num" }, fmtInt(g.count)),
          h("td", { class: "num" }, groupCost(g)),
          h("td", { class: "num" }, pct(g.error_rate)));
      })))) : h("p", { class: "muted" }, "No data in this range."));
}

/** The view params that are filters (to carry from overview to requests). */
function apiFiltersView(params) {
  const out = new URLSearchParams();
  for (const [k, v] of params) if (FILTER_KEYS.includes(k) || k.startsWith("property.") || ["range", "since", "until"].includes(k)) out.set(k, v);
  return out;
}

// -- sessions ------------------------------------------------------------------------------------

async function viewSessions(id, params) {
  if (id) return viewSession(id, params);
  const defaultRange = "7d";
  const bar = filterBar(params, "sessions", { defaultRange });
  renderPending("Sessions", bar);
  const q = apiFilters(params, defaultRange);
  if (params.get("cursor")) q.set("cursor", params.get("cursor"));
  q.set("limit", "50");
  const page = await api("api/v1/sessions?" + q);
  const nav = h("div", { class: "pager" },
    params.get("cursor") ? h("a", { class: "button", href: hashFor("sessions", null, withParam(params, "cursor", null)) }, "⇤ Most recent") : null,
    page.next_cursor ? h("a", { class: "button", id: "next-page", href: hashFor("sessions", null, withParam(params, "cursor", page.next_cursor)) }, "Next page →") : null);
  render(
    h("h1", {}, "Sessions"),
    bar,
    page.items.length ? scroller(h("table", { class: "grid", id: "sessions-table" },
      h("thead", {}, h("tr", {}, ["Session", "First request (UTC)", "Last request (UTC)", "Requests", "Errors", "Tokens", "Cost"].map((t, i) => h("th", { class: i > 2 ? "num" : "" }, t)))),
      h("tbody", {}, page.items.map((g) => h("tr", { "data-session": g.session_id },
        h("td", { class: "ellipsis" }, h("a", { href: hashFor("sessions", g.session_id, null), title: g.session_id }, g.session_id)),
        h("td", { class: "nowrap" }, fmtTime(g.first_at)), h("td", { class: "nowrap" }, fmtTime(g.last_at)),
        h("td", { class: "num" }, fmtInt(g.count)), h("td", { class: "num" }, fmtInt(g.error_count)),
        h("td", { class: "num" }, fmtInt(g.total_tokens)),
        h("td", { class: "num" }, groupCost(g))))))) : h("p", { class: "empty" }, "No sessions in this range (send Llmtap-Session-Id to group requests)."),
    nav,
    h("p", { class: "hint muted" }, "Most recently active first; totals cover the session's requests in the range and filters."));
}

async function viewSession(id, params) {
  const s = await api("api/v1/sessions/" + encodeURIComponent(id));
  const t = s.totals;
  const timeline = h("ol", { class: "timeline" });
  render(
    h("p", {}, h("a", { href: "#/sessions" }, "← Sessions")),
    h("h1", {}, "Session ", h("code", {}, s.session_id)),
    h("div", { class: "tiles" },
      tile("Requests", fmtInt(t.count)), tile("Errors", fmtInt(t.error_count), pct(t.error_rate)),
      tile("Cost", fmtUsd(t.cost_usd) ?? "$0", t.unpriced_count ? `+ ${t.unpriced_count} unpriced` : ""),
      tile("Tokens", fmtInt(t.total_tokens)), tile("First", fmtTimeUtc(t.first_at)), tile("Last", fmtTimeUtc(t.last_at))),
    h("p", {}, h("a", { href: hashFor("requests", null, new URLSearchParams({ session_id: s.session_id, range: "all" })) }, "Show these requests in the table")),
    timeline);
  for (const r of s.requests) {
    timeline.append(h("li", { "data-id": r.id },
      h("div", { class: "tl-head" }, fmtTimeUtc(r.created_at), " · ", statusCell(r), " · ", h("bdi", {}, r.model || ""), " · ", costCell(r.cost_usd, r), " · ", fmtMs(r.latency_ms), " · ",
        h("a", { href: hashFor("requests", r.id, new URLSearchParams({ session_id: s.session_id, range: "all" })), "aria-label": `details of the request at ${fmtTimeUtc(r.created_at)}` }, "details")),
      h("div", { class: "tl-body muted" })));
  }
  // A long session loads its first turns by itself; every other entry says it is not loaded and
  // offers to load it (one, or the next batch), so no entry waits for a load never asked for.
  const load = turnLoader(timeline);
  const rest = h("p", { id: "load-more" });
  const offerRest = () => {
    const left = s.requests.filter((r) => !load.asked.has(r.id));
    if (!left.length) { rest.remove(); return; }
    fill(rest, h("button", { type: "button", onclick: () => { load.add(left.slice(0, SESSION_BATCH)); offerRest(); } },
      `Load the next ${Math.min(SESSION_BATCH, left.length)} conversations`), ` (${left.length} not loaded)`);
  };
  for (const r of s.requests.slice(SESSION_BATCH)) {
    const button = h("button", { type: "button", class: "load-turn", onclick: () => { load.add([r]); offerRest(); } }, "Load");
    fill(bodyOf(timeline, r.id), "Conversation not loaded. ", button);
  }
  load.add(s.requests.slice(0, SESSION_BATCH));
  timeline.after(rest);
  offerRest();
}

const SESSION_BATCH = 100;
const bodyOf = (timeline, id) => timeline.querySelector(`li[data-id="${CSS.escape(id)}"] .tl-body`);

/** Loads the turn each request added (its last input message and the reply), 4 bodies at a time. */
function turnLoader(timeline) {
  const queue = [];
  const asked = new Set();
  let running = 0;
  let alive = true;
  onLeave(() => { alive = false; });
  const loadOne = async (r) => {
    const li = bodyOf(timeline, r.id);
    try {
      const full = await api("api/v1/requests/" + encodeURIComponent(r.id));
      const conv = conversation(full, "session");
      const msgs = [...conv.querySelectorAll(":scope > .msg")];
      let start = msgs.length - 1;
      while (start > 0 && msgs[start].classList.contains("role-assistant")) start -= 1;
      // An embeddings call is its inputs and vectors: all of it.
      const turn = conv.classList.contains("embeddings") ? msgs : msgs.slice(Math.max(0, start));
      clear(li).classList.remove("muted");
      append(li, turn.length ? [...conv.querySelectorAll(":scope > .cut"), ...turn] : [conv]);
    } catch (e) {
      asked.delete(r.id);
      fill(li, "Conversation not loaded: " + e.message + " ",
        h("button", { type: "button", class: "load-turn", onclick: () => add([r]) }, "Retry"));
    }
  };
  const pump = () => {
    while (alive && running < 4 && queue.length) {
      running += 1;
      loadOne(queue.shift()).finally(() => { running -= 1; pump(); });
    }
  };
  const add = (rows) => {
    for (const r of rows) {
      if (asked.has(r.id)) continue;
      asked.add(r.id);
      fill(bodyOf(timeline, r.id), "Loading conversation…");
      queue.push(r);
    }
    pump();
  };
  return { add, asked };
}

// -- users ---------------------------------------------------------------------------------------

async function viewUsers(id, params) {
  renderPending("Users");
  const q = new URLSearchParams({ limit: params.get("limit") || "500" });
  const byCost = params.get("sort") === "cost";
  if (byCost) q.set("sort", "cost");
  if (params.get("cursor")) q.set("cursor", params.get("cursor"));
  const res = await api("api/v1/users?" + q);
  // Cost and last seen sort (largest first); a new sort starts at its first page.
  const th = (label, i, key) => {
    const cls = i && i < 5 ? "num" : "";
    if (!key) return h("th", { class: cls }, label);
    const active = (key === "cost") === byCost;
    const href = hashFor("users", null, withParam(withParam(params, "sort", key === "cost" ? "cost" : null), "cursor", null));
    return h("th", { class: cls, "aria-sort": active ? "descending" : null },
      h("a", { href, class: active ? "sorted" : "", "data-sort": key, title: key === "cost" ? "highest cost first" : "most recently active first" },
        label, active ? " ▼" : ""));
  };
  const nav = h("div", { class: "pager" },
    params.get("cursor") ? h("a", { class: "button", href: hashFor("users", null, withParam(params, "cursor", null)) }, byCost ? "⇤ Highest cost" : "⇤ Most recent") : null,
    res.next_cursor ? h("a", { class: "button", id: "next-page", href: hashFor("users", null, withParam(params, "cursor", res.next_cursor)) }, "Next page →") : null);
  announce(res.items.length ? `${res.items.length} users shown${res.next_cursor ? ", more on the next page" : ""}` : "no users");
  render(
    h("h1", {}, "Users"),
    res.items.length ? scroller(h("table", { class: "grid", id: "users-table" },
      h("thead", {}, h("tr", {}, [["User"], ["Requests"], ["Cost", "cost"], ["Tokens"], ["Error rate"], ["First seen (UTC)"], ["Last seen (UTC)", "time"]].map(([t, key], i) => th(t, i, key)))),
      h("tbody", {}, res.items.map((u) => {
        const tr = h("tr", { "data-user": u.user_id },
          h("td", { class: "ellipsis" }, h("a", { href: hashFor("requests", null, new URLSearchParams({ user_id: u.user_id, range: "all" })), title: u.user_id }, u.user_id)),
          h("td", { class: "num" }, fmtInt(u.count)),
          h("td", { class: "num" }, groupCost(u)),
          h("td", { class: "num" }, fmtInt(u.total_tokens)),
          h("td", { class: "num" }, pct(u.error_rate)),
          h("td", { class: "nowrap" }, fmtTime(u.first_at)),
          h("td", { class: "nowrap" }, fmtTime(u.last_at)));
        tr.addEventListener("click", (ev) => { if (!ev.target.closest("a")) go("requests", null, new URLSearchParams({ user_id: u.user_id, range: "all" })); });
        return tr;
      })))) : h("p", { class: "empty" }, "No users yet (send Llmtap-User-Id with requests)."),
    nav,
    h("p", { class: "hint muted" }, byCost
      ? "Highest cost first (unpriced requests count as $0), a page at a time; click a user to see their requests."
      : "Most recently active first, a page at a time; click Cost to see who costs most, a user to see their requests."));
}

// -- live tail -----------------------------------------------------------------------------------

async function viewLive(id, params) {
  const q = apiFilters(params, "all", { search: true });
  q.delete("since");
  let paused = params.get("paused") === "1";
  let count = 0;
  const propCols = requestColumns(params);
  const tbody = h("tbody", {});
  const status = h("span", { class: "live-status", id: "live-status", role: "status" }, "connecting…");
  const pauseBtn = h("button", { type: "button", id: "pause" }, paused ? "Resume" : "Pause");
  const held = [];
  const seen = new Set(); // ids shown or held: a catch-up after a break repeats none
  let trouble = null; // why the tail is not live (it says so, in place of "live"), or null
  const showStatus = (text) => {
    if (text !== undefined) trouble = text;
    status.textContent = trouble || (paused ? `paused (${held.length} waiting)` : "live");
    status.classList.toggle("down", !!trouble);
  };
  pauseBtn.addEventListener("click", () => {
    paused = !paused;
    pauseBtn.textContent = paused ? "Resume" : "Pause";
    if (!paused) { for (const r of held.splice(0)) show(r); }
    showStatus();
  });
  const show = (row) => {
    count += 1;
    tbody.prepend(requestRow(row, params, propCols, "live"));
    while (tbody.children.length > 500) tbody.lastChild.remove();
    countEl.textContent = `${count} new since opened`;
  };
  const receive = (row) => {
    if (seen.has(row.id)) return;
    seen.add(row.id);
    if (paused) { held.push(row); showStatus(); } else show(row);
  };
  const countEl = h("span", { class: "muted" }, "0 new since opened");
  render(
    h("h1", {}, "Live tail"),
    filterBar(params, "live", { defaultRange: "all", search: true }),
    h("div", { class: "pager" }, pauseBtn, status, countEl),
    scroller(h("table", { class: "grid", id: "requests-table" },
      h("thead", {}, h("tr", {}, ["Time (UTC)", "Status", "Provider", "Model", "User", "Session", "Tokens in", "Tokens out", "Cost", "Latency", "TTFT", "Streamed", ...propCols]
        .map((t, i) => h("th", { class: i >= 6 && i <= 10 ? "num" : "" }, t)))),  // numbers right, as in the table
      tbody)),
    h("p", { class: "hint muted" }, "Requests appear here as soon as they are stored, newest on top, filtered like the table (the body search included)."));
  const ctrl = new AbortController();
  onLeave(() => ctrl.abort());
  tail(q, ctrl.signal, { receive, showStatus });
  if (id) await openDrawer(id, params, "live");
}

const TAIL_SILENCE = 40000; // ms: the server pings an idle stream every 15 s; longer is a dead link
const TAIL_MAX_BACKOFF = 8000;

/**
 * Reads the live tail's stream until `signal` aborts, reconnecting for ever. Whatever cuts it
 * off (the server stopped or unreachable, an error status, a refused key, a link gone silent)
 * is said in the status in place of "live", with when it tries again; once back, the requests
 * stored in the break are caught up from the list (the stream sends only what comes after it
 * opened). Times for the catch-up are the server's: its `ready` event says when it opened.
 */
async function tail(q, signal, { receive, showStatus }) {
  let backoff = 1000;
  let refused = false; // the last answer was a 401: the sign-in dialog was shown for it
  let firstOpen = null; // the server's time when the tail first opened
  let lastWord = null; // the server's time of the last word from the stream
  let storeDown = false;
  while (!signal.aborted) {
    const attempt = new AbortController();
    const stop = () => attempt.abort(new Error("left"));
    signal.addEventListener("abort", stop);
    let silence;
    const heard = () => {
      clearTimeout(silence);
      silence = setTimeout(() => attempt.abort(new Error(`no word from the server for ${TAIL_SILENCE / 1000} s`)), TAIL_SILENCE);
    };
    let why;
    try {
      heard();
      const used = sessionStorage.getItem(KEY);
      const resp = await fetch("api/v1/requests/stream?" + q, { headers: authHeaders(), signal: attempt.signal });
      if (resp.status === 401) {
        if (!refused) askKey(undefined, used);
        refused = true;
        throw new Error("sign-in required: the server refused the key");
      }
      if (!resp.ok) {
        const body = await resp.json().catch(() => null);
        throw new Error(`the server answered ${resp.status}` + (body && body.error && body.error.message ? ": " + body.error.message : ""));
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      let opened = null; // [server time, this browser's time] at the stream's ready
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        heard();
        if (opened) lastWord = opened[0] + (Date.now() - opened[1]);
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let event = "message";
          let data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (event === "ready") {
            const at = Date.parse((JSON.parse(data || "{}") || {}).opened_at);
            opened = [Number.isNaN(at) ? Date.now() : at, Date.now()];
            firstOpen ??= opened[0];
            backoff = 1000;
            refused = false;
            if (lastWord !== null) await catchUp(q, Math.max(firstOpen, lastWord - 60000), receive);
            lastWord = opened[0];
            showStatus(null);
          } else if (event === "unavailable") {
            storeDown = true;
            showStatus("store unavailable, retrying…");
          } else {
            if (storeDown) { storeDown = false; showStatus(null); } // a ping or a request: the store answers again
            if (event === "request") receive(JSON.parse(data));
          }
        }
      }
      why = null; // ended by the server (its hourly bound, a restart): open the next one
    } catch (e) {
      if (signal.aborted) return;
      why = attempt.signal.aborted && attempt.signal.reason ? attempt.signal.reason.message
        : e instanceof TypeError ? "the server cannot be reached" : e.message;
    } finally {
      clearTimeout(silence);
      signal.removeEventListener("abort", stop);
    }
    if (signal.aborted) return;
    if (why === null) showStatus("reconnecting…");
    else showStatus(`disconnected (${why}): retrying in ${Math.round(backoff / 1000)} s…`);
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, TAIL_MAX_BACKOFF);
  }
}

/** The requests stored since `since` (server time, ms) matching the tail's filters, oldest first. */
async function catchUp(q, since, receive) {
  const lq = new URLSearchParams(q);
  lq.set("since", new Date(since).toISOString());
  lq.set("limit", "500");
  try {
    const page = await api("api/v1/requests?" + lq);
    for (const row of page.items.reverse()) receive(row);
  } catch (e) { /* the stream goes on; what was missed is in the table */ }
}

// -- pipeline health -----------------------------------------------------------------------------

async function viewPipeline() {
  renderPending("Pipeline health");
  const p = await api("api/v1/pipeline");
  const replay = async (body) => {
    try {
      const r = await api("api/v1/pipeline/dead-letters/replay", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      banner.hidden = false;
      banner.textContent = `Replayed ${r.replayed} dead letter(s).`;
      setTimeout(route, 800);
    } catch (e) { showError(e); }
  };
  const dl = p.dead_letters;
  // Replay all asks first: it sends every dead letter back through the handlers at once.
  const replayAll = h("button", { type: "button", id: "replay-all" }, "Replay all");
  const yes = h("button", { type: "button", id: "replay-all-yes", onclick: () => replay({ all: true }) }, `Replay ${fmtInt(p.dead_letter_count)}`);
  const no = h("button", { type: "button", id: "replay-all-no" }, "Cancel");
  const ask = h("span", { id: "replay-all-confirm", role: "group", "aria-label": "Confirm replay all" },
    `Send all ${fmtInt(p.dead_letter_count)} dead letter(s) back to the queue? `, yes, " ", no);
  ask.hidden = true;
  replayAll.addEventListener("click", () => { replayAll.hidden = true; ask.hidden = false; yes.focus(); });
  no.addEventListener("click", () => { ask.hidden = true; replayAll.hidden = false; replayAll.focus(); });
  render(
    h("h1", {}, "Pipeline health"),
    h("div", { class: "tiles" },
      tile("Queue", p.reachable ? "reachable" : "UNREACHABLE", p.queue || "", p.reachable ? "" : "warn"),
      tile("Queue lag", p.lag === null || p.lag === undefined ? "–" : fmtInt(p.lag), "records published, not yet stored", p.lag ? "warn" : ""),
      tile("Dead letters", fmtInt(p.dead_letter_count), "records that failed processing", p.dead_letter_count ? "warn" : ""),
      tile("Spool", fmtBytes(p.spool_bytes), "waiting on this host's disk for the queue", p.spool_bytes ? "warn" : ""),
      p.ingest && p.ingest.error ? tile("Ingest", "CLOSED", "ingest.db cannot be opened (gateways spool): " + p.ingest.error, "warn")
        : p.ingest && (p.ingest.lag || p.ingest.dead_letters) ? tile("Ingest backlog", fmtInt(p.ingest.lag),
          `posted by gateways whose queue was down, not yet stored; ${fmtInt(p.ingest.dead_letters)} dead letter(s) (llmtap dlq on ingest.db)`,
          "warn") : null,
      tile("Newest stored request", p.last_request_at ? fmtTimeUtc(p.last_request_at) : "none", p.last_request_ended_at ? "ended " + fmtTimeUtc(p.last_request_ended_at) : "")),
    p.error ? h("p", { class: "err" }, p.error) : null,
    h("h2", {}, "Lag per partition"),
    p.partitions && p.partitions.length ? scroller(h("table", { class: "grid compact", id: "partitions" },
      h("thead", {}, h("tr", {}, h("th", {}, "Partition"), h("th", { class: "num" }, "Lag"), h("th", {}, "Owner"))),
      h("tbody", {}, p.partitions.map((x) => h("tr", {}, h("td", {}, String(x.partition)), h("td", { class: "num" }, fmtInt(x.lag)), h("td", {}, x.owner || "–")))))) : h("p", { class: "muted" }, "No partitions reported."),
    h("h2", {}, "Dead letters"),
    dl === null ? h("p", { class: "muted" }, "Dead letters hold every tenant's records: in multi-tenant mode list and replay them with `llmtap dlq`.")
      : dl.length ? [
        h("p", {}, replayAll, ask),
        scroller(h("table", { class: "grid", id: "dead-letters" },
          h("thead", {}, h("tr", {}, ["Id", "Request", "Partition", "Offset", "Key", "Failed at (UTC)", "Reason", "Action"].map((t) => h("th", {}, t)))),
          h("tbody", {}, dl.map((d) => h("tr", {},
            h("td", { class: "ellipsis" }, capped(d.id)), h("td", { class: "ellipsis wide request" }, capped(d.request_id || "–")),
            h("td", {}, String(d.partition)), h("td", {}, String(d.offset)), h("td", { class: "ellipsis" }, capped(d.key)),
            h("td", { class: "nowrap" }, fmtTime(d.failed_at)), h("td", { class: "reason" }, d.reason),
            h("td", {}, h("button", { type: "button", class: "replay", "aria-label": `Replay dead letter ${d.id}`, onclick: () => replay({ ids: [d.id] }) }, "Replay")))))))]
        : h("p", { class: "muted" }, "No dead letters."));
}

// -- start ---------------------------------------------------------------------------------------

// The header wraps to more rows on a narrow screen or with the sign-out button: the drawer starts
// under it, wherever its bottom is (set through CSSOM, as the bars below).
const header = document.querySelector("header.top");
new ResizeObserver(() => document.documentElement.style.setProperty("--top-h", header.offsetHeight + "px")).observe(header);

// Bars of the top tables: widths set through CSSOM (style attributes would need 'unsafe-inline').
new MutationObserver(() => {
  for (const el of document.querySelectorAll(".bar[data-w]")) { el.style.width = el.dataset.w + "%"; el.removeAttribute("data-w"); }
}).observe(main, { childList: true, subtree: true });

// Past the header and the filters: to the first request of the table, else the view's heading.
document.getElementById("skip").addEventListener("click", () => {
  const first = main.querySelector("#requests-table a.open, #sessions-table a, #users-table a");
  if (first) first.focus(); else refocus(null);
});

updateAuth();
route();
