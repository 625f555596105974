// The tradebus dashboard. Event handlers only update plain objects and mark what changed;
// one requestAnimationFrame pass per frame writes the DOM and draws the charts, so the page
// keeps up with 1,000 events/s.
//
// Query parameters: ws=<url> (only this page's own /ws is accepted), stale=<seconds> (no
// event from a source for this long shows it stale, with its price cards and decisions;
// default 15), forget=<seconds> (a source not seen for this long leaves the System panel;
// default 300), window=<seconds> (chart span; default 300),
// types=a,b and symbols=X,Y (initial topic selection; default everything), token=<bearer
// token> when the bridge requires one.

import { TradebusClient, patternMatches } from "./tradebus.js";

const params = new URLSearchParams(location.search);
const STALE_AFTER_MS = positiveNumber(params.get("stale"), 15) * 1000;
const FORGET_AFTER_MS = Math.max(positiveNumber(params.get("forget"), 300) * 1000, STALE_AFTER_MS);
const WINDOW_MS = positiveNumber(params.get("window"), 300) * 1000;
const MAX_DECISIONS = 100;

const TYPES = [
  { type: "market_data", label: "market data", keyed: true },
  { type: "position_update", label: "positions", keyed: true },
  { type: "ai_decision", label: "AI decisions", keyed: false },
  { type: "trading_decision", label: "trading decisions", keyed: false },
  { type: "system_status", label: "system status", keyed: false },
  { type: "error", label: "bot errors", keyed: false },
];
const KEY_RE = /^[A-Za-z0-9_\-/:+@#=~]{1,128}$/;

function positiveNumber(text, fallback) {
  const value = Number(text);
  return text !== null && Number.isFinite(value) && value > 0 ? value : fallback;
}

function ownWsUrl() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

// A link such as /?ws=wss://elsewhere/ws would send this tab's token, and show that
// bridge's events as this one's: the page talks to its own bridge only.
function foreignWsParameter() {
  const given = params.get("ws");
  if (!given) return null;
  let url;
  try {
    url = new URL(given, location.href);
  } catch {
    return given;
  }
  // a relative ?ws=/ws resolves against the page's http(s) address
  if (url.protocol === "http:" || url.protocol === "https:") {
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  }
  url.search = "";
  url.hash = "";
  return url.href === ownWsUrl() ? null : given;
}

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// toLocaleString builds a formatter per call; at 1,000 events/s that showed in profiles.
const numberFormats = [2, 4, 6].map(
  (digits) => new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits }),
);
const priceFormat = (value) => {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  const magnitude = Math.abs(value);
  return numberFormats[magnitude >= 1000 ? 0 : magnitude >= 1 ? 1 : 2].format(value);
};
const moneyFormat = (value) => numberFormats[0].format(value);
const signed = (value, text) => (value > 0 ? `+${text}` : text);
const timeFormat = new Intl.DateTimeFormat("en-GB", {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});
const clockTime = (iso) => {
  const ms = Date.parse(iso);
  return Number.isNaN(ms) ? "" : timeFormat.format(ms);
};

// ------------------------------------------------------------------------------ model

const model = {
  symbols: new Map(), // symbol -> Series
  pendingDecisions: [], // received since the last frame, oldest first
  positions: new Map(), // symbol -> {data, source}
  sources: new Map(), // source -> see touchSource()
  staleSources: new Set(), // as last rendered: their price cards and decisions are marked
  connection: { state: "idle", detail: "" },
  eventsThisSecond: 0,
  latencies: [],
  unrecovered: 0,
  lastServerError: null,
  dirty: { positions: false, connection: true, selector: true, notices: false },
};

class Series {
  constructor(symbol) {
    this.symbol = symbol;
    this.times = [];
    this.prices = [];
    this.head = 0; // index of the oldest point still inside the window
    this.last = null;
    this.source = ""; // who published the latest price: its card is stale when it is
    this.changed = true;
    this.view = null; // DOM nodes of its card, made at first render
  }

