// Typings for tradebus.js, the browser client of the tradebus bridge (no build step needed:
// import "/static/tradebus.js" directly; these types serve editors and TypeScript users).

/** An event as the bridge forwards it: the publisher's payload, unchanged. */
export interface TradebusEvent<D = Record<string, unknown>> {
  type: string;
  data: D;
  /** ISO-8601 UTC time the publisher stamped. */
  timestamp: string;
  /** "type" or "type.key", e.g. "market_data.BTC-USD". */
  topic: string;
  source: string;
  /** The publisher's run (ns since the Unix epoch). Beyond 2^53: use EventInfo.epoch for exact digits. */
  epoch: number;
  seq: number;
}

/** Delivery details passed as the second argument of every event handler. */
export interface EventInfo {
  /** True for events sent inside snapshot_begin/snapshot_end (current state or resume replay). */
  snapshot: boolean;
  /** "snapshot" or "resume" when snapshot is true, else null. */
  mode: "snapshot" | "resume" | null;
  /** Exact decimal digits of the event's epoch and seq, or null when the event has none. */
  epoch: string | null;
  seq: string | null;
}

export type EventHandler<D = Record<string, unknown>> = (event: TradebusEvent<D>, info: EventInfo) => void;

export type ConnectionState = "idle" | "connecting" | "open" | "disconnected" | "reconnecting" | "closed";

export interface StateChange {
  state: ConnectionState;
  /** Reconnect attempt number (1 = first retry). */
  attempt?: number;
  /** Delay before the next attempt, when state is "disconnected". */
  delayMs?: number;
  code?: number;
  reason?: string;
}

export interface GapNotice {
  topic: string;
  source: string;
  missed: number;
}

export interface SnapshotEnd {
  mode: "snapshot" | "resume";
  /** False when the bridge's history no longer reached back: events were missed and a fresh snapshot followed. */
  recovered: boolean;
  count: number;
}

export interface SourceStatus {
  source: string;
  status: "live" | "stale";
  last_seen: string;
}

export interface ServerError {
  code: string;
  message: string;
  id: number | string | null;
}

export interface Position {
  topic: string;
  source: string;
  /** Decimal digits (epochs exceed Number.MAX_SAFE_INTEGER). */
  epoch: string;
  seq: string;
}

export interface ClientOptions {
  /** Default ws(s)://<page host>/ws. */
  url?: string;
  /**
   * Bearer token: sent as the subprotocol "bearer.<token>" (next to "tradebus"), or as
   * ?token=... when it holds characters a subprotocol cannot.
   */
  token?: string;
  /** Sec-WebSocket-Protocol values. */
  protocols?: string | string[];
  /** Reconnect backoff: minDelayMs doubling up to maxDelayMs, plus 0..jitterMs. Defaults 1000, 30000, 1000. */
  minDelayMs?: number;
  maxDelayMs?: number;
  jitterMs?: number;
  /** Application ping period; default follows the server's ping_interval (20 s). */
  pingIntervalMs?: number | null;
  /** Declare the link dead when nothing arrived for pingIntervalMs + pingTimeoutMs. Default 10000. */
  pingTimeoutMs?: number;
  /** Give up on a connection attempt that has not opened after this long. Default 10000. */
  connectTimeoutMs?: number;
  /** A connection open at least this long resets the backoff to minDelayMs. Default 5000. */
  stableAfterMs?: number;
  /** Ask for the latest event of every matching topic on subscribe. Default true. */
  snapshot?: boolean;
  /** Present last positions on reconnect so missed events are replayed. Default true. */
  resume?: boolean;
  /**
   * Largest subscribe request sent on reconnect (default 32768; the bridge's inbound limit is
   * 64 KiB). A resume with more positions is split by pattern; if one pattern alone has too
   * many, positions of market_data/position_update/indicator_update are left out first (their
   * latest value comes anyway), and leaving out any other is reported via onSnapshot as
   * recovered: false.
   */
  maxRequestBytes?: number;
  /** WebSocket constructor to use (default globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
}

export interface ClientStats {
  received: number;
  duplicates: number;
  gaps: number;
  unrecovered: number;
  /** Events ignored: of topics no subscription asks for, or received before a reconnect's
   * subscribe was in force (an older bridge's implicit "everything"). */
  unrequested: number;
  /** Reconnect attempts scheduled. */
  reconnects: number;
  serverErrors: number;
}

export declare class TradebusError extends Error {
  code: string;
}

export declare class Subscription {
  readonly patterns: string[];
  readonly handler: EventHandler | null;
  /** Resolves when the bridge confirmed the subscription; rejects with TradebusError. */
  readonly ready: Promise<Subscription>;
  unsubscribe(): void;
}

export declare class TradebusClient {
  constructor(options?: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly sessionId: string | null;
  readonly stats: ClientStats;
  connect(): this;
  close(code?: number, reason?: string): void;
  subscribe<D = Record<string, unknown>>(patterns: string | string[], handler?: EventHandler<D>): Subscription;
  unsubscribe(target: Subscription | string | string[]): void;
  patterns(): string[];
  positions(): Position[];
  on<D = Record<string, unknown>>(type: string, handler: EventHandler<D>): () => void;
  onState(handler: (change: StateChange) => void): () => void;
  onGap(handler: (gap: GapNotice) => void): () => void;
  onSnapshot(handler: (end: SnapshotEnd) => void): () => void;
  onSourceStatus(handler: (status: SourceStatus) => void): () => void;
  onServerError(handler: (error: ServerError) => void): () => void;
  onMessage(handler: (message: Record<string, unknown>) => void): () => void;
}

export declare function connect(url?: string, options?: ClientOptions): TradebusClient;
export declare function connect(options?: ClientOptions): TradebusClient;
export declare function patternMatches(pattern: string, topic: string): boolean;
export declare function defaultUrl(): string;
