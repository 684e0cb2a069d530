// tuneforge dashboard. Plain ES modules, no build step, no dependencies: everything it shows comes
// from the server's public HTTP API (the same one the openai SDK uses), authenticated with the key
// kept in localStorage.

const KEY_STORAGE = "tuneforge.apiKey";
const CHAT_STORAGE = "tuneforge.playground";  // the Playground's conversation, kept for the tab (sessionStorage)
const FINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 1500;
const PALETTE = { train: "#4f46e5", valid: "#e8590c", trainAcc: "#0d9488", validAcc: "#c2255c", prompt: "#94a3d8", completion: "#4f46e5" };

// ------------------------------------------------------------------------------------------ helpers

/** Build a DOM element: h("a", {href: "#"}, "text", child). Strings are text, never HTML. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Round tick values between lo and hi: steps of 1, 2 or 5 times a power of ten. */
function niceTicks(lo, hi, n, integer = false) {
  const raw = (hi - lo) / Math.max(n, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((k) => k * mag).find((st) => st >= raw) || 10 * mag;
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

/** Replace an element's children; null/false children are skipped (replaceChildren would print "null"). */
function put(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

/** SVG element with attributes. */
function s(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, v);
  for (const c of children) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

const fmt = {
  int: (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US")),
  num: (n, d = 3) => (n === null || n === undefined || Number.isNaN(n) ? "—" : Number(n).toFixed(d)),
  pct: (n) => (n === null || n === undefined ? "—" : `${(n * 100).toFixed(1)}%`),
  usd: (n) => (n === null || n === undefined ? "—" : n >= 0.01 ? `$${n.toFixed(2)}` : `$${n.toFixed(4)}`),
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
  },
  duration(sec) {
    if (sec === null || sec === undefined) return "—";
    sec = Math.round(sec);
    const hrs = Math.floor(sec / 3600), min = Math.floor((sec % 3600) / 60), rest = sec % 60;
    if (hrs) return `${hrs}h ${min}m`;
    if (min) return `${min}m ${rest}s`;
    return `${rest}s`;
  },
  time(ts) {
    if (!ts) return "—";
    const d = new Date(ts * 1000);
    return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  },
  clock(ts) {
    if (!ts) return "";
    return new Date(ts * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  },
  ago(ts) {
    if (!ts) return "—";
    const sec = Date.now() / 1000 - ts;
    if (sec < 45) return "just now";
    if (sec < 3600) return `${Math.round(sec / 60)} min ago`;
    if (sec < 86400) return `${Math.round(sec / 3600)} h ago`;
    return fmt.time(ts);
  },
};

function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status.replace("_", " "));
}

function toast(message, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.className = bad ? "toast bad" : "toast";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 3200);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = h("textarea", { style: "position:fixed;opacity:0" }, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast("Copied to clipboard");
}

function copyButton(text, label = "Copy") {
  return h("button", { type: "button", class: "btn small", onclick: () => copyText(typeof text === "function" ? text() : text) }, label);
}

// ---------------------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

const auth = {
  get key() { return localStorage.getItem(KEY_STORAGE) || ""; },
  set key(v) { v ? localStorage.setItem(KEY_STORAGE, v) : localStorage.removeItem(KEY_STORAGE); },
  rejected: false,
};

async function request(path, { method = "GET", json, form, signal, key } = {}) {
  const headers = { Authorization: `Bearer ${key ?? auth.key}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form) body = form;
  let res;
  try {
    res = await fetch(path, { method, headers, body, signal });
  } catch (err) {
    if (err.name === "AbortError" || (signal && signal.aborted)) throw err;  // (aborted with a reason: the reason)
    throw new ApiError(0, { error: { message: "Cannot reach the tuneforge server. Is `tuneforge serve` running?", code: "network_error" } });
  }
  return res;
}

/** Call the API and return its JSON; a 401 marks the key as rejected (the UI says so). */
async function api(path, opts = {}) {
  const res = await request(path, opts);
  let body = null;
  const text = await res.text();
  try { body = text ? JSON.parse(text) : null; } catch { body = { error: { message: text.slice(0, 300) } }; }
  if (res.status === 401 && opts.key === undefined) keyRejected(body);
  if (!res.ok) throw new ApiError(res.status, body);
  if (opts.key === undefined && auth.rejected) keyAccepted();
  return body;
}

/** Every page of a list endpoint that pages with `after` (files, jobs, events, checkpoints). */
async function listAll(path, { limit = 100, max = 2000 } = {}) {
  const out = [];
  let after = null;
  const sep = path.includes("?") ? "&" : "?";
  for (;;) {
    const page = await api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length || out.length >= max) return out;
    after = page.data[page.data.length - 1].id;
  }
}

// ---------------------------------------------------------------------------------------- API key

function keyHint(key) {
  return key.length > 12 ? `${key.slice(0, 6)}…${key.slice(-4)}` : key;
}

function renderKeyButton() {
  const dot = document.getElementById("key-dot");
  const label = document.getElementById("key-label");
  if (!auth.key) { dot.className = "dot"; label.textContent = "Set API key"; return; }
  dot.className = auth.rejected ? "dot bad" : "dot ok";
  label.textContent = auth.rejected ? "Key rejected" : keyHint(auth.key);
}

function showBanner(message, action) {
  const el = document.getElementById("banner");
  put(el, message, action || "");
  el.hidden = false;
}

function hideBanner() { document.getElementById("banner").hidden = true; }

function keyRejected(body) {
  const why = body && body.error && body.error.message ? ` (${body.error.message})` : "";
  if (!auth.rejected) {
    auth.rejected = true;
    renderKeyButton();
    showBanner(`The server rejected your API key${why}.`,
      h("button", { type: "button", class: "btn small", onclick: () => openKeyDialog() }, "Enter another key"));
    openKeyDialog("This API key was rejected by the server (wrong, revoked or from another install).");
  }
}

function keyAccepted() {
  auth.rejected = false;
  renderKeyButton();
  hideBanner();
}

function openKeyDialog(error) {
  const dlg = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const err = document.getElementById("key-error");
  input.value = auth.rejected ? "" : auth.key;
  err.hidden = !error;
  err.textContent = error || "";
  if (!dlg.open) dlg.showModal();
  input.focus();
}

function setupKeyDialog() {
  const dlg = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const err = document.getElementById("key-error");
  const save = document.getElementById("key-save");
  document.getElementById("key-button").addEventListener("click", () => openKeyDialog());
  document.getElementById("key-forget").addEventListener("click", () => {
    auth.key = "";
    auth.rejected = false;
    input.value = "";
    renderKeyButton();
    hideBanner();
    err.hidden = true;
    route();  // nothing of the project stays on screen behind the dialog
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) {  // (a wrong key's message must not stay up as if it were about this)
      err.textContent = "Paste an API key: tuneforge serve prints one on a fresh install, tuneforge keys create makes another.";
      err.hidden = false;
      return;
    }
    save.disabled = true;
    err.hidden = true;
    try {
      const res = await request("/v1/models", { key });
      if (res.status === 401) {
        const body = await res.json().catch(() => null);
        err.textContent = `Wrong API key: the server rejected it${body && body.error ? ` — ${body.error.message.replace(/\.+$/, "")}` : ""}.`;
        err.hidden = false;
        return;
      }
      if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
      auth.key = key;
      keyAccepted();
      dlg.close();
      toast("API key saved in this browser");
      route();
    } catch (e) {
      err.textContent = e.message;
      err.hidden = false;
    } finally {
      save.disabled = false;
    }
  });
  dlg.addEventListener("cancel", (ev) => { if (!auth.key) ev.preventDefault(); });
}

// ------------------------------------------------------------------------------------------- chart

/**
 * A line chart drawn as SVG: series = [{name, color, points: [[x, y], ...], dots}].
 * Redrawn from scratch on each update (a few hundred points at most).
 */
function lineChart({ title, series, yFormat = (v) => v.toFixed(2), yMin, yMax, xLabel = "step", width = 520,
                    empty = "Waiting for the first training step…" }) {
  // The viewBox is the drawn size in CSS pixels, so labels keep their size on any window.
  const W = Math.max(240, Math.round(width)), H = W < 420 ? 200 : 240, m = { l: 46, r: 14, t: 12, b: 30 };
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, style: `height:${H}px` });
  const pts = series.flatMap((sr) => sr.points);
  const wrap = h("div", { class: "chart", "data-points": pts.length, "data-chart": title });
  wrap.append(svg);
  if (!pts.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-chart" }, empty));
    return wrap;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = yMin ?? Math.min(...pts.map((p) => p[1])), y1 = yMax ?? Math.max(...pts.map((p) => p[1]));
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.06;
  if (yMin === undefined) y0 -= pad;
  if (yMax === undefined) y1 += pad;
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
  yGrid(svg, niceTicks(y0, y1, 4), Y, W, m, yFormat);
  for (const v of niceTicks(x0, x1, W < 420 ? 4 : 6, true)) {
    svg.append(s("text", { x: X(v), y: H - m.b + 16, "text-anchor": "middle" }, fmt.int(v)));  // steps, counted as elsewhere
  }
  svg.append(s("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
  svg.append(s("text", { x: W - m.r, y: H - 2, "text-anchor": "end" }, xLabel));
  for (const sr of series) {
    if (!sr.points.length) continue;
    const d = sr.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    svg.append(s("path", { d, class: "series", stroke: sr.color, "vector-effect": "non-scaling-stroke", "data-series": sr.name }));
    if (sr.dots || sr.points.length === 1) {
      for (const p of sr.points) svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: sr.color }));
    }
  }
  wrap.append(legend(series.filter((sr) => sr.points.length)));
  return wrap;
}

/** Horizontal grid lines at `ticks`, labelled on the left. */
function yGrid(svg, ticks, Y, W, m, format) {
  for (const v of ticks) {
    svg.append(s("line", { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), class: "grid-line" }));
    svg.append(s("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }, format(v)));
  }
}

/** A chart's legend: a coloured mark and a name for each of `items` ({name, color}). */
function legend(items) {
  return h("div", { class: "legend" }, items.map((it) => h("span", {}, h("i", { style: `background:${it.color}` }), it.name)));
}

/**
 * Served tokens per hour or day as stacked SVG bars (prompt below, completion above), one bar per
 * bucket of monitor.usage.timeline; each bar's tooltip gives its requests, tokens and errors.
 */
function usageChart({ buckets, bucketSeconds, width = 520 }) {
  const W = Math.max(240, Math.round(width)), H = 180, m = { l: 52, r: 10, t: 10, b: 26 };
  const title = `tokens per ${bucketSeconds < 86400 ? "hour" : "day"}`;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, style: `height:${H}px` });
  const wrap = h("div", { class: "chart", "data-test": "usage-chart", "data-bars": buckets.length }, svg);
  const top = Math.max(1, ...buckets.map((b) => b.prompt_tokens + b.completion_tokens));
  const ticks = niceTicks(0, top, 3, true);
  const step = ticks.length > 1 ? ticks[1] - ticks[0] : top;
  while (ticks[ticks.length - 1] < top) ticks.push(ticks[ticks.length - 1] + step);  // the tallest bar under a labelled line
  const y1 = ticks[ticks.length - 1];
  const Y = (v) => H - m.b - (v / y1) * (H - m.t - m.b);
  yGrid(svg, ticks, Y, W, m, fmt.int);
  const slot = (W - m.l - m.r) / Math.max(1, buckets.length), bw = Math.max(1, Math.min(slot * 0.7, 48));
  const label = (t) => {
    const d = new Date(t * 1000);
    return bucketSeconds < 86400 ? d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleDateString(undefined, { month: "short", day: "numeric" });
  };
  const every = Math.max(1, Math.ceil(buckets.length / Math.floor((W - m.l - m.r) / 70)));
  buckets.forEach((b, i) => {
    const x = m.l + i * slot + (slot - bw) / 2;
    const g = s("g", { "data-start": b.start, "data-tokens": b.prompt_tokens + b.completion_tokens },
      s("title", {}, `${label(b.start)}: ${fmt.int(b.requests)} requests, ${fmt.int(b.prompt_tokens)} prompt + `
        + `${fmt.int(b.completion_tokens)} completion tokens, ${fmt.int(b.errors)} errors`));
    if (b.prompt_tokens) g.append(s("rect", { x, width: bw, y: Y(b.prompt_tokens), height: Y(0) - Y(b.prompt_tokens), fill: PALETTE.prompt }));
    if (b.completion_tokens) {
      const y = Y(b.prompt_tokens + b.completion_tokens);
      g.append(s("rect", { x, width: bw, y, height: Y(b.prompt_tokens) - y, fill: PALETTE.completion }));
    }
    svg.append(g);
    if (i % every === 0) svg.append(s("text", { x: x + bw / 2, y: H - m.b + 16, "text-anchor": "middle" }, label(b.start)));
  });
  svg.append(s("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
  wrap.append(legend([{ name: "prompt tokens", color: PALETTE.prompt }, { name: "completion tokens", color: PALETTE.completion }]));
  return wrap;
}

// ----------------------------------------------------------------------------------------- shared

let catalogueCache = null;

/** Base models the server can train (tuneforge's /v1/tuneforge/base_models, else /v1/models). */
async function baseModels() {
  if (catalogueCache) return catalogueCache;
  try {
    const res = await api("/v1/tuneforge/base_models");
    catalogueCache = res.data;
  } catch (e) {
    if (e.status === 401) throw e;
    const res = await api("/v1/models");
    catalogueCache = res.data.filter((m) => !m.id.startsWith("ft:")).map((m) => ({ id: m.id, methods: ["lora", "full"] }));
  }
  return catalogueCache;
}

/** Fine-tuned models (with job, base, size on disk) and every checkpoint that can be chatted with. */
async function tunedModels() {
  try {
    const res = await api("/v1/tuneforge/models");
    return { models: res.data, checkpoints: res.checkpoints || [] };
  } catch (e) {
    if (e.status === 401) throw e;
    const res = await api("/v1/models");  // a plain OpenAI-compatible server: names only
    const models = res.data.filter((m) => m.id.startsWith("ft:") && !m.id.includes(":ckpt-step-"))
      .map((m) => ({ id: m.id, created: m.created, base: m.id.split(":")[1], job_id: null, size_bytes: null, checkpoints: [] }));
    return { models, checkpoints: [] };
  }
}

/** An error as a card. `missing` ({name, href, list}) is what the page's address names: when the server
 * has none (404) the card names it and links to its list, where a bare "Not found" was a dead end. */
function errorCard(err, missing) {
  const heading = { 400: "The request was refused", 401: "API key needed", 404: "Not found", 413: "File too large" }[err.status]
    || "Something went wrong";
  const lost = err.status === 404 && missing;
  return h("div", { class: "card", "data-test": lost ? "not-found" : null }, h("div", { class: "callout bad" }, h("div", {},
    h("strong", {}, lost ? `${missing.name} not found` : heading), err.status === 413 ? tooLarge(err) : err.message,
    lost ? [" ", h("a", { href: missing.href }, missing.list)] : null)));
}

/** A 413's message: the server's, which names its limit in bytes (said in MB too), or, from a proxy before
 * it (an HTML page, no JSON error), what it means. */
function tooLarge(err) {
  if (err.code !== "file_too_large") return "The server (or a proxy in front of it) refused the file as too large.";
  return err.message.replace(/([\d,]+) bytes/, (said, n) => `${said} (${fmt.bytes(Number(n.replace(/,/g, "")))})`);
}

function pageHead(title, sub, ...actions) {
  return h("div", { class: "page-head" },
    h("div", {}, h("h1", {}, title), sub ? h("div", { class: "sub muted" }, sub) : null),
    actions.length ? h("div", { class: "row" }, actions) : null);
}

// ------------------------------------------------------------------------------- Fine-tuning jobs

async function viewJobs(root) {
  root.append(pageHead("Fine-tuning jobs", "Train a base model on your examples; jobs run in the server's workers.",
    h("a", { class: "btn primary", href: "#/jobs/new", "data-test": "create-job" }, "+ Create")));
  const card = h("div", { class: "card flush" }, h("div", { class: "empty" }, h("span", { class: "spinner" }), " Loading jobs…"));
  root.append(card);
  let timer = null;
  let stopped = false;  // (a poll answered after the page was left must not start another)
  const load = async () => {
    try {
      const jobs = await listAll("/v1/fine_tuning/jobs", { max: 500 });
      if (stopped) return;
      put(card, jobsTable(jobs));
      // quick while a job moves; slower otherwise, so jobs created elsewhere (API, another tab) still appear
      timer = setTimeout(load, jobs.some((j) => !FINAL.includes(j.status)) ? 3000 : 15000);
    } catch (e) {
      if (stopped) return;
      put(card, h("div", { class: "empty" }, e.message));
      if (e.status !== 401) timer = setTimeout(load, 15000);
    }
  };
  await load();
  return () => { stopped = true; clearTimeout(timer); };
}

function jobsTable(jobs) {
  if (!jobs.length) {
    return h("div", { class: "empty" }, h("p", {}, "No fine-tuning jobs yet."),
      h("a", { class: "btn primary", href: "#/jobs/new" }, "Create your first job"));
  }
  return h("div", { class: "table-wrap" }, h("table", { class: "stack-narrow", "data-test": "jobs-table" },
    h("thead", {}, h("tr", {},
      h("th", {}, "Job"), h("th", {}, "Status"), h("th", {}, "Base model"),
      h("th", { class: "hide-narrow" }, "Fine-tuned model"), h("th", { class: "hide-narrow" }, "Created"),
      h("th", { class: "hide-narrow" }, "Finished"), h("th", { class: "num hide-narrow" }, "Trained tokens"))),
    h("tbody", {}, jobs.map((j) => h("tr", { class: "link", "data-job": j.id, onclick: () => { location.hash = `#/jobs/${j.id}`; } },
      h("td", { class: "nowrap" }, h("a", { href: `#/jobs/${j.id}`, class: "mono small" }, j.id)),
      h("td", { class: "push" }, badge(j.status)),
      h("td", { class: "nowrap grow" }, j.model),
      h("td", { class: "mono small break grow" }, j.fine_tuned_model || h("span", { class: "muted hide-narrow" }, "—")),
      h("td", { class: "hide-narrow nowrap" }, fmt.time(j.created_at)),
      h("td", { class: "hide-narrow nowrap" }, fmt.time(j.finished_at)),
      h("td", { class: "num hide-narrow" }, fmt.int(j.trained_tokens)))))));
}