  push(time, price) {
    // A snapshot or a late event can be older than what is drawn: keep the line monotonic.
    const n = this.times.length;
    if (n > this.head && time < this.times[n - 1]) time = this.times[n - 1];
    this.times.push(time);
    this.prices.push(price);
    this.last = price;
    this.changed = true;
    // Rendering trims too, but animation frames stop in background tabs.
    if (this.times.length % 1024 === 0) this.trim(time);
  }

  trim(now) {
    const cutoff = now - WINDOW_MS;
    // Keep one point before the window so the line enters from the left edge.
    while (this.head < this.times.length - 2 && this.times[this.head + 1] < cutoff) this.head += 1;
    if (this.head > 4096 && this.head * 2 > this.times.length) {
      this.times = this.times.slice(this.head);
      this.prices = this.prices.slice(this.head);
      this.head = 0;
    }
  }

  get first() {
    return this.times.length > this.head ? this.prices[this.head] : null;
  }
}

// ------------------------------------------------------------------ topic selection

const selection = {
  types: new Set(
    (params.get("types") ?? TYPES.map((t) => t.type).join(","))
      .split(",")
      .filter((t) => TYPES.some((known) => known.type === t)),
  ),
  allSymbols: !params.get("symbols"),
  symbols: new Set((params.get("symbols") ?? "").split(",").filter((s) => KEY_RE.test(s))),
  known: new Set(),
};
for (const symbol of selection.symbols) selection.known.add(symbol);

function wantedPatterns() {
  const patterns = [];
  for (const { type, keyed } of TYPES) {
    if (!selection.types.has(type)) continue;
    if (!keyed || selection.allSymbols) patterns.push(type);
    else for (const symbol of selection.symbols) patterns.push(`${type}.${symbol}`);
  }
  return patterns;
}

// ?token=... is moved out of the address bar (history, screenshots, shared links) into this
// tab's session storage, so a reload still works.
function takeToken() {
  const given = params.get("token");
  if (given) {
    sessionStorage.setItem("tradebus.token", given);
    const clean = new URL(location.href);
    clean.searchParams.delete("token");
    history.replaceState(null, "", clean);
  }
  return sessionStorage.getItem("tradebus.token") ?? undefined;
}

const refusedWs = foreignWsParameter();
const client = new TradebusClient({ url: ownWsUrl(), token: takeToken() });
window.tradebus = client; // for the console and for tests

// The selector changes what the bridge sends (subscribe/unsubscribe on the wire); the page
// never filters events itself.
let applied = copyOf(selection); // the selection last confirmed by the bridge

function applySelection() {
  const held = new Set(client.patterns());
  const added = wantedPatterns().filter((p) => !held.has(p));
  // Reconciles with the selection as it is when the bridge answers: the user may have
  // changed it again meanwhile.
  const finish = () => {
    const wanted = new Set(wantedPatterns());
    const removed = client.patterns().filter((p) => !wanted.has(p));
    if (removed.length) {
      client.unsubscribe(removed);
      forgetUnwanted(wanted);
    }
    applied = copyOf(selection);
    model.dirty.selector = true;
  };
  // Subscribe before unsubscribing so a topic moving from "market_data" to
  // "market_data.BTC-USD" never has a moment without a subscription; if the bridge refuses
  // (too many patterns, a token's limits), keep what was there and show the selection that
  // is really in force (the footer shows the bridge's reason).
  if (added.length) {
    client.subscribe(added).ready.then(finish, () => {
      Object.assign(selection, copyOf(applied));
      model.dirty.selector = true;
    });
  } else {
    finish();
  }
  model.dirty.selector = true;
}

function copyOf(saved) {
  return { types: new Set(saved.types), allSymbols: saved.allSymbols, symbols: new Set(saved.symbols) };
}

// Panels show only what the selection still receives, so a stopped type does not look
// frozen-but-live.
function forgetUnwanted(wanted) {
  const receives = (topic) => [...wanted].some((p) => patternMatches(p, topic));
  for (const [symbol, series] of model.symbols) {
    if (!receives(`market_data.${symbol}`)) {
      series.view?.card.remove();
      model.symbols.delete(symbol);
    }
  }
  for (const symbol of model.positions.keys()) {
    if (!receives(`position_update.${symbol}`)) {
      model.positions.delete(symbol);
      model.dirty.positions = true;
    }
  }
}

