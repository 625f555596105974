// tradebus browser client: an ES module, no build step, no dependencies.
//
//   import { connect } from "/static/tradebus.js";
//   const bus = connect();                      // ws(s)://<page host>/ws
//   bus.subscribe(["market_data.BTC-USD"], (event) => console.log(event.data.price));
//
// The protocol it speaks is docs/websocket-protocol.md; the API is documented in
// tradebus.d.ts and docs/dashboard.md.

const DEFAULTS = Object.freeze({
  minDelayMs: 1000, // the original dashboard's reconnect habit: 1 s doubling to 30 s
  maxDelayMs: 30000,
  jitterMs: 1000, // plus 0..1 s so a restarted bridge is not hit by every tab at once
  pingIntervalMs: null, // null: follow the server's ping_interval (default 20 s)
  pingTimeoutMs: 10000,
  connectTimeoutMs: 10000,
  stableAfterMs: 5000, // a connection open this long resets the reconnect backoff
  snapshot: true,
  resume: true,
  maxRequestBytes: 32768, // the bridge's inbound limit is 64 KiB by default
});

// Characters a WebSocket subprotocol may hold (RFC 6455 / RFC 7230 token).
const SUBPROTOCOL_SAFE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

// BEGIN event types: generated from bus/event_types.py, do not edit
// Types whose latest event is their whole state: a resume may fall back to a
// snapshot for them.
const CONFLATABLE = new Set(["market_data", "position_update"]);
// END event types

/** True when `pattern` (e.g. "market_data", "*.BTC-USD") matches `topic` (bus rules). */
export function patternMatches(pattern, topic) {
  if (pattern === "*") return true;
  const p = pattern.split(".");
  const t = topic.split(".");
  if (t.length < p.length) return false;
  for (let i = 0; i < p.length; i += 1) {
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return true;
}

/** The default endpoint: the /ws path of the host that served the page. */
export function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) return "ws://127.0.0.1:8000/ws";
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

// Epochs are nanosecond timestamps (~1.7e18), beyond the 2^53 that a JS number holds
// exactly. Positions must be echoed to the bridge digit for digit or resume fails, so
// the exact digits are read from the raw frame. The payload's top-level fields follow
// "data", and a quote inside a JSON string is escaped, so the last `"epoch":` key in the
// frame is the top-level one.
function exactInteger(raw, key, parsed) {
  if (typeof parsed === "number" && Number.isSafeInteger(parsed)) return String(parsed);
  const marker = `"${key}":`;
  let at = raw.lastIndexOf(marker);
  if (at < 0) return null;
  at += marker.length;
  while (raw[at] === " ") at += 1;
  let end = at;
  while (end < raw.length && raw.charCodeAt(end) >= 48 && raw.charCodeAt(end) <= 57) end += 1;
  return end > at ? raw.slice(at, end) : null;
}