// ---------------------------------------------------------------------------- Create a job (form)

// The form's labels of the hyperparameters: its errors, and the server's, say these and not the API's keys
const HP_LABELS = { n_epochs: "Epochs", batch_size: "Batch size", learning_rate_multiplier: "LR multiplier" };

/** The server's refusal of a job, a hyperparameter in it (param "method.supervised.hyperparameters.n_epochs") by its label. */
function jobRefusal(err) {
  const key = (err.param || "").split(".").pop();
  return HP_LABELS[key] ? err.message.replace(key, HP_LABELS[key]) : err.message;
}

async function viewCreate(root, params) {
  root.append(pageHead("Create a fine-tuning job", "Pick a base model and a training file; everything else can stay on auto.",
    h("a", { class: "btn ghost", href: "#/jobs" }, "← All jobs")));
  const [models, files, { models: tuned, checkpoints }] = await Promise.all([baseModels(),
    listAll("/v1/files?purpose=fine-tune", { max: 1000 }).catch(() => []), tunedModels()]);
  const sources = [...tuned, ...checkpoints];  // weights a job goes on training from: each has a base
  const trainingFiles = files.filter((f) => f.purpose === "fine-tune");

  const fileSelect = (name, optional) => h("select", { name, id: `f-${name}` },
    optional ? h("option", { value: "" }, "None (hold out 10% of a training file of 20+ examples)") : h("option", { value: "" }, "Choose a file…"),
    trainingFiles.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.id} · ${fmt.bytes(f.bytes)}`)),
    h("option", { value: "__upload__" }, "Upload a new file…"));

  const form = h("form", { class: "card", id: "create-form", novalidate: true });
  const err = h("p", { class: "form-error", role: "alert", hidden: true });
  // a base model, or a fine-tuned one or a checkpoint to go on training (OpenAI's fine-tuning of an ft: model)
  const option = (m) => h("option", { value: m.id, selected: m.id === params.get("model") }, m.id);
  const modelSelect = h("select", { name: "model", id: "f-model" },
    h("optgroup", { label: "Base models" }, models.map(option)),
    tuned.length ? h("optgroup", { label: "Fine-tuned: train it further" }, tuned.map(option)) : null,
    checkpoints.length ? h("optgroup", { label: "Checkpoints: train on from one" }, checkpoints.map(option)) : null);
  modelSelect.title = modelSelect.value;
  // the base a file's tokens are counted with: a fine-tuned model's (or checkpoint's) own
  const reportModel = () => (sources.find((m) => m.id === modelSelect.value) || {}).base || modelSelect.value;
  // what the chosen base model is (the catalogue's description): the test model's random weights are no secret
  const modelHint = h("span", { class: "hint", "data-test": "model-description" });
  const describeModel = () => {
    modelSelect.title = modelSelect.value;
    const t = sources.find((m) => m.id === modelSelect.value);
    modelHint.textContent = t ? `Starts from this ${checkpoints.includes(t) ? "checkpoint" : "model"}'s weights and trains on: its base (${t.base}), method and LoRA shape are the job's`
      : (models.find((m) => m.id === modelSelect.value) || {}).description || "";
  };
  describeModel();
  const trainSelect = fileSelect("training_file", false);
  const validSelect = fileSelect("validation_file", true);
  const trainSlot = h("div", { class: "upload-slot" });
  const validSlot = h("div", { class: "upload-slot" });
  if (params.get("file")) trainSelect.value = params.get("file");

  // the chosen file's report under its select, so a file that cannot train (or a chat file for DPO) is
  // seen before the job is created, not when it fails seconds later
  const reports = {};
  const methodNow = () => (form.querySelector("input[name=method]:checked") || {}).value;
  const mismatch = (select) => {
    const r = reports[select.name];
    if (!r || methodNow() !== "dpo" || r.format === "preference") return null;  // (a validation file too: a job fails on it)
    return h("div", { class: "callout warn", style: "margin-top:8px", "data-test": "dpo-mismatch" }, h("div", {},
      h("strong", {}, "Not preference pairs"), `DPO trains on pairs ({"input", "preferred_output", "non_preferred_output"}); this file holds ${r.format} examples.`));
  };
  const showReport = async (select, slot) => {
    const id = select.value;
    if (!id || id === "__upload__") return;
    put(slot, h("div", { class: "small muted" }, h("span", { class: "spinner" }), " Checking the file…"));
    try {
      const report = await fetchReport(id, reportModel(), null, select.name === "validation_file");
      if (select.value !== id) return;
      reports[select.name] = report;
      renderReport(select, slot);
    } catch (e) { put(slot, h("span", { class: "form-error" }, e.message)); }
  };
  const typedEpochs = () => {  // the Epochs field's whole number, or null for auto (or anything else)
    const n = Number(String(form.querySelector("input[name=n_epochs]")?.value || "auto").trim());
    return Number.isInteger(n) && n > 0 ? n : null;
  };
  const renderReport = (select, slot) => put(slot,
    reportSummary(reports[select.name], select.value, select.name === "validation_file", typedEpochs()), mismatch(select));
  const uploadInto = (select, slot) => {
    select.addEventListener("change", () => {
      put(slot);
      delete reports[select.name];
      if (select.value !== "__upload__") { showReport(select, slot); return; }
      const input = h("input", { type: "file", accept: ".jsonl,.json,.txt,.csv", "data-test": `${select.name}-input` });
      const status = h("div", { class: "small muted" });
      input.addEventListener("change", async () => {
        if (!input.files.length) return;
        const picked = input.files[0];
        input.value = "";  // (else the same file picked again, after a refusal, fires no change)
        put(status, h("span", { class: "spinner" }), " Uploading and checking…");
        try {
          const file = await uploadFile(picked);
          select.insertBefore(h("option", { value: file.id }, `${file.filename} · ${file.id} · ${fmt.bytes(file.bytes)}`), select.lastChild);
          select.value = file.id;
          put(slot);
          await showReport(select, slot);
        } catch (e) {
          put(status, h("span", { class: "form-error" }, e.message));
        }
      });
      slot.append(input, status);
    });
  };
  uploadInto(trainSelect, trainSlot);
  uploadInto(validSelect, validSlot);

  const methodSeg = h("div", { class: "seg", role: "radiogroup", "aria-label": "Method" },
    h("label", {}, h("input", { type: "radio", name: "method", value: "lora", checked: true }), "LoRA"),
    h("label", {}, h("input", { type: "radio", name: "method", value: "full" }), "Full"),
    h("label", { title: "Preference pairs: raise the preferred answer over the other (DPO, with LoRA)" }, h("input", { type: "radio", name: "method", value: "dpo" }), "DPO"));

  // QLoRA keeps a frozen base in 4 bits under adapters: with Full there is no frozen base (the server refuses it)
  const quantize = h("input", { type: "checkbox", name: "quantize", value: "nf4" });
  const quantizeHint = h("span", { class: "hint", "data-test": "quantize-hint", hidden: true }, "4 bits is for LoRA and DPO: Full trains every weight");

  const hp = (name, label, hint) => h("label", { class: "field" }, h("span", {}, label, " ", h("span", { class: "hint" }, hint)),
    h("input", { type: "text", name, value: "auto", inputmode: "decimal", autocomplete: "off" }));

  form.append(
    h("div", { class: "form-grid" },
      h("label", { class: "field" }, h("span", {}, "Model"), modelSelect, modelHint),
      h("label", { class: "field" }, h("span", {}, "Suffix ", h("span", { class: "hint" }, "up to 64 characters, part of the model name")),
        h("input", { type: "text", name: "suffix", maxlength: 64, placeholder: "e.g. support-bot", autocomplete: "off" })),
      h("div", { class: "field full" }, h("label", { class: "field" }, h("span", {}, "Training file"), trainSelect), trainSlot),
      h("div", { class: "field full" }, h("label", { class: "field" }, h("span", {}, "Validation file ", h("span", { class: "hint" }, "optional")), validSelect), validSlot),
      h("div", { class: "field full" }, h("span", {}, "Method"), h("div", { class: "row" }, methodSeg,
        h("label", { class: "check", title: "Keep the frozen base in 4 bits (QLoRA, needs bitsandbytes on the server): for base models too big to train otherwise. LoRA and DPO only." },
          quantize, "Base in 4 bits (QLoRA)"), quantizeHint)),
      h("fieldset", { class: "full" }, h("legend", {}, "Hyperparameters"),
        h("div", { class: "form-grid three" },
          Object.keys(HP_LABELS).map((k) => hp(k, HP_LABELS[k], "auto or a number")))),
      h("label", { class: "field" }, h("span", {}, "Seed ", h("span", { class: "hint" }, "optional, for a reproducible run")),
        h("input", { type: "number", name: "seed", placeholder: "random", min: 0, step: 1 }))),
    err,
    h("div", { class: "row end", style: "margin-top:16px" },
      h("a", { class: "btn ghost", href: "#/jobs" }, "Cancel"),
      h("button", { type: "submit", class: "btn primary", id: "create-submit" }, "Create job")));
  methodSeg.addEventListener("change", () => {
    const full = methodNow() === "full";
    quantize.disabled = full;
    if (full) quantize.checked = false;
    quantizeHint.hidden = !full;
    if (reports.training_file) renderReport(trainSelect, trainSlot);
    if (reports.validation_file) renderReport(validSelect, validSlot);
  });
  form.querySelector("input[name=n_epochs]").addEventListener("input", () => {
    if (reports.training_file) renderReport(trainSelect, trainSlot);  // the summary follows the Epochs typed
  });
  modelSelect.addEventListener("change", () => { describeModel(); showReport(trainSelect, trainSlot); showReport(validSelect, validSlot); });
  showReport(trainSelect, trainSlot);  // a file chosen by the link that opened the form
  root.append(form);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.hidden = true;
    const data = new FormData(form);
    const fail = (msg) => { err.textContent = msg; err.hidden = false; };
    const trainingFile = data.get("training_file");
    if (!trainingFile || trainingFile === "__upload__") return fail("Choose or upload a training file.");
    const hyper = {};
    for (const k of Object.keys(HP_LABELS)) {
      const v = String(data.get(k) || "auto").trim();
      if (v === "" || v === "auto") continue;
      const n = Number(v);
      if (!Number.isFinite(n) || n <= 0) return fail(`${HP_LABELS[k]} must be "auto" or a positive number.`);
      if (k !== "learning_rate_multiplier" && !Number.isInteger(n)) return fail(`${HP_LABELS[k]} must be "auto" or a whole number.`);
      hyper[k] = n;
    }
    const method = data.get("method") || "lora";
    const body = {
      model: data.get("model"),
      training_file: trainingFile,
      method: method === "dpo"
        ? { type: "dpo", dpo: { hyperparameters: hyper } }
        : { type: "supervised", supervised: { hyperparameters: hyper } },
      metadata: { "tuneforge.method": method === "dpo" ? "lora" : method },
    };
    if (data.get("quantize")) body.metadata["tuneforge.quantize"] = "nf4";
    // a fine-tuned model or a checkpoint trains on with its own method and quantisation (the form's would be refused)
    if (sources.some((m) => m.id === body.model)) body.metadata = {};
    const valid = data.get("validation_file");
    if (valid && valid !== "__upload__") body.validation_file = valid;
    const suffix = String(data.get("suffix") || "").trim();
    const seed = String(data.get("seed") || "").trim();
    const problems = [  // the server's own rules (serve.fine_tuning), said together before a round trip
      suffix && !/^[A-Za-z0-9._-]{1,64}$/.test(suffix) ? "Suffix must be 1 to 64 letters, digits, '-', '_' or '.'" : null,
      seed && !(Number.isInteger(Number(seed)) && Number(seed) >= 0 && Number(seed) <= 2147483647)
        ? "Seed must be a whole number from 0 to 2147483647" : null,
    ].filter(Boolean);
    if (problems.length) return fail(`${problems.join("; ")}.`);
    if (suffix) body.suffix = suffix;
    if (seed) body.seed = Number(seed);
    const button = document.getElementById("create-submit");
    button.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      toast(`Job ${job.id} created`);
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      fail(jobRefusal(e));
    } finally {
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------------------------------ Upload

async function uploadFile(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return api("/v1/files", { method: "POST", form });
}

async function fetchReport(fileId, model, maxLength, validation = false) {
  const q = new URLSearchParams({ model: model || "" });
  if (maxLength) q.set("max_length", maxLength);
  if (validation) q.set("validation", "true");  // a validation file may have fewer than 10 examples
  return api(`/v1/files/${encodeURIComponent(fileId)}/report?${q}`);
}

// Token statistics' columns; on a phone the mean and p90 give way, so min, median and max fit unscrolled
const STAT_COLUMNS = ["min", "median", "mean", "p90", "max"];
const STAT_CLASS = { min: "num", median: "num", mean: "num hide-narrow", p90: "num hide-narrow", max: "num" };

// A good file's line under its name in the create form: a validation file's size; a training file's
// epochs and local time - the report's are for the automatic epochs, so Epochs typed scale the time.
function summaryPlan(report, validation, epochs) {
  if (validation) return `${fmt.int(report.billing_tokens ?? 0)} tokens`;
  if (epochs && report.n_epochs && report.estimated_local_seconds != null) {
    return `${epochs} epochs · about ${fmt.duration(report.estimated_local_seconds / report.n_epochs * epochs)} here`;
  }
  return `${report.n_epochs} epochs with Epochs on auto · about ${fmt.duration(report.estimated_local_seconds)} here`;
}

function reportSummary(report, fileId, validation = false, epochs = null) {
  const n = report.errors.length;
  const examples = `${fmt.int(report.n_examples)} examples`;
  const ready = validation ? `Ready to validate on: ${examples}` : `Ready to train: ${examples}`;
  return h("div", { class: `callout ${report.ok ? "ok" : "bad"}`, style: "margin-top:8px" },
    h("div", {},
      h("strong", {}, report.ok ? ready : `${fmt.int(n)} error${n === 1 ? "" : "s"}: this file cannot be ${validation ? "used" : "trained on"}`),
      report.ok ? summaryPlan(report, validation, epochs)
        : report.errors.slice(0, 3).map((e) => `${e.line ? `line ${e.line}: ` : ""}${e.code}`).join(", "),
      " ", h("a", { href: `#/upload/${fileId}` }, "Full report →")));
}