function learnSymbol(symbol) {
  if (selection.known.has(symbol)) return;
  selection.known.add(symbol);
  model.dirty.selector = true;
}

// ------------------------------------------------------------------- event handlers

function symbolOf(event) {
  const dot = event.topic.indexOf(".");
  if (dot > 0) return event.topic.slice(dot + 1);
  const symbol = event.data?.symbol;
  return typeof symbol === "string" && KEY_RE.test(symbol) ? symbol : null;
}

client.on("*", (event, info) => {
  const now = Date.now();
  const source = touchSource(event.source);
  if (!info.snapshot) {
    source.lastEventAt = now;
    model.eventsThisSecond += 1;
    const sent = Date.parse(event.timestamp);
    if (!Number.isNaN(sent)) model.latencies.push(now - sent);
  } else {
    const sent = Date.parse(event.timestamp);
    if (!Number.isNaN(sent)) source.lastEventAt = Math.max(source.lastEventAt, sent);
  }
});

client.on("market_data", (event, info) => {
  const symbol = symbolOf(event);
  const price = Number(event.data?.price);
  if (!symbol || !Number.isFinite(price)) return;
  learnSymbol(symbol);
  let series = model.symbols.get(symbol);
  if (!series) model.symbols.set(symbol, (series = new Series(symbol)));
  const stamped = Date.parse(event.timestamp);
  series.push(info.snapshot && !Number.isNaN(stamped) ? stamped : Date.now(), price);
  series.source = event.source;
});

function onDecision(event) {
  const data = event.data ?? {};
  const risk = data.risk_analysis ?? {};
  const decision = {
    kind: event.type === "ai_decision" ? "AI" : "trade",
    type: event.type,
    action: String(data.action ?? "HOLD").toUpperCase(),
    confidence: Number(data.confidence),
    reasoning: String(data.reasoning ?? ""),
    price: Number(data.price),
    quantity: Number(data.quantity),
    stopLoss: Number(risk.stop_loss),
    takeProfit: Number(risk.take_profit),
    requestId: data.request_id ?? "",
    symbol: data.symbol ?? "",
    timestamp: event.timestamp,
    source: event.source,
  };
  model.pendingDecisions.push(decision);
  if (model.pendingDecisions.length > MAX_DECISIONS) model.pendingDecisions.shift();
}
client.on("ai_decision", onDecision);
client.on("trading_decision", onDecision);

client.on("position_update", (event) => {
  const symbol = symbolOf(event);
  if (!symbol) return;
  learnSymbol(symbol);
  model.positions.set(symbol, { data: event.data ?? {}, source: event.source });
  model.dirty.positions = true;
});

client.on("system_status", (event) => {
  const source = touchSource(event.source);
  const data = event.data ?? {};
  source.status = String(data.status ?? "");
  source.health = data.health;
  source.errors = Array.isArray(data.errors) ? data.errors : [];
});

// The bot's own error reports (publish_error): the latest one stays next to its source.
client.on("error", (event) => {
  const source = touchSource(event.source);
  const data = event.data ?? {};
  source.lastError = `${data.level ?? "ERROR"} ${clockTime(event.timestamp)}: ${data.message ?? ""}`;
});

function touchSource(name) {
  let source = model.sources.get(name);
  if (!source) {
    source = {
      firstSeenAt: Date.now(),
      lastEventAt: 0,
      bridge: null,
      status: "",
      health: undefined,
      errors: [],
      lastError: "",
      node: null,
    };
    model.sources.set(name, source);
  }
  return source;
}

client.onSourceStatus(({ source, status, last_seen: lastSeen }) => {
  const entry = touchSource(source);
  entry.bridge = { status, at: Date.now() };
  const seen = Date.parse(lastSeen);
  if (!Number.isNaN(seen)) entry.lastEventAt = Math.max(entry.lastEventAt, seen);
});