// Compare two non-negative decimal integer strings without BigInt rounding concerns.
function compareDigits(a, b) {
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

function isEvent(message) {
  return typeof message.topic === "string" && typeof message.type === "string" && "data" in message;
}

/**
 * A connection to a tradebus bridge that survives disconnects: it reconnects with
 * backoff, re-subscribes and resumes from the last positions it delivered.
 */
export class TradebusClient {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.url = this.options.url ?? defaultUrl();
    this.state = "idle";
    this.sessionId = null;
    this.stats = {
      received: 0, // events delivered to the application
      duplicates: 0, // events skipped because their position was already delivered
      gaps: 0, // events the bridge reported lost (sum of gap.missed)
      unrecovered: 0, // resumes answered with recovered:false
      unrequested: 0, // events ignored: not asked for, or before the resume was in force
      reconnects: 0,
      serverErrors: 0,
    };
    this._ws = null;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._connectTimer = null;
    this._openedAt = 0; // when the current connection opened; 0 while not open
    this._lastInbound = 0;
    this._nextId = 1;
    this._closedByUser = false;
    this._patternCounts = new Map(); // pattern -> number of subscriptions holding it
    this._subscriptions = new Set();
    this._routeCache = new Map(); // topic -> subscriptions matching it
    this._typeHandlers = new Map(); // event type or "*" -> Set of handlers
    this._listeners = {
      state: new Set(),
      gap: new Set(),
      snapshot: new Set(),
      sourceStatus: new Set(),
      serverError: new Set(),
      message: new Set(),
    };
    this._positions = new Map(); // topic \0 source -> {topic, source, epoch (digits), seq (digits)}
    this._pending = new Map(); // request id -> {resolve, reject}
    this._frame = null; // {mode, recovered} between snapshot_begin and snapshot_end
    this._explicit = false; // the application has chosen its topics (vs. receive everything)
    // After a reconnect, until the bridge confirms the first subscribe: events from a bridge
    // that ignored ?topics= (an older one) would come from its implicit "everything".
    this._awaitingSubscribe = false;
  }

  // ---------------------------------------------------------------- connection

  /** Open the connection (idempotent). Returns the client for chaining. */
  connect() {
    this._closedByUser = false;
    if (this._ws || this._reconnectTimer) return this;
    this._open();
    return this;
  }

  /** Close for good: no reconnect until connect() is called again. */
  close(code = 1000, reason = "client closed") {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const ws = this._ws;
    this._teardown();
    if (ws) ws.close(code, reason);
    this._setState("closed", { code, reason });
  }

  _open() {
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    let url = this.url;
    let protocols = this.options.protocols;
    const token = this.options.token;
    if (token && SUBPROTOCOL_SAFE.test(token)) {
      // Browsers cannot set an Authorization header; a subprotocol keeps the token out of
      // URLs, which end up in logs and proxies.
      const extra = protocols === undefined ? [] : [].concat(protocols);
      protocols = ["tradebus", `bearer.${token}`, ...extra];
    } else if (token) {
      url += `${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
    }
    if (this._explicit && !/[?&]topics=/.test(url)) {
      // An empty topics list: the bridge sends no event before the subscribe (with the
      // resume positions) that follows the open. Otherwise the implicit "everything"
      // would advance positions past what the resume replays, losing the replayed events.
      url += `${url.includes("?") ? "&" : "?"}topics=`;
    }
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting", { attempt: this._attempt });
    let ws;
    try {
      ws = new WS(url, protocols);
    } catch (error) {
      this._scheduleReconnect({ code: 0, reason: String(error) });
      return;
    }
    this._ws = ws;
    this._openedAt = 0;
    // A connect to a black-holed address can hang for minutes before the browser gives up.
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && ws.readyState === 0) this._abandon(ws, "connect timed out");
    }, this.options.connectTimeoutMs);
    ws.onopen = () => {
      clearTimeout(this._connectTimer);
      this._openedAt = Date.now();
      this._lastInbound = Date.now();
      this._setState("open", {});
      this._resubscribe();
      this._startPinging(this.options.pingIntervalMs ?? 20000);
    };
    ws.onmessage = (message) => this._onFrame(message.data);
    ws.onclose = (closeEvent) => {
      if (this._ws !== ws) return;
      this._teardown();
      this._scheduleReconnect({ code: closeEvent.code, reason: closeEvent.reason });
    };
    // The close event that always follows an error carries the useful code.
    ws.onerror = () => {};
  }

  _teardown() {
    const ws = this._ws;
    this._ws = null;
    this._frame = null;
    this._awaitingSubscribe = false;
    clearInterval(this._pingTimer);
    this._pingTimer = null;
    clearTimeout(this._connectTimer);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
  }

  _scheduleReconnect(detail) {
    if (this._closedByUser) return;
    // Only a connection that lasted resets the backoff: a bridge that accepts and then
    // closes at once (limits, auth) must not be hammered every second.
    if (this._openedAt && Date.now() - this._openedAt >= this.options.stableAfterMs) {
      this._attempt = 0;
    }
    this._openedAt = 0;
    this._attempt += 1;
    this.stats.reconnects += 1;
    const { minDelayMs, maxDelayMs, jitterMs } = this.options;
    const base = Math.min(maxDelayMs, minDelayMs * 2 ** (this._attempt - 1));
    const delayMs = Math.round(base + Math.random() * jitterMs);
    this._setState("disconnected", { ...detail, attempt: this._attempt, delayMs });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._closedByUser) this._open();
    }, delayMs);
  }

  // Browsers answer the server's protocol pings themselves; these application pings
  // find links that died without a close (a sleeping laptop, a dropped NAT entry).
  _startPinging(intervalMs) {
    clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => {
      const now = Date.now();
      if (now - this._lastInbound > intervalMs + this.options.pingTimeoutMs) {
        this._abandon(this._ws, "no traffic from server");
        return;
      }
      this._send({ op: "ping", id: this._nextId++ });
    }, intervalMs);
  }

  // On a dead link the closing handshake never completes, so reconnect without it.
  _abandon(ws, reason) {
    this._teardown();
    ws.close(4000, reason);
    this._scheduleReconnect({ code: 4000, reason });
  }

  _send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(typeof message === "string" ? message : JSON.stringify(message));
    return true;
  }

  // ------------------------------------------------------------- subscriptions

  /**
   * Receive events whose topic matches any of `patterns`. The bridge sends only what some
   * subscription of this client asked for. Returns a Subscription with .unsubscribe()
   * and .ready (resolves when the bridge confirmed, rejects on an error reply).
   */
  subscribe(patterns, handler) {
    const list = Array.isArray(patterns) ? [...patterns] : [patterns];
    this._explicit = true;
    const subscription = new Subscription(this, list, handler);
    this._subscriptions.add(subscription);
    this._routeCache.clear();
    const added = [];
    for (const pattern of list) {
      const count = this._patternCounts.get(pattern) ?? 0;
      this._patternCounts.set(pattern, count + 1);
      if (count === 0) added.push(pattern);
    }
    if (added.length === 0) {
      subscription._settle(null);
    } else if (this._ws && this._ws.readyState === 1) {
      this._request({ op: "subscribe", topics: added, snapshot: this.options.snapshot }, subscription);
    } else {
      this._pendingOpen().push(subscription);
    }
    return subscription;
  }

  /**
   * Drop a whole Subscription, or the given patterns from every subscription holding them
   * (a subscription left without patterns ends). The bridge is told about patterns that no
   * subscription holds any more.
   */
  unsubscribe(target) {
    const removed = [];
    const release = (pattern) => {
      const count = (this._patternCounts.get(pattern) ?? 1) - 1;
      if (count <= 0) {
        this._patternCounts.delete(pattern);
        removed.push(pattern);
      } else {
        this._patternCounts.set(pattern, count);
      }
    };
    if (target instanceof Subscription) {
      if (this._subscriptions.delete(target)) target.patterns.forEach(release);
    } else {
      const dropping = new Set(Array.isArray(target) ? target : [target]);
      for (const sub of [...this._subscriptions]) {
        const kept = sub.patterns.filter((p) => !dropping.has(p));
        if (kept.length === sub.patterns.length) continue;
        sub.patterns.filter((p) => dropping.has(p)).forEach(release);
        sub.patterns = kept;
        if (kept.length === 0) this._subscriptions.delete(sub);
      }
    }
    this._routeCache.clear();
    this._explicit = true;
    if (removed.length === 0) return;
    // Positions of topics nobody asks for any more would make a later re-subscribe
    // treat the snapshot as already seen.
    for (const [key, position] of this._positions) {
      if (!this._wanted(position.topic)) this._positions.delete(key);
    }
    this._send({ op: "unsubscribe", topics: removed, id: this._nextId++ });
  }

  _forget(subscription) {
    if (!this._subscriptions.delete(subscription)) return;
    for (const pattern of subscription.patterns) {
      const count = (this._patternCounts.get(pattern) ?? 1) - 1;
      if (count <= 0) this._patternCounts.delete(pattern);
      else this._patternCounts.set(pattern, count);
    }
    this._routeCache.clear();
  }

  /** The patterns currently held on the wire. */
  patterns() {
    return [...this._patternCounts.keys()];
  }

  /** The last delivered position of every (topic, source): what a resume presents. */
  positions() {
    return [...this._positions.values()].map((p) => ({ ...p }));
  }

  _wanted(topic) {
    for (const pattern of this._patternCounts.keys()) {
      if (patternMatches(pattern, topic)) return true;
    }
    return false;
  }

  _pendingOpen() {
    if (!this._waitingForOpen) this._waitingForOpen = [];
    return this._waitingForOpen;
  }

  _request(message, subscription) {
    const id = this._nextId++;
    if (subscription) this._pending.set(id, subscription);
    this._send({ ...message, id });
    return id;
  }

  // After (re)connecting: one subscribe holding every pattern, with the positions already
  // delivered so the bridge replays what was missed, exactly once and in order.
  _resubscribe() {
    const waiting = this._waitingForOpen ?? [];
    this._waitingForOpen = [];
    // Requests that were in flight when the link dropped are answered by this one.
    for (const sub of this._pending.values()) waiting.push(sub);
    this._pending.clear();
    const patterns = this.patterns();
    if (patterns.length === 0) {
      // A client that never subscribed gets everything; one whose application dropped every
      // pattern must get nothing, so say so (an empty unsubscribe ends "everything").
      if (this._explicit) this._send({ op: "unsubscribe", topics: [], id: this._nextId++ });
      for (const sub of waiting) sub._settle(null);
      return;
    }
    const requests = this._resumeRequests(patterns);
    this._awaitingSubscribe = true;
    requests.forEach((text, index) => {
      const id = this._nextId++;
      if (index === requests.length - 1) {
        const group = new Subscription(this, [], null);
        group._followers = waiting;
        this._pending.set(id, group);
      }
      this._send(`{"id":${id},${text.slice(1)}`);
    });
  }

  // The subscribe requests of a resume, each below maxRequestBytes (the bridge closes a
  // connection with 1009 for an oversized message, and the client would retry for ever).
  // The bridge answers a topic matching a request's patterns but absent from its `since`
  // with its latest event, which would make a later request's replay look old, so a
  // pattern's positions are never spread over two requests: when one pattern alone has
  // too many, the positions of conflatable types (where the latest value is enough) go
  // first, and losing any other is reported as an unrecovered resume.
  _resumeRequests(patterns) {
    const snapshot = this.options.snapshot;
    const budget = this.options.maxRequestBytes;
    const head = (topics) => JSON.stringify({ op: "subscribe", topics, snapshot }).slice(0, -1);
    const positions = this.options.resume ? this.positions() : [];
    if (positions.length === 0) return [`${head(patterns)}}`];
    const entry = (p) =>
      // Hand-built because epochs exceed the precision of JSON.stringify on numbers.
      `{"topic":${JSON.stringify(p.topic)},"source":${JSON.stringify(p.source)},` +
      `"epoch":${p.epoch},"seq":${p.seq}}`;
    const build = (topics, entries) => `${head(topics)},"since":[${entries.join(",")}]}`;
    const requests = [];
    let topics = [];
    let entries = [];
    let lost = false;
    for (const pattern of patterns) {
      const mine = positions.filter((p) => patternMatches(pattern, p.topic));
      const texts = mine.map(entry);
      if (build([...topics, pattern], [...entries, ...texts]).length <= budget) {
        topics.push(pattern);
        entries.push(...texts);
        continue;
      }
      if (topics.length) requests.push(build(topics, entries));
      topics = [pattern];
      entries = texts;
      if (build(topics, entries).length > budget) {
        const ranked = mine
          .map((p, i) => ({ p, text: texts[i], spare: CONFLATABLE.has(p.topic.split(".")[0]) }))
          .sort((a, b) => Number(a.spare) - Number(b.spare));
        entries = [];
        let length = build(topics, []).length;
        for (const { p, text } of ranked) {
          if (length + text.length + 1 > budget) {
            if (!CONFLATABLE.has(p.topic.split(".")[0])) lost = true;
            continue;
          }
          entries.push(text);
          length += text.length + 1;
        }
      }
    }
    requests.push(build(topics, entries));
    if (lost) {
      this.stats.unrecovered += 1;
      this._emit("snapshot", { mode: "resume", recovered: false, count: 0 });
    }
    return requests;
  }

  // ------------------------------------------------------------------ handlers

  /** Call `handler(event, info)` for every event of `type` ("*" for all). Returns an off(). */
  on(type, handler) {
    let set = this._typeHandlers.get(type);
    if (!set) this._typeHandlers.set(type, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  /** Connection state changes: handler({state, attempt, delayMs, code, reason}). */
  onState(handler) {
    return this._listen("state", handler);
  }

  /** Events lost upstream as reported by the bridge: handler({topic, source, missed}). */
  onGap(handler) {
    return this._listen("gap", handler);
  }

  /** End of a snapshot or resume: handler({mode, recovered, count}); recovered false = data lost. */
  onSnapshot(handler) {
    return this._listen("snapshot", handler);
  }

  /** Source liveness from the bridge: handler({source, status: "live"|"stale", last_seen}). */
  onSourceStatus(handler) {
    return this._listen("sourceStatus", handler);
  }

  /** Error replies from the bridge: handler({code, message, id}). */
  onServerError(handler) {
    return this._listen("serverError", handler);
  }

  /** Every control message (non-event) from the bridge, parsed. */
  onMessage(handler) {
    return this._listen("message", handler);
  }

  _listen(kind, handler) {
    this._listeners[kind].add(handler);
    return () => this._listeners[kind].delete(handler);
  }

  _emit(kind, detail) {
    for (const handler of this._listeners[kind]) {
      try {
        handler(detail);
      } catch (error) {
        reportHandlerError(error);
      }
    }
  }

  _setState(state, detail) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  // ------------------------------------------------------------------- inbound

  _onFrame(raw) {
    this._lastInbound = Date.now();
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      this._emit("serverError", { code: "bad_frame", message: "frame is not JSON", id: null });
      return;
    }
    if (message === null || typeof message !== "object") return;
    if (isEvent(message)) {
      this._onEvent(message, raw);
      return;
    }
    this._onControl(message);
  }

  _onEvent(event, raw) {
    // Positions advance only on events the client asked for, once its subscription is in
    // force: anything else would make the replay of a resume look already seen.
    if (this._awaitingSubscribe || (this._explicit && !this._wanted(event.topic))) {
      this.stats.unrequested += 1;
      return;
    }
    const info = {
      snapshot: this._frame !== null,
      mode: this._frame ? this._frame.mode : null,
      epoch: null,
      seq: null,
    };
    if (typeof event.source === "string" && event.epoch != null && event.seq != null) {
      const epoch = exactInteger(raw, "epoch", event.epoch);
      const seq = exactInteger(raw, "seq", event.seq);
      if (epoch !== null && seq !== null) {
        info.epoch = epoch;
        info.seq = seq;
        const key = `${event.topic}\u0000${event.source}`;
        const last = this._positions.get(key);
        if (last) {
          const byEpoch = compareDigits(epoch, last.epoch);
          if (byEpoch < 0 || (byEpoch === 0 && compareDigits(seq, last.seq) <= 0)) {
            this.stats.duplicates += 1;
            return;
          }
        }
        this._positions.set(key, { topic: event.topic, source: event.source, epoch, seq });
      }
    }
    this.stats.received += 1;
    let routes = this._routeCache.get(event.topic);
    if (!routes) {
      routes = [...this._subscriptions].filter(
        (sub) => sub.handler && sub.patterns.some((p) => patternMatches(p, event.topic)),
      );
      this._routeCache.set(event.topic, routes);
    }
    for (const sub of routes) invoke(sub.handler, event, info);
    const byType = this._typeHandlers.get(event.type);
    if (byType) for (const handler of byType) invoke(handler, event, info);
    const all = this._typeHandlers.get("*");
    if (all) for (const handler of all) invoke(handler, event, info);
  }

  _onControl(message) {
    switch (message.type) {
      case "connection_established":
        this.sessionId = message.session ?? null;
        if (this.options.pingIntervalMs == null && typeof message.ping_interval === "number") {
          this._startPinging(Math.max(1000, message.ping_interval * 1000));
        }
        break;
      case "subscribed":
      case "subscription_confirmed": {
        this._awaitingSubscribe = false;
        const sub = this._pending.get(message.id);
        if (sub) {
          this._pending.delete(message.id);
          sub._settle(null);
        }
        break;
      }
      case "snapshot_begin":
        this._frame = { mode: message.mode, recovered: message.recovered };
        break;
      case "snapshot_end":
        this._frame = null;
        if (message.recovered === false) this.stats.unrecovered += 1;
        this._emit("snapshot", {
          mode: message.mode,
          recovered: message.recovered !== false,
          count: message.count ?? 0,
        });
        break;
      case "gap":
        this.stats.gaps += Number(message.missed) || 0;
        this._emit("gap", { topic: message.topic, source: message.source, missed: message.missed });
        break;
      case "source_status":
        this._emit("sourceStatus", {
          source: message.source,
          status: message.status,
          last_seen: message.last_seen,
        });
        break;
      case "error": {
        this.stats.serverErrors += 1;
        const sub = this._pending.get(message.id);
        if (sub) {
          this._awaitingSubscribe = false;
          this._pending.delete(message.id);
          sub._settle(message);
          // The bridge applies a subscribe whole or not at all: drop it here too, or every
          // reconnect would repeat the refused patterns and fail again.
          this._forget(sub);
        }
        this._emit("serverError", { code: message.code, message: message.message, id: message.id ?? null });
        break;
      }
      case "ping": // the original dashboard protocol's JSON ping
        this._send({ type: "pong" });
        break;
      default:
        break;
    }
    this._emit("message", message);
  }
}

/** One subscribe() call: its patterns, its handler, and whether the bridge accepted it. */
export class Subscription {
  constructor(client, patterns, handler) {
    this.client = client;
    this.patterns = patterns;
    this.handler = handler ?? null;
    this._followers = [];
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // An application that never awaits .ready must not get "unhandled rejection" noise.
    this.ready.catch(() => {});
  }

  unsubscribe() {
    this.client.unsubscribe(this);
  }

  _settle(error) {
    if (error) {
      this._reject(new TradebusError(error.code, error.message));
    } else {
      this._resolve(this);
    }
    for (const follower of this._followers) follower._settle(error);
    this._followers = [];
  }
}

/** An error reply from the bridge, with its snake_case code. */
export class TradebusError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "TradebusError";
    this.code = code;
  }
}

function invoke(handler, event, info) {
  try {
    handler(event, info);
  } catch (error) {
    reportHandlerError(error);
  }
}

// A throwing handler must not stop delivery to the others, yet must stay visible.
function reportHandlerError(error) {
  setTimeout(() => {
    throw error;
  }, 0);
}

/** Create a client and connect it: connect() or connect(url) or connect({url, ...options}). */
export function connect(urlOrOptions, options = {}) {
  const merged =
    typeof urlOrOptions === "string" ? { ...options, url: urlOrOptions } : { ...(urlOrOptions ?? {}) };
  return new TradebusClient(merged).connect();
}