async function viewUpload(root, params, fileId) {
  const models = await baseModels();
  root.append(pageHead("Upload training data",
    "Check a file before training: errors by line, token counts, epochs, what OpenAI would charge and how long it takes here."));

  const modelSelect = h("select", { id: "report-model" }, models.map((m) => h("option", { value: m.id }, m.id)));
  if (params.get("model")) modelSelect.value = params.get("model");
  const maxLen = h("input", { type: "number", id: "report-max-length", value: params.get("max_length") || 1024, min: 16, step: 1 });
  const input = h("input", { type: "file", id: "upload-input", accept: ".jsonl,.json,.txt,.csv" });
  const zone = h("label", { class: "dropzone", for: "upload-input" },
    h("strong", {}, "Drop a JSONL file here, or click to choose"),
    h("span", { class: "muted" }, "Chat (messages), prompt/completion, text, DPO or ###Human/###Assistant transcripts"), input);
  const out = h("div", { id: "report" });

  const show = async (id) => {
    put(out, h("div", { class: "card" }, h("span", { class: "spinner" }), " Counting tokens and checking every line…"));
    try {
      const [file, report] = await Promise.all([api(`/v1/files/${encodeURIComponent(id)}`), fetchReport(id, modelSelect.value, maxLen.value)]);
      put(out, reportView(file, report, modelSelect.value));
    } catch (e) {
      put(out, errorCard(e, { name: `File ${id}`, href: "#/upload", list: "← All uploaded files" }));
    }
  };
  const upload = async (file) => {
    put(out, h("div", { class: "card" }, h("span", { class: "spinner" }), ` Uploading ${file.name}…`));
    try {
      const obj = await uploadFile(file);
      history.replaceState(null, "", `#/upload/${obj.id}`);
      currentFile = obj.id;
      await show(obj.id);
      refreshFiles();
    } catch (e) {
      put(out, errorCard(e));
    }
  };
  let currentFile = fileId;
  input.addEventListener("change", () => {
    if (!input.files.length) return;
    const picked = input.files[0];
    input.value = "";  // (else the same file picked again, changed on disk or not, fires no change)
    upload(picked);
  });
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
  });
  const recheck = () => currentFile && show(currentFile);
  modelSelect.addEventListener("change", recheck);
  maxLen.addEventListener("change", recheck);

  root.append(h("div", { class: "card" },
    zone,
    h("div", { class: "form-grid", style: "margin-top:14px" },
      h("label", { class: "field" }, h("span", {}, "Count tokens with ", h("span", { class: "hint" }, "the base model you will train")), modelSelect),
      h("label", { class: "field" }, h("span", {}, "Max length ", h("span", { class: "hint" }, "tokens per example")), maxLen))));
  root.append(out);

  const filesCard = h("div", { class: "card flush" });
  root.append(filesCard);
  const refreshFiles = async () => {
    try {
      const files = (await listAll("/v1/files", { max: 1000 })).filter((f) => f.purpose === "fine-tune");
      put(filesCard, h("h2", {}, "Uploaded files"), files.length ? h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", { class: "hide-narrow" }, "Id"), h("th", { class: "num" }, "Size"),
          h("th", { class: "hide-narrow" }, "Uploaded"), h("th", {}, ""))),
        h("tbody", {}, files.map((f) => h("tr", { "data-file": f.id },
          h("td", { class: "break" }, h("a", { href: `#/upload/${f.id}` }, f.filename)),
          h("td", { class: "mono small hide-narrow" }, f.id),
          h("td", { class: "num nowrap" }, fmt.bytes(f.bytes)),
          h("td", { class: "nowrap hide-narrow" }, fmt.time(f.created_at)),
          h("td", { class: "nowrap" }, h("div", { class: "row end" },
            h("a", { class: "btn small", href: `#/upload/${f.id}` }, "Report"),
            h("button", { type: "button", class: "btn small danger", onclick: async () => {
              if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
              try {
                await api(`/v1/files/${f.id}`, { method: "DELETE" });
                toast("File deleted");
                if (f.id === currentFile) {  // its report offered to train on a file that is gone
                  currentFile = null;
                  put(out);
                  history.replaceState(null, "", "#/upload");
                }
                refreshFiles();
              } catch (e) { toast(e.message, true); }
            } }, "Delete")))))))) : h("div", { class: "empty" }, "No files uploaded yet."));
    } catch (e) {
      put(filesCard, h("div", { class: "empty" }, e.message));
    }
  };
  refreshFiles();
  if (fileId) await show(fileId);
}