client.onState(({ state, attempt, delayMs, code, reason }) => {
  let detail = state;
  if (state === "disconnected") {
    detail = `disconnected${code ? ` (${code}${reason ? ` ${reason}` : ""})` : ""}, retry in ${(delayMs / 1000).toFixed(1)} s`;
  } else if (state === "reconnecting") {
    detail = `reconnecting (attempt ${attempt})`;
  } else if (state === "open") {
    detail = "connected";
  }
  model.connection = { state, detail };
  model.dirty.connection = true;
});

client.onSnapshot(({ mode, recovered }) => {
  if (mode === "resume" && !recovered) {
    model.unrecovered += 1;
    model.dirty.notices = true;
  }
});

client.onServerError(({ code, message }) => {
  model.lastServerError = `${code}: ${message}`;
  model.dirty.notices = true;
});

// -------------------------------------------------------------------------- rendering

function sourceState(source, now) {
  if (source.bridge && source.bridge.status === "stale" && source.bridge.at >= source.lastEventAt) {
    return "stale";
  }
  return now - source.lastEventAt > STALE_AFTER_MS ? "stale" : "live";
}

function renderSelector() {
  const types = $("type-toggles");
  if (!types.childElementCount) {
    for (const { type, label } of TYPES) {
      const box = el("input", { type: "checkbox", "data-testid": "type-toggle", "data-type": type });
      box.checked = selection.types.has(type);
      box.addEventListener("change", () => {
        if (box.checked) selection.types.add(type);
        else selection.types.delete(type);
        applySelection();
      });
      types.append(el("label", { class: "toggle" }, box, ` ${label}`));
    }
  }
  const symbols = $("symbol-toggles");
  const shown = new Set([...symbols.querySelectorAll("input")].map((box) => box.dataset.symbol));
  for (const symbol of [...selection.known].sort()) {
    if (shown.has(symbol)) continue;
    const box = el("input", { type: "checkbox", "data-testid": "symbol-toggle", "data-symbol": symbol });
    box.addEventListener("change", () => {
      if (selection.allSymbols) {
        // Leaving "all": keep every other known symbol.
        selection.allSymbols = false;
        selection.symbols = new Set(selection.known);
      }
      if (box.checked) selection.symbols.add(symbol);
      else selection.symbols.delete(symbol);
      applySelection();
    });
    symbols.append(el("label", { class: "toggle" }, box, ` ${symbol}`));
  }
  for (const box of types.querySelectorAll("input")) box.checked = selection.types.has(box.dataset.type);
  $("symbol-all").checked = selection.allSymbols;
  for (const box of symbols.querySelectorAll("input")) {
    box.checked = selection.allSymbols || selection.symbols.has(box.dataset.symbol);
  }
  $("wire-patterns").textContent = client.patterns().join(", ") || "(nothing)";
}

$("symbol-all").addEventListener("change", (event) => {
  selection.allSymbols = event.target.checked;
  if (!selection.allSymbols) selection.symbols = new Set(selection.known);
  applySelection();
});

$("symbol-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("symbol-input");
  const symbol = input.value.trim();
  if (!KEY_RE.test(symbol)) return;
  input.value = "";
  selection.known.add(symbol);
  if (!selection.allSymbols) selection.symbols.add(symbol);
  applySelection();
});

function priceCard(series) {
  const price = el("span", { class: "price", "data-testid": "price" });
  const change = el("span", { class: "change", "data-testid": "change" });
  const canvas = el("canvas", { "data-testid": "chart" });
  const card = el(
    "article",
    { class: "price-card", "data-testid": "price-card", "data-symbol": series.symbol },
    el("header", {}, el("span", { class: "symbol", text: series.symbol }), price, change),
    canvas,
  );
  const cards = $("price-cards");
  const after = [...cards.querySelectorAll(".price-card")].find((c) => c.dataset.symbol > series.symbol);
  cards.insertBefore(card, after ?? null);
  const ctx = canvas.getContext("2d");
  return { card, price, change, canvas, ctx, width: 0, height: 0, drawnAt: 0, msPerPixel: 0 };
}

function drawChart(series, view, now) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(view.canvas.clientWidth * ratio);
  const height = Math.round(view.canvas.clientHeight * ratio);
  if (width === 0 || height === 0) return;
  if (view.width !== width || view.height !== height) {
    view.canvas.width = view.width = width;
    view.canvas.height = view.height = height;
  }
  const { ctx } = view;
  const { times, prices, head } = series;
  ctx.clearRect(0, 0, width, height);
  const n = times.length;
  if (n - head < 1) return;
  let low = Infinity;
  let high = -Infinity;
  for (let i = head; i < n; i += 1) {
    if (prices[i] < low) low = prices[i];
    if (prices[i] > high) high = prices[i];
  }
  const pad = (high - low) * 0.1 || Math.abs(high) * 0.001 || 1;
  low -= pad;
  high += pad;
  const labelWidth = 70 * ratio;
  // Enough decimals to tell the three grid levels apart, no more.
  const labelDigits = Math.min(6, Math.max(0, Math.ceil(-Math.log10((high - low) / 10))));
  const plotWidth = width - labelWidth;
  // A young series spans from its first point (at least a minute) instead of a mostly
  // empty window.
  const span = Math.min(WINDOW_MS, Math.max(60000, now - times[head]));
  const start = now - span;
  const x = (t) => Math.max(0, ((t - start) / span) * plotWidth);
  view.msPerPixel = span / plotWidth;
  const y = (p) => height - ((p - low) / (high - low)) * height;

  ctx.font = `${11 * ratio}px system-ui, sans-serif`;
  ctx.fillStyle = "#8391a0";
  ctx.strokeStyle = "#26313d";
  ctx.lineWidth = 1;
  for (const fraction of [0.2, 0.5, 0.8]) {
    const level = low + (high - low) * fraction;
    const yy = Math.round(y(level)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(0, yy);
    ctx.lineTo(plotWidth, yy);
    ctx.stroke();
    ctx.fillText(level.toFixed(labelDigits), plotWidth + 6 * ratio, yy + 4 * ratio);
  }

  // One vertical segment per pixel column (first, min, max, last): cost stays bounded by the
  // canvas width however many points the window holds.
  ctx.beginPath();
  let column = -1;
  let first = 0;
  let min = 0;
  let max = 0;
  let last = 0;
  let started = false;
  const flush = () => {
    if (column < 0) return;
    if (!started) {
      ctx.moveTo(column, y(first));
      started = true;
    } else {
      ctx.lineTo(column, y(first));
    }
    if (min !== max) {
      ctx.lineTo(column, y(min));
      ctx.lineTo(column, y(max));
    }
    ctx.lineTo(column, y(last));
  };
  for (let i = head; i < n; i += 1) {
    const col = Math.round(x(times[i]));
    const p = prices[i];
    if (col !== column) {
      flush();
      column = col;
      first = min = max = last = p;
    } else {
      if (p < min) min = p;
      if (p > max) max = p;
      last = p;
    }
  }
  flush();
  ctx.lineTo(plotWidth, y(last)); // the price holds until now
  const rising = series.last >= series.first;
  ctx.strokeStyle = rising ? "#2fbf71" : "#e5484d";
  ctx.lineWidth = 1.5 * ratio;
  ctx.stroke();
}

function renderPrices(now) {
  $("prices-empty").hidden = model.symbols.size > 0;
  for (const series of model.symbols.values()) {
    series.trim(now);
    if (!series.view) series.view = priceCard(series);
    const { view } = series;
    if (series.changed) {
      series.changed = false;
      series.needsDraw = true;
      view.card.dataset.stale = String(model.staleSources.has(series.source));
      view.price.textContent = priceFormat(series.last);
      const first = series.first;
      if (first !== null && first !== 0) {
        const delta = series.last - first;
        view.change.textContent = `${signed(delta, priceFormat(delta))} (${signed(delta, ((delta / first) * 100).toFixed(2))}%)`;
        view.change.className = `change ${delta > 0 ? "up" : delta < 0 ? "down" : ""}`;
      }
    }
    // Redraw on new data, or when the time axis has moved by a pixel.
    if (series.needsDraw || now - view.drawnAt >= view.msPerPixel) {
      series.needsDraw = false;
      view.drawnAt = now;
      drawChart(series, view, now);
    }
  }
}