function issueTable(issues, kind) {
  return h("div", { class: "table-wrap" }, h("table", { class: "issues", "data-test": `${kind}-table` },
    h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Line"), h("th", {}, "Code"), h("th", { class: "hide-narrow" }, "Field"), h("th", {}, "Problem"))),
    h("tbody", {}, issues.map((i) => h("tr", { "data-code": i.code, "data-line": i.line ?? "" },
      h("td", { class: "num" }, i.line ?? "file"),
      h("td", {}, h("span", { class: `code-tag ${kind === "errors" ? "error" : "warning"}` }, i.code)),
      h("td", { class: "mono small hide-narrow" }, i.field || ""),
      h("td", { class: "break" }, i.message))))));
}

function reportView(file, r, model) {
  const st = r.stats;
  const frag = h("div", { class: "report", "data-ok": String(r.ok) });
  const nErr = r.errors.length, nWarn = r.warnings.length;
  frag.append(h("div", { class: "card" },
    h("div", { class: "card-head" },
      h("div", {}, h("h2", { class: "break" }, file.filename), h("div", { class: "muted small mono" }, `${file.id} · ${fmt.bytes(file.bytes)} · ${r.format} format`)),
      r.ok ? h("a", { class: "btn primary", href: `#/jobs/new?file=${encodeURIComponent(file.id)}&model=${encodeURIComponent(model)}`, "data-test": "train-this" }, "Create a job with this file")
        : null),
    h("div", { class: `callout ${r.ok ? "ok" : "bad"}`, "data-test": "report-verdict" },
      h("div", {},
        h("strong", {}, r.ok ? `Valid: ${fmt.int(r.n_examples)} examples ready to train` : `${fmt.int(nErr)} error${nErr === 1 ? "" : "s"} — fix ${nErr === 1 ? "it" : "them"} before training`),
        r.ok ? (nWarn ? `${fmt.int(nWarn)} warning${nWarn === 1 ? "" : "s"} below; training can still proceed.` : "No problems found.")
          : "A job on this file would fail while validating files. Each problem is listed with its line number."))));

  if (nErr) frag.append(h("div", { class: "card flush" }, h("h2", {}, `Errors (${fmt.int(nErr)})`), issueTable(r.errors, "errors")));
  if (nWarn) frag.append(h("div", { class: "card flush" }, h("h2", {}, `Warnings (${fmt.int(nWarn)})`), issueTable(r.warnings, "warnings")));

  const stat = (label, value, note) => h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), note ? h("div", { class: "note" }, note) : null);
  const costs = r.costs || [];
  frag.append(h("div", { class: "grid two" },
    h("div", { class: "card" }, h("h2", {}, "Training plan"),
      h("div", { class: "stats pairs", "data-test": "report-stats" },
        // (with errors the count is of lines, as OpenAI's minimum counts them; tokens only of what was read)
        stat("Examples", fmt.int(r.n_examples), r.ok ? null : "lines, those with errors included"),
        stat("Epochs", r.n_epochs ?? "—", "OpenAI's rule for this size"),
        stat("Billing tokens", fmt.int(r.billing_tokens), r.ok ? "per epoch" : "per epoch, of the examples without errors"),
        stat("Local time", fmt.duration(r.estimated_local_seconds), r.tokens_per_second ? `at ${fmt.int(Math.round(r.tokens_per_second))} tokens/s` : "no speed measured yet"),
        r.dpo_tokens != null ? stat("Local time as DPO", fmt.duration(r.estimated_local_seconds_dpo), `both answers: ${fmt.int(r.dpo_tokens)} tokens per epoch`) : null)),
    h("div", { class: "card" }, h("h2", {}, "Same job at OpenAI"),
      costs.length ? h("table", { "data-test": "costs" },
        h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", { class: "num" }, "Trained tokens"), h("th", { class: "num" }, "Cost"))),
        h("tbody", {}, costs.map((c) => h("tr", {}, h("td", {}, c.model, h("span", { class: "muted small" }, ` (${c.as_of})`)),
          h("td", { class: "num" }, fmt.int(c.trained_tokens)), h("td", { class: "num" }, fmt.usd(c.usd))))))
        : h("p", { class: "muted" }, "No token counts: the file has no example that could be tokenized."))));

  if (st) {
    const dist = (name, d) => h("tr", {}, h("td", {}, name), ...STAT_COLUMNS.map((k) => h("td", { class: STAT_CLASS[k] }, fmt.int(Math.round(d[k])))));
    frag.append(h("div", { class: "card flush" }, h("h2", {}, "Token statistics"),
      h("div", { class: "table-wrap" }, h("table", { "data-test": "token-stats" },
        h("thead", {}, h("tr", {}, h("th", {}, "Per example"), ...STAT_COLUMNS.map((k) => h("th", { class: STAT_CLASS[k] }, k)))),
        h("tbody", {},
          dist("Messages", st.messages_per_example),
          dist("Tokens", st.tokens_per_example),
          dist("Answer (trained) tokens", st.loss_tokens_per_example)))),
      h("p", { class: "muted small", style: "padding:0 20px 14px" },
        `${fmt.int(st.n_truncated)} example(s) longer than max length ${fmt.int(r.max_length)}. Tokens counted with ${model}'s tokenizer; OpenAI's count differs a little.`)));
  }
  return frag;
}

// -------------------------------------------------------------------------------------- Job detail

async function viewJob(root, params, jobId) {
  const head = h("div");
  const body = h("div");
  root.append(head, body);
  let job;
  try {
    job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
  } catch (e) {
    root.append(errorCard(e, { name: `Job ${jobId}`, href: "#/jobs", list: "← All jobs" }));
    return null;
  }
  const events = [];
  const seen = new Set();
  let checkpoints = [];
  let timer = null;
  let stopped = false;

  const fetchEvents = async () => {
    // Newest first: read pages until reaching an event already seen (all of them the first time).
    const fresh = [];
    let after = null;
    for (let i = 0; i < 50; i++) {
      const page = await api(`/v1/fine_tuning/jobs/${jobId}/events?limit=100${after ? `&after=${after}` : ""}`);
      let hitSeen = false;
      for (const e of page.data) {
        if (seen.has(e.id)) { hitSeen = true; break; }
        fresh.push(e);
      }
      if (hitSeen || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    for (const e of fresh) seen.add(e.id);
    events.unshift(...fresh);
  };

  const statusCard = h("div", { class: "card" });
  const chartsCard = h("div", { class: "grid two" });
  const modelCard = h("div", { class: "card", hidden: true, id: "model-card" });
  const ckptCard = h("div", { class: "card flush" });
  const eventsCard = h("div", { class: "card" });
  body.append(modelCard, statusCard, chartsCard, h("div", { class: "grid two" }, ckptCard, eventsCard));

  const act = async (what) => {
    try {
      job = await api(`/v1/fine_tuning/jobs/${jobId}/${what}`, { method: "POST" });
      toast(`Job ${what === "cancel" ? "cancelled" : what === "pause" ? "paused" : "resumed"}`);
      await refresh();
    } catch (e) {
      toast(e.message, true);
    }
  };

  const renderHead = () => {
    const final = FINAL.includes(job.status);
    put(head, pageHead(h("span", { class: "row" }, h("span", { class: "mono break" }, job.id), badge(job.status)),
      `${job.model} · created ${fmt.time(job.created_at)}${job.finished_at ? ` · finished ${fmt.time(job.finished_at)}` : ""}`,
      h("a", { class: "btn ghost", href: "#/jobs" }, "← All jobs"),
      job.status === "paused" ? h("button", { class: "btn", type: "button", "data-action": "resume", onclick: () => act("resume") }, "Resume") : null,
      ["validating_files", "queued", "running"].includes(job.status) ? h("button", { class: "btn", type: "button", "data-action": "pause", onclick: () => act("pause") }, "Pause") : null,
      !final ? h("button", { class: "btn danger", type: "button", "data-action": "cancel", onclick: () => confirm(checkpoints.length ? "Cancel this job? Its checkpoints stay usable."
        : "Cancel this job? It has no checkpoint yet (one is saved at the end of each epoch): what it trained so far is lost.") && act("cancel") }, "Cancel job") : null));
  };

  const isDpo = () => Boolean(job.method && job.method.type === "dpo");
  const metricRows = () => events.filter((e) => e.type === "metrics" && e.data && e.data.step !== undefined)
    .map((e) => e.data).sort((a, b) => a.step - b.step);

  const renderStatus = () => {
    const rows = metricRows();
    const last = rows[rows.length - 1];
    const total = last && last.total_steps;
    const hp = job.hyperparameters || {};
    const meta = job.metadata || {};
    const adapter = (meta["tuneforge.method"] || "lora") + (meta["tuneforge.quantize"] ? ` (${meta["tuneforge.quantize"]})` : "");
    const dpo = isDpo();
    const method = dpo ? `DPO · ${adapter}` : adapter;
    const progress = job.status === "succeeded" ? 1 : total ? last.step / total : 0;
    put(statusCard, 
      h("div", { class: "card-head" }, h("h2", {}, "Status"),
        job.estimated_finish && !FINAL.includes(job.status) ? h("span", { class: "muted small" }, `estimated finish ${fmt.clock(job.estimated_finish)}`) : null),
      h("div", { class: "progress", title: `${Math.round(progress * 100)}%` }, h("div", { style: `width:${(progress * 100).toFixed(1)}%` })),
      h("div", { class: "stats", style: "margin-top:14px" },
        stat("Step", last ? `${fmt.int(last.step)} / ${fmt.int(total)}` : "—"),
        stat("Train loss", fmt.num(last && last.train_loss)),
        stat("Valid loss", fmt.num(lastValue(rows, "valid_loss"))),
        dpo ? stat("Preferred ranked first", fmt.pct(lastValue(rows, "valid_reward_accuracy") ?? (last && last.train_reward_accuracy)))
          : stat("Token accuracy", fmt.pct(last && last.train_mean_token_accuracy)),
        // (OpenAI reports trained tokens once a job succeeds; a stopped job's come from its last step)
        stat("Trained tokens", fmt.int(job.trained_tokens ?? (last && last.trained_tokens)))),
      job.error && job.error.message ? h("div", { class: "callout bad", style: "margin-top:14px", "data-test": "job-error" },
        h("div", {}, h("strong", {}, `Failed: ${job.error.code || "error"}`), job.error.message)) : null,
      h("dl", { class: "kv", style: "margin-top:16px" },
        h("dt", {}, "Base model"), h("dd", {}, job.model),
        h("dt", {}, "Method"), h("dd", { "data-test": "method" }, method),
        h("dt", {}, "Hyperparameters"), h("dd", { class: "mono small" }, `epochs ${hp.n_epochs ?? "auto"} · batch ${hp.batch_size ?? "auto"} · lr × ${hp.learning_rate_multiplier ?? "auto"}` +
          (dpo ? ` · beta ${(job.method.dpo && job.method.dpo.hyperparameters && job.method.dpo.hyperparameters.beta) ?? "auto"}` : "")),
        h("dt", {}, "Training file"), h("dd", {}, h("a", { href: `#/upload/${job.training_file}`, class: "mono small" }, job.training_file)),
        h("dt", {}, "Validation file"), h("dd", {}, job.validation_file ? h("a", { href: `#/upload/${job.validation_file}`, class: "mono small" }, job.validation_file) : "—"),
        h("dt", {}, "Seed"), h("dd", {}, job.seed ?? "—"),
        job.suffix ? [h("dt", {}, "Suffix"), h("dd", {}, job.suffix)] : null));
  };

  let chartWidth = 520;
  const renderCharts = () => {
    const rows = metricRows();
    const pick = (key) => rows.filter((r) => r[key] !== undefined && r[key] !== null).map((r) => [r.step, r[key]]);
    const empty = !FINAL.includes(job.status) ? undefined
      : `No training step was run (the job ${job.status === "failed" ? "failed" : "was cancelled"} before its first)`;
    // DPO's second chart: how often the preferred answer is ranked first (token accuracy says little there)
    const [accTitle, accKey] = isDpo() ? ["Preferred answer ranked first", "reward_accuracy"]
      : ["Token accuracy", "mean_token_accuracy"];
    put(chartsCard, 
      h("div", { class: "card", "data-test": "loss-chart" }, h("h2", {}, "Loss"),
        lineChart({ title: "loss", width: chartWidth, empty, series: [
          { name: "train", color: PALETTE.train, points: pick("train_loss") },
          { name: "validation", color: PALETTE.valid, points: pick("valid_loss"), dots: true }] })),
      h("div", { class: "card", "data-test": "accuracy-chart" }, h("h2", {}, accTitle),
        lineChart({ title: accTitle.toLowerCase(), width: chartWidth, yMin: 0, empty, yFormat: (v) => `${Math.round(v * 100)}%`, series: [
          { name: "train", color: PALETTE.trainAcc, points: pick(`train_${accKey}`) },
          { name: "validation", color: PALETTE.validAcc, points: pick(`valid_${accKey}`), dots: true }] })));
    const measured = chartsCard.querySelector(".chart") ? chartsCard.querySelector(".chart").clientWidth : 0;
    if (measured && Math.abs(measured - chartWidth) > 8) { chartWidth = measured; renderCharts(); }
  };

  const renderModel = () => {
    if (!job.fine_tuned_model) { modelCard.hidden = true; return; }
    modelCard.hidden = false;
    if (modelGone) {
      put(modelCard, h("div", { class: "card-head" }, h("h2", {}, "Fine-tuned model")),
        h("div", { class: "callout", "data-test": "model-deleted" }, h("div", {},
          h("strong", {}, "Deleted"), h("code", {}, job.fine_tuned_model),
          " no longer answers. Its checkpoints below still do: try one in the playground.")));
      return;
    }
    const base = `${location.origin}/v1`;
    const snippet = `from openai import OpenAI\n\nclient = OpenAI(base_url="${base}", api_key="YOUR_TUNEFORGE_KEY")\n\n` +
      `response = client.chat.completions.create(\n    model="${job.fine_tuned_model}",\n` +
      `    messages=[{"role": "user", "content": "Hello!"}],\n)\nprint(response.choices[0].message.content)\n`;
    put(modelCard, 
      h("div", { class: "card-head" }, h("h2", {}, "Fine-tuned model"),
        h("a", { class: "btn primary", href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, "Open in playground")),
      h("div", { class: "model-name" }, h("code", { "data-test": "fine-tuned-model" }, job.fine_tuned_model), copyButton(job.fine_tuned_model)),
      h("p", { class: "muted small" }, "Use it from any OpenAI client:"),
      h("div", { class: "snippet-wrap" }, h("pre", { class: "snippet", "data-test": "snippet" }, snippet), copyButton(snippet)));
  };

  const renderCheckpoints = () => {
    put(ckptCard, h("h2", {}, "Checkpoints"), checkpoints.length ? h("div", { class: "table-wrap" }, h("table", { "data-test": "checkpoints" },
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Step"), h("th", { class: "num" }, "Train loss"), h("th", { class: "num" }, "Valid loss"), h("th", { class: "num hide-narrow" }, "Accuracy"), h("th", {}, ""))),
      h("tbody", {}, checkpoints.map((c) => h("tr", { title: c.fine_tuned_model_checkpoint },
        h("td", { class: "num" }, fmt.int(c.step_number)),
        h("td", { class: "num" }, fmt.num(c.metrics.train_loss)),
        h("td", { class: "num" }, fmt.num(c.metrics.valid_loss ?? c.metrics.full_valid_loss)),
        h("td", { class: "num hide-narrow" }, fmt.pct(c.metrics.train_mean_token_accuracy)),
        h("td", { class: "nowrap" }, h("div", { class: "row end" }, copyButton(c.fine_tuned_model_checkpoint, "Copy name"),
          h("a", { class: "btn small", href: `#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, "Try"),
          h("a", { class: "btn small", href: `#/jobs/new?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`, "data-action": "train-more",
            title: "Train more from here: a job that goes on training from this checkpoint's weights on new data" }, "Train more"))))))))
      : h("div", { class: "empty" }, FINAL.includes(job.status) ? "No checkpoint was saved: the job ended before its first epoch did."
        : "Checkpoints appear at the end of each epoch."));
  };

  // one event per training step (OpenAI's) would bury the rest: the newest step is shown, the others on request
  let allSteps = false;
  const stepsToggle = h("input", { type: "checkbox", "data-test": "all-steps" });
  stepsToggle.addEventListener("change", () => { allSteps = stepsToggle.checked; renderEvents(); });
  const renderEvents = () => {
    const newestStep = events.find((e) => e.type === "metrics");
    const shown = events.filter((e) => allSteps || e.type !== "metrics" || e === newestStep);
    put(eventsCard, h("div", { class: "card-head" }, h("h2", {}, "Events"),
      h("span", { class: "row" },
        !FINAL.includes(job.status) && job.status !== "paused" ? h("span", { class: "muted small" }, h("span", { class: "spinner" }), " live") : null,
        h("label", { class: "check small" }, stepsToggle, "every step"))),
    h("ul", { class: "events", "data-test": "events" }, shown.slice(0, 200).map((e) => h("li", { class: e.level },
      h("time", {}, fmt.clock(e.created_at)), h("span", { class: "break" }, e.message)))));
  };

  let modelGone = false;
  const refresh = async () => {
    [job] = await Promise.all([api(`/v1/fine_tuning/jobs/${jobId}`), fetchEvents()]);
    checkpoints = (await api(`/v1/fine_tuning/jobs/${jobId}/checkpoints?limit=100`)).data;
    if (job.fine_tuned_model) {  // the job keeps the name after the model is deleted (as at OpenAI)
      modelGone = await api(`/v1/models/${encodeURIComponent(job.fine_tuned_model)}`).then(() => false, (e) => e.status === 404);
    }
    renderHead(); renderModel(); renderStatus(); renderCharts(); renderCheckpoints(); renderEvents();
    root.dataset.status = job.status;
  };

  const loop = async () => {
    if (stopped) return;
    try {
      await refresh();
    } catch (e) {
      if (e.name !== "AbortError") toast(e.message, true);
    }
    if (!stopped && !FINAL.includes(job.status)) timer = setTimeout(loop, POLL_MS);
  };
  await loop();
  return () => { stopped = true; clearTimeout(timer); };
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

function lastValue(rows, key) {
  for (let i = rows.length - 1; i >= 0; i--) if (rows[i][key] !== undefined && rows[i][key] !== null) return rows[i][key];
  return null;
}

// -------------------------------------------------------------------------------------- Playground

/** POST a chat completion with stream: true and call onDelta with each piece of text (SSE). */
async function streamChat(body, onDelta, signal) {
  const res = await request("/v1/chat/completions", { method: "POST", json: { ...body, stream: true }, signal });
  if (!res.ok) {
    const err = await res.json().catch(() => null);
    if (res.status === 401) keyRejected(err);
    throw new ApiError(res.status, err);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", finish = null, usage = null, id = null;
  const calls = [];  // tool calls, assembled from their deltas by index (arguments arrive in pieces)
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let idx;
    while ((idx = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, idx).replace(/\r$/, "");
      buf = buf.slice(idx + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return { finish, usage, id, calls };
      let chunk;
      try { chunk = JSON.parse(data); } catch { continue; }
      if (chunk.error) throw new ApiError(500, chunk);
      if (chunk.id) id = chunk.id;
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) onDelta(c.delta.content);
        for (const t of (c.delta && c.delta.tool_calls) || []) {
          const call = calls[t.index] || (calls[t.index] = { id: t.id, type: "function", function: { name: "", arguments: "" } });
          if (t.function && t.function.name) call.function.name += t.function.name;
          if (t.function && t.function.arguments) call.function.arguments += t.function.arguments;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  return { finish, usage, id, calls };
}

/** The Playground's tools box: nothing when empty, else a JSON array of tools (OpenAI's shape). */
function parseTools(text) {
  if (!text.trim()) return null;
  let tools;
  try { tools = JSON.parse(text); } catch (e) { throw new Error(`Tools: not JSON (${e.message})`); }
  if (!Array.isArray(tools)) throw new Error('Tools: a JSON array of tools, e.g. [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]');
  return tools;
}

/** The Playground's conversation kept for this tab: {system, tools, compare, panes: [{model, history}]}; an
 * answer in a history keeps what was shown under it (shown: its tokens and time, its stored completion's id
 * and metadata), which is never sent. */
function keptChat() {
  try {
    return JSON.parse(sessionStorage.getItem(CHAT_STORAGE)) || {};
  } catch {
    return {};  // (unreadable: the chat starts afresh)
  }
}

async function viewPlayground(root, params) {
  const [bases, { models: tuned, checkpoints }] = await Promise.all([baseModels(), tunedModels()]);
  const wanted = params.get("model");
  const saved = keptChat();
  const savedPanes = saved.panes || [];
  const groups = [
    ["Base models", bases.map((m) => m.id)],
    ["Fine-tuned", tuned.map((m) => m.id)],
    ["Checkpoints", checkpoints.map((c) => c.id)],
  ];
  const all = groups.flatMap((g) => g[1]);
  if (wanted && !all.includes(wanted)) groups.push(["Other", [wanted]]);
  const picker = (id, value) => {
    const sel = h("select", { id }, groups.filter((g) => g[1].length).map(([label, ids]) =>
      h("optgroup", { label }, ids.map((m) => h("option", { value: m }, m)))));
    if (value) sel.value = value;
    sel.title = sel.value;  // a long ft: name, whole, where the select cuts it
    sel.addEventListener("change", () => { sel.title = sel.value; });
    return sel;
  };
  const baseOf = (model) => {
    const t = tuned.find((m) => m.id === model) || checkpoints.find((c) => c.id === model);
    return t ? t.base : model && model.startsWith("ft:") ? model.split(":")[1] : null;
  };
  const savedModel = (i) => savedPanes[i] && all.includes(savedPanes[i].model) && savedPanes[i].model;  // (not one deleted since)
  const initial = wanted || savedModel(0) || (tuned[0] && tuned[0].id) || (bases[0] && bases[0].id);
  const modelA = picker("pg-model", initial);
  const modelB = picker("pg-compare-model", savedModel(1) || baseOf(initial) || (bases[0] && bases[0].id));
  const compare = h("input", { type: "checkbox", id: "pg-compare" });
  const system = h("textarea", { id: "pg-system", rows: 3, placeholder: "You are a helpful assistant.", value: saved.system });
  const temp = h("input", { type: "range", id: "pg-temperature", min: 0, max: 2, step: 0.05, value: 0.7 });
  const tempOut = h("span", { class: "muted" }, "0.70");
  temp.addEventListener("input", () => { tempOut.textContent = Number(temp.value).toFixed(2); });
  const maxTokens = h("input", { type: "number", id: "pg-max-tokens", min: 1, max: 4096, value: 256 });
  // kept chats (store: true) can be rated, and the Monitor turns the good ones into the next training file
  const keep = h("input", { type: "checkbox", id: "pg-store" });
  // tools the model may call: a call is shown, and its result typed in continues the chat
  const toolsBox = h("textarea", { id: "pg-tools", rows: 3, class: "mono small", spellcheck: "false", value: saved.tools,
    placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]' });
  const compareField = h("label", { class: "field", hidden: true }, h("span", {}, "Compare with"), modelB);

  root.append(pageHead("Playground", "Chat with any model: a base model, a fine-tuned one or one of its checkpoints."));
  const chats = h("div", { class: "chats" });
  const narrow = window.matchMedia("(max-width: 720px)").matches;  // (a phone: the long hint would be cut)
  const prompt = h("textarea", { id: "pg-prompt", rows: 2,
    placeholder: narrow ? "Send a message…" : "Send a message… (Enter to send, Shift+Enter for a new line)" });
  const send = h("button", { type: "submit", class: "btn primary", id: "pg-send" }, "Send");
  const clear = h("button", { type: "button", class: "btn ghost", id: "pg-clear" }, "Clear");
  // Stop ends the answers being written and keeps what they said (Clear ends them and the conversation)
  const stop = h("button", { type: "button", class: "btn", id: "pg-stop", hidden: true }, "Stop");
  const composer = h("form", { class: "composer" }, prompt, send, stop, clear);

  root.append(h("div", { class: "pg" },
    h("div", { class: "card pg-settings" },
      h("label", { class: "field" }, h("span", {}, "Model"), modelA),
      h("label", { class: "check", style: "margin-top:12px" }, compare, "Compare side by side"),
      compareField,
      h("label", { class: "field" }, h("span", {}, "System prompt"), system),
      h("label", { class: "field" }, h("span", { class: "range-head" }, "Temperature", tempOut), temp),
      h("label", { class: "field" }, h("span", {}, "Max tokens"), maxTokens),
      h("label", { class: "field" }, h("span", {}, "Tools ", h("span", { class: "hint" }, "JSON, optional")), toolsBox),
      h("label", { class: "check", style: "margin-top:12px", title: "store: true, with metadata source=playground; rate each answer, then make a training file on the Monitor page" },
        keep, "Keep chats to rate them (store)")),
    h("div", {}, chats, composer)));

  const panes = [];
  const makePane = (select) => {
    const title = h("code", {}, select.value);
    const messages = h("div", { class: "messages", "aria-live": "polite" },
      h("div", { class: "muted small empty-hint" }, "Messages appear here."));
    const el = h("div", { class: "card chat" }, h("div", { class: "chat-head" }, h("span", {}, "Model"), title), messages);
    const pane = { el, select, title, messages, history: [] };
    select.addEventListener("change", () => {
      title.textContent = select.value;
      if (pane.history.length) {
        // another model starts its own conversation: the earlier answers were not its own
        pane.history = [];
        put(messages, h("div", { class: "muted small empty-hint" }, `New conversation with ${select.value}.`));
      }
      saveChat();
    });
    return pane;
  };
  panes.push(makePane(modelA), makePane(modelB));
  const layout = () => {
    const on = compare.checked;
    compareField.hidden = !on;
    chats.className = on ? "chats compare" : "chats";
    put(chats, ...(on ? [panes[1].el, panes[0].el] : [panes[0].el]));
  };
  compare.addEventListener("change", layout);
  compare.checked = Boolean(params.get("compare") || saved.compare);
  layout();

  // kept after each change, so the Playground left (or the tab reloaded) and opened again has its chat
  let left = false;  // (an answer ended by leaving the page settles after: the chat kept is the one before it)
  const saveChat = () => {
    if (left) return;
    const chat = { system: system.value, tools: toolsBox.value, compare: compare.checked,
      panes: panes.map((p) => ({ model: p.select.value, history: p.history })) };
    try { sessionStorage.setItem(CHAT_STORAGE, JSON.stringify(chat)); } catch { /* storage full: the chat goes on, unkept */ }
  };
  for (const el of [system, toolsBox]) el.addEventListener("input", saveChat);
  compare.addEventListener("change", saveChat);

  let controller = null;
  const busy = (on) => { send.disabled = on; send.hidden = on; stop.hidden = !on; };
  stop.addEventListener("click", () => controller && controller.abort("stop"));
  const bubble = (pane, role, text) => {
    const hint = pane.messages.querySelector(".empty-hint");
    if (hint) hint.remove();
    const el = h("div", { class: `msg ${role}` }, text);
    pane.messages.append(el);
    pane.messages.scrollTop = pane.messages.scrollHeight;
    return el;
  };
  // the results the user types for an answer's tool calls, sent as tool messages: the chat goes on
  const resultsForm = (pane, calls) => {
    const inputs = calls.map((c) => h("input", { type: "text", "data-test": "pg-tool-result", "data-call": c.id,
      placeholder: `result of ${c.function.name}`, autocomplete: "off" }));
    const submit = h("button", { type: "submit", class: "btn small primary", "data-test": "pg-send-results" }, "Send results");
    const form = h("form", { class: "tool-results" }, inputs, submit);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (send.disabled) return;
      form.remove();
      pane.pending = false;
      calls.forEach((c, i) => {
        pane.history.push({ role: "tool", tool_call_id: c.id, content: inputs[i].value });
        bubble(pane, "tool", `${c.function.name} → ${inputs[i].value}`);
      });
      busy(true);
      controller = new AbortController();
      await answer(pane, controller.signal);
      busy(false);
      saveChat();
    });
    return form;
  };
  const callLine = (c) => h("div", { class: "mono small", "data-test": "pg-call" }, `${c.function.name}(${c.function.arguments})`);
  // what is shown under an answer, kept with it (m.shown) so the chat drawn again shows it too: its tokens
  // and time, and for a stored completion the rating buttons, whose rating is kept as it changes
  const answerNotes = (m) => {
    const shown = m.shown || {};
    if (shown.stopped) return [h("span", { class: "meta", "data-test": "stopped" }, "stopped")];
    return [
      shown.line && h("span", { class: "meta" }, shown.line),
      shown.id && ratingButtons(shown.id, shown.metadata, (metadata) => { shown.metadata = metadata; saveChat(); }),
      // (monitor.stored: an answer cut short would teach cutting short)
      shown.id && shown.cut && h("span", { class: "meta", "data-test": "not-training-data" },
        "cut at max tokens, so no training file takes it: raise Max tokens for answers to train on"),
    ].filter(Boolean);
  };
  const answer = async (pane, signal) => {
    // until the first token: a model asked for the first time is loaded (and a GGUF converted) first
    const out = bubble(pane, "assistant streaming", h("span", { class: "meta waiting" }, "waiting for the model…"));
    out.dataset.model = pane.select.value;
    // the conversation asked: another model picked (or Clear) meanwhile starts a new one, which this
    // answer must not join (the next question went to the new model after the old model's answer)
    const history = pane.history;
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []),
      ...history.map(({ shown, ...m }) => m)];  // (what was shown of an answer is the page's, not the model's)
    let text = "";
    const started = performance.now();
    try {
      const kept = keep.checked;
      const tools = parseTools(toolsBox.value);
      const { finish, usage, id, calls } = await streamChat({
        model: pane.select.value, messages,
        temperature: Number(temp.value), max_tokens: Number(maxTokens.value),
        stream_options: { include_usage: true },
        ...(tools ? { tools } : {}),
        ...(kept ? { store: true, metadata: { source: "playground" } } : {}),
      }, (piece) => {
        const waiting = out.querySelector(".waiting");
        if (waiting) waiting.remove();
        text += piece;
        out.firstChild ? (out.firstChild.textContent = text) : out.append(document.createTextNode(text));
        pane.messages.scrollTop = pane.messages.scrollHeight;
      }, signal);
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      const line = [usage ? `${fmt.int(usage.completion_tokens)} tokens` : null, `${secs}s`, finish === "length" ? "stopped at max tokens" : null];
      const shown = { line: line.filter(Boolean).join(" · "),
        ...(kept && id ? { id, metadata: { source: "playground" }, cut: finish === "length" } : {}) };
      const said = { role: "assistant", content: text || null, ...(calls.length ? { tool_calls: calls } : {}), shown };
      history.push(said);
      for (const c of calls) out.append(callLine(c));
      out.append(...answerNotes(said));
      if (calls.length && history === pane.history) { pane.pending = true; out.append(resultsForm(pane, calls)); }
      out.dataset.done = "true";
      return true;
    } catch (e) {
      if (signal.aborted && signal.reason === "stop" && text) {  // Stop: the answer so far stays
        const said = { role: "assistant", content: text, shown: { stopped: true } };
        history.push(said);
        out.append(...answerNotes(said));
        out.dataset.done = "true";
        return true;
      }
      out.remove();
      if (!signal.aborted) bubble(pane, "error", e.message);
      return false;
    } finally {
      out.classList.remove("streaming");
      const waiting = out.querySelector(".waiting");
      if (waiting) waiting.remove();
    }
  };
  const runPane = async (pane, text, signal) => {
    const history = pane.history;
    history.push({ role: "user", content: text });
    bubble(pane, "user", text);
    if (!(await answer(pane, signal))) history.pop();  // (a failed answer: its question is asked again)
  };
  composer.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text || send.disabled) return;
    const n = Number(maxTokens.value);
    if (!Number.isInteger(n) || n < 1) { toast("Max tokens must be a whole number of at least 1", true); maxTokens.focus(); return; }
    try { parseTools(toolsBox.value); } catch (e) { toast(e.message, true); toolsBox.focus(); return; }
    const active = compare.checked ? panes : [panes[0]];
    if (active.some((p) => p.pending)) { toast("Send the results of the tool calls first (or Clear)", true); return; }
    prompt.value = "";
    busy(true);
    controller = new AbortController();
    await Promise.all(active.map((p) => runPane(p, text, controller.signal)));
    busy(false);
    saveChat();
    prompt.focus();
  });
  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); composer.requestSubmit(); }
  });
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    for (const p of panes) { p.history = []; p.pending = false; put(p.messages, h("div", { class: "muted small empty-hint" }, "Messages appear here.")); }
    saveChat();
  });

  // the kept conversation drawn again, for a pane still on its model (a model asked for by the address
  // starts its own); tool calls still waiting for their results wait again
  const replay = (pane, history) => {
    pane.history = history;
    const names = {};  // a tool message names its call by id: shown by the call's function
    let out = null;
    for (const m of history) {
      if (m.role === "tool") { bubble(pane, "tool", `${names[m.tool_call_id] || "tool"} → ${m.content}`); continue; }
      out = bubble(pane, m.role, m.content);
      if (m.role !== "assistant") continue;
      Object.assign(out.dataset, { model: pane.select.value, done: "true" });
      for (const c of m.tool_calls || []) { names[c.id] = c.function.name; out.append(callLine(c)); }
      out.append(...answerNotes(m));
    }
    const last = history[history.length - 1];
    if (last && last.tool_calls && last.tool_calls.length) { pane.pending = true; out.append(resultsForm(pane, last.tool_calls)); }
  };
  savedPanes.forEach((k, i) => {
    if (panes[i] && k.model === panes[i].select.value && Array.isArray(k.history) && k.history.length) replay(panes[i], k.history);
  });
  saveChat();
  return () => { left = true; if (controller) controller.abort(); };
}