function decisionNode(d) {
  const confidence = Number.isFinite(d.confidence) ? Math.round(d.confidence * 100) : null;
  const numbers = el("div", { class: "numbers" });
  const addNumber = (label, value, testid, formatter = priceFormat) => {
    if (!Number.isFinite(value)) return;
    numbers.append(`${label} `, el("b", { "data-testid": testid, text: formatter(value) }), "  ");
  };
  addNumber("price", d.price, "decision-price");
  addNumber("qty", d.quantity, "decision-quantity", (v) => String(v));
  addNumber("stop loss", d.stopLoss, "stop-loss");
  addNumber("take profit", d.takeProfit, "take-profit");
  const head = el(
    "div",
    { class: "head" },
    el("span", { class: "kind", text: d.kind }),
    el("span", { class: `action ${d.action}`, "data-testid": "action", text: d.action }),
  );
  if (d.symbol) head.append(el("span", { text: d.symbol }));
  if (confidence !== null) {
    const bar = el("span", { class: "confidence-bar" }, el("i", { style: `width:${confidence}%` }));
    head.append(bar, el("span", { "data-testid": "confidence", text: `${confidence}%` }));
  }
  head.append(el("span", { class: "time", text: clockTime(d.timestamp) }));
  return el(
    "li",
    {
      class: "decision",
      "data-testid": "decision",
      "data-type": d.type,
      "data-action": d.action,
      "data-request-id": String(d.requestId),
      "data-source": d.source,
      "data-stale": String(model.staleSources.has(d.source)),
    },
    head,
    numbers,
    el("div", { class: "reasoning", "data-testid": "reasoning", text: d.reasoning }),
  );
}

function renderDecisions() {
  if (model.pendingDecisions.length === 0) return;
  const feed = $("decision-feed");
  const fragment = document.createDocumentFragment();
  for (let i = model.pendingDecisions.length - 1; i >= 0; i -= 1) {
    fragment.append(decisionNode(model.pendingDecisions[i]));
  }
  model.pendingDecisions = [];
  feed.prepend(fragment);
  while (feed.childElementCount > MAX_DECISIONS) feed.lastElementChild.remove();
  $("decisions-empty").hidden = true;
}

function renderPositions() {
  if (!model.dirty.positions) return;
  model.dirty.positions = false;
  const rows = $("position-rows");
  const fragment = document.createDocumentFragment();
  for (const symbol of [...model.positions.keys()].sort()) {
    const d = model.positions.get(symbol).data;
    const size = Number(d.size);
    const pnl = Number(d.unrealized_pnl);
    const side = String(d.side ?? "").toLowerCase();
    const row = el(
      "tr",
      { "data-testid": "position", "data-symbol": symbol, class: size === 0 ? "flat" : "" },
      el("td", { text: symbol }),
      el("td", { class: `side-${side}`, text: size === 0 ? "flat" : side }),
      el("td", { "data-testid": "size", text: Number.isFinite(size) ? String(size) : "–" }),
      el("td", { text: priceFormat(Number(d.entry_price)) }),
      el("td", { "data-testid": "current", text: priceFormat(Number(d.current_price)) }),
      el("td", {
        "data-testid": "pnl",
        class: pnl > 0 ? "up" : pnl < 0 ? "down" : "",
        text: Number.isFinite(pnl) ? signed(pnl, moneyFormat(pnl)) : "–",
      }),
    );
    fragment.append(row);
  }
  rows.replaceChildren(fragment);
  $("positions-empty").hidden = model.positions.size > 0;
}

function ago(ms) {
  if (ms < 1000) return "just now";
  if (ms < 60000) return `${Math.floor(ms / 1000)} s ago`;
  return `${Math.floor(ms / 60000)} min ago`;
}