// ------------------------------------------------------------------------------------------ Models

async function viewModels(root) {
  root.append(pageHead("Models", "Fine-tuned models of this project. Each is served at /v1/chat/completions under its name."));
  const card = h("div", { class: "card flush" });
  root.append(card);
  const load = async () => {
    const { models } = await tunedModels();
    if (!models.length) {
      put(card, h("div", { class: "empty" }, h("p", {}, "No fine-tuned models yet: a job that succeeds creates one."),
        h("a", { class: "btn primary", href: "#/jobs/new" }, "Create a job")));
      return;
    }
    put(card, h("div", { class: "table-wrap" }, h("table", { class: "stack-narrow", "data-test": "models-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", {}, "Base"), h("th", { class: "hide-narrow" }, "Job"),
        h("th", { class: "num" }, "On disk"), h("th", { class: "hide-narrow" }, "Created"), h("th", {}, ""))),
      h("tbody", {}, models.map((m) => h("tr", { "data-model": m.id },
        h("td", { class: "mono small break grow" }, m.id,
          m.checkpoints && m.checkpoints.length ? h("div", { class: "muted small" }, `${m.checkpoints.length} checkpoint${m.checkpoints.length === 1 ? "" : "s"}`
            + ` · ${fmt.bytes(m.checkpoints.reduce((n, c) => n + (c.size_bytes || 0), 0))} on disk`) : null),
        h("td", { class: "nowrap" }, m.base || "—"),
        h("td", { class: "hide-narrow" }, m.job_id ? h("a", { class: "mono small nowrap", href: `#/jobs/${m.job_id}` }, m.job_id) : "—"),
        h("td", { class: "num nowrap" }, fmt.bytes(m.size_bytes)),
        h("td", { class: "nowrap hide-narrow" }, fmt.time(m.created)),
        h("td", { class: "nowrap push" }, h("div", { class: "row end actions" },
          copyButton(m.id, "Copy"),
          h("a", { class: "btn small", href: `#/playground?model=${encodeURIComponent(m.id)}` }, "Chat"),
          h("a", { class: "btn small", href: `#/jobs/new?model=${encodeURIComponent(m.id)}`, "data-action": "train-more",
            title: "A job that goes on training this model on new data" }, "Train more"),
          h("button", { type: "button", class: "btn small danger", "data-action": "delete", onclick: async () => {
            if (!confirm(`Delete ${m.id}? It stops answering under this name. Its job's checkpoints stay callable, and the run folder stays on the server's disk.`)) return;
            try {
              await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: "DELETE" });
              toast("Model deleted");
              await load();
            } catch (e) { toast(e.message, true); }
          } }, "Delete")))))))));
  };
  await load();
}

// -------------------------------------------------------------------------------------------- monitor

/** Text cut to n characters, "…" where cut. */
const clip = (text, n) => (text.length > n ? `${text.slice(0, n)}…` : text);

/** The tools a stored completion's request offered the model, as one line: "tools: get_weather, search",
 * and tool_choice where it is not the default ("auto", or none given). Nothing when it offered none: a
 * reviewer rating a tool call needs to see what the model could call (the training file has them too). */
function offeredTools(c) {
  const names = (c.tools || []).map((t) => (t.function && t.function.name) || t.type);
  if (!names.length) return null;
  const choice = c.tool_choice;
  const forced = !choice || choice === "auto" ? null
    : typeof choice === "string" ? choice : (choice.function && choice.function.name) || JSON.stringify(choice);
  return h("div", { class: "muted", "data-test": "stored-tools" }, `tools: ${names.join(", ")}`,
    forced && ` · tool_choice: ${forced}`);
}

/** Good / Needs work buttons that rate a stored completion: the rating is its metadata (the Monitor's
 * filter rating=good picks the training examples). The update replaces the whole metadata (as at
 * OpenAI), so the keys it had are sent again; `onRated` hears the new metadata. */
function ratingButtons(id, metadata, onRated) {
  const row = h("span", { class: "rating", "data-completion": id });
  if (metadata.rating) row.dataset.rating = metadata.rating;
  const rate = async (value, btn) => {
    try {
      const done = await api(`/v1/chat/completions/${id}`, { method: "POST", json: { metadata: { ...metadata, rating: value } } });
      metadata = done.metadata || {};
      for (const b of row.querySelectorAll("button")) b.classList.toggle("active", b === btn);
      row.dataset.rating = value;
      if (onRated) onRated(metadata);
    } catch (e) { toast(e.message, true); }
  };
  for (const [value, label] of [["good", "Good"], ["bad", "Needs work"]]) {
    const btn = h("button", { type: "button", class: `btn small ghost${metadata.rating === value ? " active" : ""}`, "data-rate": value }, label);
    btn.addEventListener("click", () => rate(value, btn));
    row.append(btn);
  }
  return row;
}

/** A message's text: content as a string, or the text of its parts. */
const messageText = (m) => (typeof m.content === "string" ? m.content
  : (m.content || []).filter((p) => p.type === "text").map((p) => p.text).join(" "));

/** What a stored completion answered: the request's last user message (a rater judges the answer by
 * the question), or its last message with its role when the turn was no user's (a tool result). */
async function storedQuestion(id) {
  const messages = (await api(`/v1/chat/completions/${id}/messages?order=desc&limit=100`)).data;
  const user = messages.find((m) => m.role === "user");
  if (user) return clip(messageText(user), 160);
  return messages.length ? `${messages[0].role}: ${clip(messageText(messages[0]), 160)}` : "—";
}

/** A stored completion's first answer: its text, and each tool call as name(arguments) - an answer of
 * tool calls alone has no text, and showed as an empty cell. An answer cut at max_tokens says so: the
 * list shows it, but a training file leaves it out (it would teach stopping mid-sentence). */
function storedAnswer(choice) {
  const message = (choice && choice.message) || {};
  const text = message.content || "";
  const calls = message.tool_calls || [];
  return [
    text && h("div", {}, clip(text, 120)),
    calls.map((t) => h("div", { class: "mono", "data-test": "stored-call" },
      `${(t.function && t.function.name) || t.type}(${clip((t.function && t.function.arguments) || "", 120)})`)),
    !text && !calls.length && h("span", { class: "muted" }, "—"),
    choice && choice.finish_reason === "length"
      && h("div", { class: "muted", "data-test": "stored-cut" }, "cut at max tokens: not taken into training files"),
  ];
}