// A stale source's price cards and decisions say so too: its last price is not the market's.
function markStale(name, stale) {
  if (stale) model.staleSources.add(name);
  else model.staleSources.delete(name);
  for (const series of model.symbols.values()) {
    if (series.source === name && series.view) series.view.card.dataset.stale = String(stale);
  }
  for (const node of $("decision-feed").children) {
    if (node.dataset.source === name) node.dataset.stale = String(stale);
  }
}

function renderSources(now) {
  const list = $("sources");
  for (const [name, source] of [...model.sources].sort(([a], [b]) => (a < b ? -1 : 1))) {
    // Not seen for a while: it leaves the panel (its cards and decisions stay marked stale).
    if (now - (source.lastEventAt || source.firstSeenAt) > FORGET_AFTER_MS) {
      source.node?.remove();
      model.sources.delete(name);
      if (!model.staleSources.has(name)) markStale(name, true);
      continue;
    }
    if (!source.node) {
      source.node = el(
        "li",
        { class: "source", "data-testid": "source", "data-source": name },
        el("span", { class: "name", text: name }),
        el("span", { class: "badge", "data-testid": "source-state" }),
        el("span", { class: "detail" }),
        el("span", { class: "seen" }),
      );
      list.append(source.node);
    }
    const state = sourceState(source, now);
    const [, badge, detail, seen] = source.node.children;
    if (source.node.dataset.state !== state) {
      source.node.dataset.state = state;
      badge.textContent = state;
    }
    if (model.staleSources.has(name) !== (state === "stale")) markStale(name, state === "stale");
    const health = source.health === false ? "unhealthy" : "";
    const errors = source.errors.length ? ` · ${source.errors.length} error(s): ${source.errors.join("; ")}` : "";
    const text = [source.status, health, source.lastError].filter(Boolean).join(" · ") + errors;
    if (detail.textContent !== text) detail.textContent = text;
    const seenText = source.lastEventAt ? ago(now - source.lastEventAt) : "";
    if (seen.textContent !== seenText) seen.textContent = seenText;
  }
  $("sources-empty").hidden = model.sources.size > 0;
}

function renderConnection() {
  if (!model.dirty.connection) return;
  model.dirty.connection = false;
  const badge = document.querySelector('[data-testid="connection-state"]');
  badge.dataset.state = model.connection.state;
  badge.textContent = model.connection.detail;
  $("reconnects").textContent = String(client.stats.reconnects);
}

function renderNotices() {
  if (!model.dirty.notices) return;
  model.dirty.notices = false;
  const recovery = $("recovery");
  recovery.hidden = model.unrecovered === 0;
  recovery.textContent = `resume incomplete ${model.unrecovered}×: events during the outage may be missing`;
  const error = $("server-error");
  error.hidden = !model.lastServerError;
  error.textContent = `bridge error ${model.lastServerError ?? ""}`;
}

// Once a second: rate, latency, gaps (per-frame would be unreadable flicker).
function renderFooter() {
  const samples = model.latencies.sort((a, b) => a - b);
  $("event-rate").textContent = String(model.eventsThisSecond);
  if (samples.length) {
    $("latency").textContent = `${samples[Math.floor(samples.length / 2)]} ms`;
    $("latency-max").textContent = `${samples[samples.length - 1]} ms`;
  }
  $("gaps").textContent = String(client.stats.gaps);
  model.eventsThisSecond = 0;
  model.latencies = [];
}

let lastStatusRender = 0;
function frame() {
  const now = Date.now();
  try {
    if (model.dirty.selector) {
      model.dirty.selector = false;
      renderSelector();
    }
    renderConnection();
    renderPrices(now);
    renderDecisions();
    renderPositions();
    renderNotices();
    if (now - lastStatusRender >= 250) {
      lastStatusRender = now;
      renderSources(now);
    }
  } finally {
    requestAnimationFrame(frame);
  }
}

// rAF stops in background tabs; the footer keeps counting so the rate is honest on return.
setInterval(renderFooter, 1000);
applySelection();
if (refusedWs === null) {
  client.connect();
} else {
  model.connection = {
    state: "refused",
    detail: `not connecting: ?ws=${refusedWs} is not this page's bridge (${ownWsUrl()})`,
  };
  model.dirty.connection = true;
}
requestAnimationFrame(frame);