/** Turns of asking: `next()` starts one and returns a check that says whether it is still the latest -
 * a list answered after a newer one was asked for (a slow first load, a filter changed) is dropped. */
function turns() {
  let asked = 0;
  return { next() { const mine = ++asked; return () => mine === asked; } };
}

/** Served traffic (usage per model) and stored completions, which can become the next training file. */
async function viewMonitor(root) {
  root.append(pageHead("Monitor", "Traffic this project's models served, and the completions kept with store: true - the way back to training data."));
  const days = h("select", { id: "usage-days", "aria-label": "Period", style: "width:auto" },
    h("option", { value: "1" }, "Last 24 hours"), h("option", { value: "7" }, "Last 7 days"),
    h("option", { value: "30" }, "Last 30 days"), h("option", { value: "" }, "All time"));
  const usageBody = h("div", { "data-test": "usage" });
  root.append(h("div", { class: "card" }, h("div", { class: "row between" }, h("h2", {}, "Traffic"), days), usageBody));
  const usageTurns = turns();  // (an earlier period's answer arriving late is dropped)
  const loadUsage = async () => {
    const q = days.value ? `?days=${days.value}` : "";
    const latest = usageTurns.next();
    const usage = await api(`/v1/tuneforge/usage${q}`);
    if (!latest()) return;
    const rows = usage.data;
    // the dashboard's own calls (files, jobs, models) are traffic too, but not what this page is about
    if (!rows.some((r) => r.model)) {
      const other = rows.reduce((n, r) => n + r.requests, 0);
      put(usageBody, h("p", { class: "muted", "data-test": "no-model-traffic" }, "No model was asked in this period",
        other ? ` (${fmt.int(other)} other API call${other === 1 ? "" : "s"}: files, jobs, models).` : "."));
      return;
    }
    const chartSlot = h("div", {});
    // the quality signals of the answers kept (store: true): their ratings, and answers cut at max tokens
    const kept = Object.fromEntries((usage.quality || []).map((q) => [q.model, q]));
    const quality = (model) => {
      const q = kept[model];
      if (!q) return h("span", { class: "muted" }, "—");
      const rated = Object.entries(q.ratings).map(([r, n]) => `${fmt.int(n)} ${r}`);
      return [`${fmt.int(q.kept)} kept`, ...rated, q.cut_at_max_tokens ? `${fmt.int(q.cut_at_max_tokens)} cut at max tokens` : null]
        .filter(Boolean).join(" · ");
    };
    put(usageBody, chartSlot, h("div", { class: "table-wrap" }, h("table", { class: "stack-narrow", "data-test": "usage-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", { class: "num" }, "Requests"), h("th", { class: "num" }, "Prompt tokens"),
        h("th", { class: "num" }, "Completion tokens"), h("th", { class: "num" }, "Errors"), h("th", { class: "num" }, "Mean latency"),
        h("th", { class: "num" }, "p95 latency"), h("th", {}, "Kept answers"))),
      h("tbody", {}, rows.map((r) => h("tr", { "data-model": r.model || "" },
        r.model ? h("td", { class: "mono small break grow" }, r.model) : h("td", { class: "muted small grow" }, "other calls (files, jobs, models)"),
        h("td", { class: "num", title: "requests" }, `${fmt.int(r.requests)} req`),
        h("td", { class: "num hide-narrow" }, fmt.int(r.prompt_tokens)), h("td", { class: "num hide-narrow" }, fmt.int(r.completion_tokens)),
        h("td", { class: "num nowrap", title: "errors (a stream the client stopped is none: counted apart)" }, `${fmt.int(r.errors)} err`,
          r.stopped_by_client ? h("span", { class: "muted", "data-test": "stopped" }, ` · ${fmt.int(r.stopped_by_client)} stopped`) : null), h("td", { class: "num hide-narrow nowrap" }, `${fmt.int(Math.round(r.mean_latency_ms))} ms`),
        h("td", { class: "num nowrap", title: "95th-percentile latency" }, `p95 ${fmt.int(Math.round(r.p95_latency_ms))} ms`),
        h("td", { class: "small", "data-test": "quality", title: "answers kept with store: true, by rating" }, r.model ? quality(r.model) : null)))))),
      h("p", { class: "small muted", "data-test": "openai-cost" }, "The same tokens at OpenAI's prices for fine-tuned models: ",
        usage.openai_cost.map((c) => `${c.model} ${fmt.usd(c.usd)}`).join(" · "), " (pricing.json, a rough guide)."));
    const draw = (width) => put(chartSlot, usageChart({ buckets: usage.timeline, bucketSeconds: usage.bucket_seconds, width }));
    draw(520);
    const measured = chartSlot.firstChild.clientWidth;
    if (measured && Math.abs(measured - 520) > 8) draw(measured);  // labels keep their size on any window
  };
  days.addEventListener("change", () => loadUsage().catch((e) => toast(e.message, true)));

  const model = h("input", { type: "text", id: "stored-model", placeholder: "any model", autocomplete: "off" });
  const meta = h("input", { type: "text", id: "stored-metadata", placeholder: "e.g. rating=good", autocomplete: "off" });
  const storedBody = h("div", { "data-test": "stored" });
  const made = h("div", { "data-test": "made-file" });
  const query = () => {
    const q = new URLSearchParams();
    if (model.value.trim()) q.set("model", model.value.trim());
    for (const pair of meta.value.split(",").map((x) => x.trim()).filter(Boolean)) {
      const at = pair.indexOf("=");
      if (at <= 0) throw new Error(`Metadata filters are key=value pairs; "${pair}" is not one.`);
      q.set(`metadata[${pair.slice(0, at).trim()}]`, pair.slice(at + 1).trim());
    }
    return q;
  };
  const storedTurns = turns();  // (the page's first, unfiltered list answered after a filter's is dropped)
  const loadStored = async (filter = query()) => {
    const q = new URLSearchParams(filter);
    q.set("limit", "100");
    const latest = storedTurns.next();
    const rows = (await api(`/v1/chat/completions?${q}`)).data;
    if (!latest()) return;
    if (!rows.length) { put(storedBody, h("p", { class: "muted" }, "No stored completion matches. Ask with store: true (and metadata) to keep one.")); return; }
    const metaText = (metadata) => Object.entries(metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "—";
    const row = (c) => {
      const question = h("td", { class: "small break grow", "data-test": "stored-question" }, h("span", { class: "muted" }, "…"));
      storedQuestion(c.id).then((text) => put(question, text), (e) => put(question, h("span", { class: "muted" }, e.message)));
      const shown = h("div", { "data-test": "stored-metadata" }, metaText(c.metadata));
      return h("tr", { "data-id": c.id },
        h("td", { class: "nowrap" }, fmt.time(c.created)), h("td", { class: "mono small break grow" }, c.model),
        question,
        h("td", { class: "small break grow", "data-test": "stored-answer" }, offeredTools(c), storedAnswer(c.choices[0])),
        h("td", { class: "small" }, shown, ratingButtons(c.id, c.metadata || {}, (m) => put(shown, metaText(m)))));
    };
    put(storedBody, h("div", { class: "table-wrap" }, h("table", { class: "stack-narrow", "data-test": "stored-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Created"), h("th", {}, "Model"), h("th", {}, "Question"), h("th", {}, "Answer"),
        h("th", {}, "Metadata · rating"))),
      h("tbody", {}, rows.map(row)))));
  };
  const makeFile = async () => {
    try {
      const filter = query();
      await loadStored(filter);  // the list shows what the file is made of
      const file = await api(`/v1/tuneforge/stored_completions/training_file?${filter}`, { method: "POST" });
      put(made, h("div", { class: "callout ok" }, h("div", {}, h("strong", {}, `Training file ${file.id} created`),
        " from the completions listed. ", h("a", { href: `#/upload/${file.id}` }, "Review it"), " · ",
        h("a", { href: `#/jobs/new?file=${file.id}`, "data-test": "train-on-it" }, "Fine-tune on it →"))));
    } catch (e) { put(made, h("div", { class: "callout bad" }, h("div", {}, e.message))); }
  };
  const filter = () => { put(made); loadStored().catch((e) => toast(e.message, true)); };
  for (const input of [model, meta]) input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") filter(); });
  root.append(h("div", { class: "card" }, h("h2", {}, "Stored completions"),
    h("div", { class: "form-grid three" },
      h("label", { class: "field" }, h("span", {}, "Model"), model),
      h("label", { class: "field" }, h("span", {}, "Metadata ", h("span", { class: "hint" }, "key=value, comma-separated")), meta),
      h("div", { class: "row end" },
        h("button", { type: "button", class: "btn", id: "stored-filter", onclick: filter }, "Filter"),
        h("button", { type: "button", class: "btn primary", id: "stored-make-file", onclick: makeFile }, "Make a training file"))),
    made, storedBody));
  await Promise.all([loadUsage(), loadStored()]);
  const timer = setInterval(() => loadUsage().catch(() => {}), 30000);  // traffic keeps coming
  return () => clearInterval(timer);
}

// -------------------------------------------------------------------------------------------- router

let cleanup = null;
let generation = 0;

async function route() {
  const hash = location.hash.replace(/^#\/?/, "") || "jobs";
  const [pathPart, query] = hash.split("?");
  const parts = pathPart.split("/").map(decodeURIComponent);
  if (!["jobs", "upload", "playground", "models", "monitor"].includes(parts[0])) {
    location.replace("#/jobs");  // an unknown page: the jobs list, under its own address
    return;
  }
  const params = new URLSearchParams(query || "");
  if (cleanup) { try { cleanup(); } catch { /* ignore */ } cleanup = null; }
  const gen = ++generation;
  const view = document.getElementById("view");
  const root = h("div", { class: "page", "data-page": parts[0] });
  put(view, root);
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === parts[0]);
  const titles = { jobs: "Fine-tuning", upload: "Upload", playground: "Playground", models: "Models", monitor: "Monitor" };
  document.title = `${titles[parts[0]] || "tuneforge"} · tuneforge`;
  if (!auth.key) {
    root.append(h("div", { class: "card" }, h("div", { class: "callout info" }, h("div", {},
      h("strong", {}, "Connect with an API key"), "This dashboard talks to the server with your API key. ",
      h("button", { type: "button", class: "btn small primary", onclick: () => openKeyDialog() }, "Enter API key")))));
    openKeyDialog();
    return;
  }
  try {
    let done;
    if (parts[0] === "jobs" && parts[1] === "new") done = await viewCreate(root, params);
    else if (parts[0] === "jobs" && parts[1]) done = await viewJob(root, params, parts[1]);
    else if (parts[0] === "upload") done = await viewUpload(root, params, parts[1]);
    else if (parts[0] === "playground") done = await viewPlayground(root, params);
    else if (parts[0] === "models") done = await viewModels(root);
    else if (parts[0] === "monitor") done = await viewMonitor(root);
    else done = await viewJobs(root);
    if (gen !== generation) { if (typeof done === "function") done(); return; }
    cleanup = typeof done === "function" ? done : null;
  } catch (e) {
    if (gen === generation) root.append(errorCard(e));
  }
}

setupKeyDialog();
renderKeyButton();
window.addEventListener("hashchange", route);
route();
