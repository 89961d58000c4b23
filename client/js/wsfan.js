/**
 * wsfan.js: a dependency-free ES module client for the wsfan pub/sub WebSocket server
 * (PROTOCOL.md v1), for browsers and Node >= 22 (any global `WebSocket`, or pass one as
 * the `WebSocket` option).
 *
 *     import { connect } from "/wsfan.js";
 *     const client = await connect("/ws", { token, onEvent: (e) => console.log(e.type, e) });
 *     await client.join("news");
 *     client.addEventListener("message", (e) => console.log(e.detail.seq, e.detail.payload));
 *     const { seq } = await client.publish("news", { hello: "world" });
 *     for await (const msg of client.messages("news")) { ... }
 *
 * It behaves like the Python client in client/ (same rules, same event names), so an
 * application sees the same thing from either:
 *
 * - Requests (join, leave, publish, echo, ping, presence, presenceStats) return Promises that resolve with the
 *   ack data, or reject with a `ProtocolError` (the server's `code` and `message`), a
 *   `RequestTimeout` (the pending entry is removed; a late reply is dropped), or a
 *   `ConnectionClosed` (the socket dropped first: a publish is not resent because the
 *   server may already have executed it). Requests made while reconnecting wait for
 *   the new connection, within their own timeout.
 * - Reconnection: exponential backoff with full jitter (sleep = random() *
 *   min(cap, base * 2**attempt), the first attempt included, so a crowd dropped by
 *   the same restart spreads out), reset once a connection stayed up `stableAfter` ms.
 *   Close codes 1000 and 4001 end the session unless `refreshToken` returns a new
 *   token. Every joined room is rejoined with `since` = the last seq handed to the
 *   application; duplicates are dropped by seq; a `recovered` or `gap` event says
 *   whether history covered the outage.
 * - Browsers cannot see WebSocket ping frames (they answer the server's pings by
 *   themselves) and cannot tell why a handshake failed (401 and 503 both look like
 *   close 1006). So liveness is checked with app-level `ping` messages (no inbound
 *   traffic within `pingTimeout` after a ping: the socket is dropped and reconnected),
 *   and an expired token is detected by reading the JWT's `exp` before each attempt.
 * - Deliveries wait in one bounded buffer per client, filled from the first connection on;
 *   `messages(room)` and `messages()` are views of it: each message is read once, by the first read
 *   that asks for it, so `await client.messages(room).get(1000)` per message reads them all
 *   (`MessageBuffer`). `message` events (EventTarget) see every delivery as well.
 * - Join/leave events of rooms whose namespace has `join_leave` arrive as `joined` and
 *   `left` events (`{room, user, conn}`), through `onEvent` and the EventTarget alike.
 * - Room-less pushes (a server `broadcast`, an application's own message types) arrive as
 *   `push` events and through `onPush`; deliveries of rooms the server joined the connection
 *   to arrive like those of joined rooms, announced by a `subscribed` event {room, seq, epoch}
 *   and ended by an `unsubscribed` event {room, reason} (the room leaves `rooms`).
 * - The token travels as `?token=` because browsers cannot set upgrade headers.
 * - JSON only (text frames): a MessagePack decoder is not worth shipping to browsers.
 *
 * All durations are milliseconds.
 */

/** Close codes after which reconnecting is pointless unless the application supplies a new token. */
export const NO_RECONNECT_CODES = new Set([1000, 4001]);

/**
 * Error codes that say "not now" rather than "never": a rejoin refused with one of them is
 * retried with the whole reconnect (after the next backoff) instead of dropping the room.
 * UNAVAILABLE is what a cluster node answers while its broker is down or overloaded, which
 * is exactly when a crowd of clients reconnects.
 */
export const TRANSIENT_CODES = new Set(["UNAVAILABLE", "RATE_LIMITED", "INTERNAL"]);

const now = () => (globalThis.performance ? performance.now() : Date.now());

// ------------------------------------------------------------------ errors

/** Root of every error this module rejects with; `code` is a stable string to switch on. */
export class WsfanError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "WsfanError";
    this.code = code;
  }
}

/** The server answered the request with `{"type":"error"}` (INVALID_MESSAGE, NOT_JOINED, FORBIDDEN, ...). */
export class ProtocolError extends WsfanError {
  constructor(code, message = "") {
    super(code, message ? `${code}: ${message}` : code);
    this.name = "ProtocolError";
    this.serverMessage = message;
  }
}

/** No reply within the timeout. The server may still have executed the request. */
export class RequestTimeout extends WsfanError {
  constructor(kind, timeout) {
    super("TIMEOUT", `no reply to '${kind}' within ${timeout} ms`);
    this.name = "RequestTimeout";
    this.kind = kind;
    this.timeout = timeout;
  }
}

/**
 * A payload refused before sending: it would not arrive as it was sent (see `payloadProblem`).
 * `problem` says what and where, e.g. `payload.a[1] is NaN or Infinity`.
 */
export class InvalidPayload extends WsfanError {
  constructor(problem) {
    super("INVALID_PAYLOAD", `payload refused before sending: ${problem}`);
    this.name = "InvalidPayload";
    this.problem = problem;
  }
}

/** A stream's `get(timeout)` waited `timeout` ms for nothing; the message says for what. Nothing is lost. */
export class MessageTimeout extends RequestTimeout {
  constructor(what, timeout, room = null) {
    super("message", timeout);
    this.name = "MessageTimeout";
    this.message = `${what} within ${timeout} ms`;
    this.room = room;
  }
}

/** A read after the buffer dropped messages it could have returned: `count` of them, reported once. */
export class MessagesDropped extends WsfanError {
  constructor(count) {
    super("MESSAGES_DROPPED", `${count} message(s) dropped: the reader did not keep up`);
    this.name = "MessagesDropped";
    this.count = count;
  }
}

/** The connection ended before the reply, or the client stopped for good (`closeCode` says how). */
export class ConnectionClosed extends WsfanError {
  constructor(closeCode, reason = "") {
    super("CONNECTION_CLOSED", `connection closed with ${closeCode}${reason ? `: ${reason}` : ""}`);
    this.name = "ConnectionClosed";
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

/** A fire-and-forget send while no connection is open (it is not queued). */
export class NotConnected extends WsfanError {
  constructor(message = "not connected") {
    super("NOT_CONNECTED", message);
    this.name = "NotConnected";
  }
}

// ------------------------------------------------------------------ payloads

/** Arrays/objects a payload may nest, counting the outermost (server/protocol.py MAX_PAYLOAD_DEPTH). */
export const MAX_PAYLOAD_DEPTH = 64;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

function wellFormed(text) {
  return typeof text.isWellFormed === "function" ? text.isWellFormed() : !LONE_SURROGATE.test(text);
}

/**
 * Why `value` would not reach every subscriber exactly as it is, or null: the protocol's payload rule
 * (PROTOCOL.md; the Python client's `payload_problem`). A payload is null, a boolean, a finite number
 * (an integer-valued one below 1e21, which JSON writes as an integer, within -2^63..2^64-1 as written), a
 * string of well-formed UTF-16, an array without holes, or a plain object (string keys, no
 * `toJSON`), nested at most `MAX_PAYLOAD_DEPTH` deep. `JSON.stringify` would send NaN and Infinity
 * as null, drop `undefined`, throw on a BigInt and turn a Date, Map or Set into something else;
 * those and every other value are refused. Never throws.
 */
export function payloadProblem(value, depth = MAX_PAYLOAD_DEPTH, where = "payload") {
  if (value === null || typeof value === "boolean") return null;
  if (typeof value === "string") return wellFormed(value) ? null : `${where} is a string with a lone surrogate`;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) return `${where} is NaN or Infinity, which JSON writes as null`;
    if (Number.isInteger(value) && Math.abs(value) >= 2 ** 53 && Math.abs(value) < 1e21) {
      // JSON writes it as the shortest decimal that reads back as this double (-2^63 is written
      // -9223372036854776000): that integer is what the server reads, and must be in range.
      const written = BigInt(JSON.stringify(value));
      if (written < -(2n ** 63n) || written > 2n ** 64n - 1n) return `${where} is an integer outside -2^63..2^64-1 as JSON writes it`;
    }
    return null;
  }
  if (value === undefined) return `${where} is undefined, which JSON drops`;
  if (typeof value !== "object") return `${where} is a ${typeof value}, which JSON cannot carry`;
  if (Array.isArray(value)) {
    if (depth === 0) return `${where} is nested deeper than ${MAX_PAYLOAD_DEPTH}`;
    for (let i = 0; i < value.length; i++) {
      if (!(i in value)) return `${where}[${i}] is a hole, which JSON writes as null`;
      const why = payloadProblem(value[i], depth - 1, `${where}[${i}]`);
      if (why) return why;
    }
    return null;
  }
  const proto = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null) {
    const name = (value.constructor && value.constructor.name) || "object";
    return `${where} is a ${name}, not a plain object: convert it first`;
  }
  if (depth === 0) return `${where} is nested deeper than ${MAX_PAYLOAD_DEPTH}`;
  if (Object.getOwnPropertySymbols(value).length) return `${where} has symbol keys, which JSON drops`;
  if (typeof value.toJSON === "function") return `${where} has a toJSON method`;
  for (const key of Object.keys(value)) {
    if (!wellFormed(key)) return `${where} has a key with a lone surrogate`;
    const why = payloadProblem(value[key], depth - 1, `${where}.${key.slice(0, 40)}`);
    if (why) return why;
  }
  return null;
}

function checkPayload(value) {
  const problem = payloadProblem(value);
  if (problem) throw new InvalidPayload(problem);
}

// ------------------------------------------------------------------ backoff

/**
 * Successive reconnect delays: full jitter (AWS "Exponential Backoff And Jitter").
 * `random` is injectable so tests can predict every delay.
 */
export class Backoff {
  constructor({ base = 500, cap = 30000, maxAttempts = Infinity, random = Math.random } = {}) {
    if (!(base >= 0) || !(cap >= 0)) throw new RangeError("backoff base and cap must be >= 0");
    this.base = base;
    this.cap = cap;
    this.maxAttempts = maxAttempts == null ? Infinity : maxAttempts;
    this.random = random;
    this.attempt = 0;
  }

  get exhausted() {
    return this.attempt >= this.maxAttempts;
  }

  /** Upper bound of the jitter window for `attempt` (0-based); guarded so a long outage cannot overflow. */
  window(attempt) {
    if (attempt >= 64) return this.cap;
    return Math.min(this.cap, this.base * 2 ** attempt);
  }

  /** The delay before the next attempt; counts that attempt. */
  nextDelay() {
    const delay = this.random() * this.window(this.attempt);
    this.attempt += 1;
    return delay;
  }

  reset() {
    this.attempt = 0;
  }
}

// ------------------------------------------------------------------ rooms: dedupe and recovery

/**
 * Which rooms the application is in and the last seq it saw in each (a port of client/rooms.py).
 *
 * - A delivery reaches the application only if its seq is above the last one handed
 *   over for its room, so overlapping replays are dropped and every message is seen
 *   once, in order.
 * - While a join with `since` is in flight its room's deliveries are held: only the
 *   ack tells how to number them. `recovered: false` with `ack.seq < since` means the
 *   server's numbering started over (a single node restarted and lost the room), so
 *   what arrives is new even though its seq is small: the baseline becomes 0, so the
 *   history of the new numbering that the server replays after the ack is delivered.
 * - The ack's seq is the baseline of a fresh join, so a reconnect before the first
 *   delivery still recovers what was published meanwhile.
 * - Our own acked publications are remembered and skipped when history replays them.
 * - The ack's `epoch` (a protocol extension: the identity of the room's numbering) is
 *   sent back with `since` on a rejoin; an ack with another epoch means the room was lost
 *   and renumbered (e.g. Redis restarted without persistence) even if its seq has passed
 *   our `since` again, so it is a reset like a seq that went backwards. Servers that send
 *   no epoch are handled by the seq rule alone.
 * - A delivery whose seq is not above the last one seen, on a connection that stayed
 *   joined, means the room started over while we were in it (Redis lost it), unless it is
 *   one a rejoin's replay may repeat (`since` < seq <= the ack's seq, until the replay is
 *   past): it is handed over as the first message of the new numbering and reported to
 *   `onReset` as a `gap` with `reset: true`; the room's epoch becomes unknown.
 * - A `subscribed` push (`serverJoined`) says the server joined this connection to a room
 *   (`conn.join`, docs/app-api.md) at its seq and epoch: it is tracked from that seq
 *   (`byServer`), handed over under the rules above and listed by `subscribed()`. It belongs
 *   to the connection: not rejoined after a reconnect (the server decides again, e.g. in
 *   `on_open`); its seq and epoch are kept (`former`), and a `subscribed` of it on a later
 *   connection whose seq is past the last one seen (or in another epoch, or behind it) is a
 *   `gap` (`reset` for the latter two). A room the application joined or is joining stays
 *   its own; an explicit `join()` makes a server-joined room the application's.
 * - An `unsubscribed` push (`serverLeft`) comes after the room's last delivery: the room is
 *   forgotten, unless the application's own join of it is in flight (its ack makes it ours).
 * - A delivery of a room neither joined nor announced (a server older than these pushes) is a
 *   server join too, tracked from it. Deliveries of a room being left (leave sent, not acked
 *   yet) are in flight from before the leave: dropped (`unknown`).
 * - A join ack whose `data.room` names another room than the one asked for (a `before_join`
 *   hook moved the join, docs/app-api.md) means the connection is in that room: the join's
 *   state moves to it (merged if it was already tracked), so its deliveries are the joined
 *   room's, `subscribed()` lists it, and it is the room rejoined after a reconnect.
 *
 * The rules are shared with client/rooms.py as test vectors (tests/vectors/numbering.json).
 */
function newState() {
  return {
    lastSeq: null,
    own: null,
    joined: false,
    held: null,
    since: null,
    epoch: null,
    replay: null,
    byServer: false,
    joining: false, // the application's join is in flight
  };
}

export class RoomTracker {
  constructor(onReset = null) {
    this.rooms = new Map();
    this.leaving = new Set(); // left by the application, the server's ack not in yet
    this.duplicates = 0;
    this.unknown = 0;
    this.resets = 0; // rooms seen starting over on a live connection
    this.onReset = onReset; // told of each, before its first message is handed over
    // Server-joined rooms of lost connections: [last seq seen, epoch], read when the server
    // joins a later connection to them again.
    this.former = new Map();
  }

  /**
   * Record a join about to be sent; returns the `since` to send (see `epoch()`). An explicit
   * `since` rewinds the room and an explicit `epoch` says which numbering it counts in.
   */
  beginJoin(room, since = null, epoch = null) {
    let state = this.rooms.get(room);
    if (!state) {
      state = newState();
      this.rooms.set(room, state);
    }
    // A room only the server joined us to is the connection's: nothing of it to recover.
    if (since == null) since = state.joined ? state.lastSeq : null;
    else {
      state.lastSeq = since;
      if (epoch) state.epoch = epoch;
    }
    state.since = since;
    state.held = since != null ? [] : null;
    state.joining = true;
    return since;
  }

  /** Apply a join ack: returns [deliveries now due to the application, event or null]. */
  endJoin(room, data) {
    let state = this.rooms.get(room);
    if (!state) return [[], null];
    const held = state.held || [];
    const since = state.since;
    state.held = null;
    state.since = null;
    const wasJoined = state.joined;
    state.joined = true;
    state.joining = false;
    const moved = data && typeof data.room === "string" && data.room ? data.room : null;
    if (moved !== null && moved !== room) {
      // A server hook put the connection in another room: the join is that room's.
      state = this._move(room, moved, state, wasJoined);
      room = moved;
    }
    const seq = data && Number.isInteger(data.seq) ? data.seq : null;
    const recovered = data && "recovered" in data ? Boolean(data.recovered) : true;
    const epoch = data && typeof data.epoch === "string" && data.epoch ? data.epoch : null;
    const renumbered = epoch !== null && state.epoch !== null && epoch !== state.epoch;
    if (epoch !== null) state.epoch = epoch;
    let event = null;
    state.replay = null;
    if (since != null && seq != null) {
      let reset = false;
      if (recovered && !renumbered) {
        event = { type: "recovered", room, since, seq };
      } else {
        reset = seq < since || renumbered;
        event = { type: "gap", room, since, seq, reset };
        if (reset) {
          // Nothing of the new numbering was seen: what the server replays after this ack (all
          // the history it has for a stale epoch) is news, so the baseline is 0, not ack.seq.
          state.lastSeq = 0;
          state.own = null;
        }
      }
      const floor = reset ? 0 : since;
      // The replay that follows may repeat what was held before the ack (it ends at the
      // ack's seq when nothing was held; otherwise past it, at a live one).
      if (seq > floor) state.replay = [floor, seq, held.length === 0];
    }
    const released = held.filter((m) => this.accept(m));
    if (state.lastSeq == null && seq != null) state.lastSeq = seq;
    return [released, event];
  }

  /**
   * The join of `asked` was acked for `actual`: track the join under `actual`. `asked` stays
   * tracked only when it was joined before this join (the connection is still in it).
   */
  _move(asked, actual, state, wasJoined) {
    if (wasJoined) state = newState(); // asked keeps its own numbering; actual starts from this ack
    else this.rooms.delete(asked);
    this.leaving.delete(actual); // the join came after that leave: actual's deliveries are ours
    const known = this.rooms.get(actual);
    if (!known) {
      state.joined = true;
      this.rooms.set(actual, state);
      return state;
    }
    // Already tracked (joined, or joined by the server): its numbering and what it handed over
    // stand (a join of it still in flight keeps its own held deliveries).
    known.joined = true;
    return known;
  }

  /** The join failed: forget a room never acked, keep one joined before. */
  abortJoin(room) {
    const state = this.rooms.get(room);
    if (!state) return;
    state.joining = false;
    if (!state.joined && !state.byServer) this.rooms.delete(room);
    else {
      state.held = null;
      state.since = null;
    }
  }

  /**
   * A `subscribed` push: the server joined us to `room` at `seq` (numbering `epoch`). Returns a
   * `gap` event when it had joined a lost connection to the room too and messages were published
   * since the last one seen (`reset`: another epoch, or a seq behind it); null otherwise.
   */
  serverJoined(room, seq, epoch = null) {
    this.leaving.delete(room);
    const former = this.former.get(room);
    this.former.delete(room);
    let state = this.rooms.get(room);
    if (state) {
      // ours (joined or joining), or already known: its numbering stands
      state.byServer = true;
      if (state.lastSeq == null && state.held == null) state.lastSeq = seq;
      if (state.epoch == null && epoch) state.epoch = epoch;
      return null;
    }
    state = newState();
    state.byServer = true;
    state.lastSeq = seq;
    state.epoch = epoch || null;
    this.rooms.set(room, state);
    if (!former || former[0] == null) return null;
    const [last, oldEpoch] = former;
    const renumbered = Boolean(epoch && oldEpoch && epoch !== oldEpoch);
    if (seq === last && !renumbered) return null; // nothing was published while we were away
    return { type: "gap", room, since: last, seq, reset: renumbered || seq < last };
  }

  /** An `unsubscribed` push: the server took us out of `room`; nothing of it follows. */
  serverLeft(room) {
    this.former.delete(room);
    const state = this.rooms.get(room);
    if (!state) return;
    if (state.joining) {
      // our join, sent after the server's leave: its ack makes the room ours
      state.joined = false;
      state.byServer = false;
      return;
    }
    this.rooms.delete(room);
  }

  /** The application left `room`; `sent`: a leave went to the server (`left` follows). */
  leave(room, sent = true) {
    this.rooms.delete(room);
    if (sent) this.leaving.add(room);
  }

  /** The server acked our leave: a later delivery of `room` is a server join again. */
  left(room) {
    this.leaving.delete(room);
  }

  /** Whether a delivery goes to the application now. */
  accept(msg) {
    const state = this.rooms.get(msg.room);
    if (!state) {
      if (this.leaving.has(msg.room)) {
        this.unknown += 1; // in flight from before our leave
        return false;
      }
      const joined = newState(); // the server joined this connection to the room
      joined.byServer = true;
      joined.lastSeq = msg.seq;
      this.rooms.set(msg.room, joined);
      return true;
    }
    if (state.held) {
      state.held.push(msg);
      return false;
    }
    const last = state.lastSeq;
    const seq = msg.seq;
    if (last != null && seq <= last) {
      const replay = state.replay;
      if (replay == null || !(replay[0] < seq && seq <= replay[1])) return this._restarted(state, msg, last);
      this.duplicates += 1;
      if (seq === replay[1]) state.replay = null;
      return false;
    }
    state.lastSeq = seq;
    const replay = state.replay;
    if (replay != null && (seq > replay[1] || (seq === replay[1] && replay[2]))) {
      state.replay = null; // the replay is past: from now on a seq going back is a restart
    }
    if (state.own && state.own.size) {
      if (state.own.has(seq)) {
        state.own.delete(seq);
        passOwn(state);
        return false;
      }
      passOwn(state);
    }
    return true;
  }

  /** A live seq went back: the room started over, and `msg` opens its new numbering. */
  _restarted(state, msg, last) {
    this.resets += 1;
    state.lastSeq = msg.seq;
    state.own = null;
    state.replay = null;
    state.epoch = null; // the new one is learnt from the next join ack (since alone until then)
    if (this.onReset) this.onReset({ type: "gap", room: msg.room, since: last, seq: msg.seq, reset: true });
    return true;
  }

  /** Our publish to `room` was acked with `seq`: never hand it back to us. */
  published(room, seq) {
    const state = this.rooms.get(room);
    if (!state || !Number.isInteger(seq)) return;
    if (state.lastSeq != null && seq <= state.lastSeq) return;
    if (!state.own) state.own = new Set();
    state.own.add(seq);
    passOwn(state);
  }

  /** Rooms to rejoin after a reconnect. */
  joined() {
    return [...this.rooms].filter(([, s]) => s.joined).map(([room]) => room);
  }

  /** Rooms whose deliveries reach the application: joined, and the ones the server joined us to. */
  subscribed() {
    return [...this.rooms].filter(([, s]) => s.joined || s.byServer).map(([room]) => room);
  }

  /** Joins in flight died with the connection: held deliveries are dropped (the rejoin replays them). */
  connectionLost() {
    this.leaving.clear(); // the new connection is in none of them
    for (const [room, state] of [...this.rooms]) {
      if (!state.joined) {
        // joins in flight, and the rooms the server had joined that connection to
        this.rooms.delete(room);
        if (state.byServer) this.former.set(room, [state.lastSeq, state.epoch]);
      } else {
        state.held = null;
        state.since = null;
        state.replay = null;
        state.joining = false;
      }
    }
  }

  lastSeq(room) {
    const state = this.rooms.get(room);
    return state ? state.lastSeq : null;
  }

  /** The epoch of the room's numbering from the last join ack (null if the server sends none). */
  epoch(room) {
    const state = this.rooms.get(room);
    return state ? state.epoch : null;
  }
}

function passOwn(state) {
  const own = state.own;
  if (!own || state.lastSeq == null) return;
  let last = state.lastSeq;
  while (own.has(last + 1)) {
    last += 1;
    own.delete(last);
  }
  state.lastSeq = last;
}

// ------------------------------------------------------------------ the message buffer and its streams

/**
 * The client's one bounded buffer of deliveries, and the streams that read it (`client.messages()`).
 * The same rules as the Python client (client/inbox.py):
 *
 * - One buffer per client, filled from the first connection on (unless `onMessage` takes the
 *   deliveries instead), so nothing is lost between `join()` and the first read.
 * - A stream is a view, not a buffer: `messages("r")` reads the buffer's messages of room `r`,
 *   `messages()` those of every room, each oldest first. Creating one per read
 *   (`await client.messages(r).get(1000)`) and dropping it loses nothing and holds nothing.
 * - Each message is read once, by the first read that asks for it; a message that arrives while
 *   reads wait goes to a waiting read of its room before a waiting all-rooms read.
 * - Bounded: at most `maxBuffered` messages, all rooms together. When full the oldest is dropped;
 *   the next read that could have returned it rejects with `MessagesDropped(count)` once, and an
 *   `overflow` event {room, dropped} is emitted at the first drop of a room's burst.
 * - After `close()` every stream drains what it can read, then ends; `leave(room)` (or a rejoin
 *   refused for good) ends the streams of `room` made before it once they read what came before it.
 *
 * Messages are numbered in arrival order and kept per room, with one arrival-order list of
 * [number, room] for all-rooms reads and for dropping the oldest: a room read leaves a stale entry
 * there, skipped when met and compacted away once stale entries outnumber live ones.
 */
class Queue {
  constructor() {
    this.items = [];
    this.head = 0;
  }
  get length() {
    return this.items.length - this.head;
  }
  push(x) {
    this.items.push(x);
  }
  peek() {
    return this.items[this.head];
  }
  shift() {
    const x = this.items[this.head];
    this.items[this.head] = undefined;
    this.head += 1;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return x;
  }
  *[Symbol.iterator]() {
    for (let i = this.head; i < this.items.length; i++) yield this.items[i];
  }
}

const END = Symbol("end of stream");

class MessageBuffer {
  constructor(client, maxBuffered) {
    if (!(maxBuffered >= 1)) throw new RangeError("maxBuffered must be >= 1");
    this.client = client;
    this.maxBuffered = maxBuffered;
    this.dropped = 0; // since the client started
    this.size = 0;
    this.n = 0; // arrival number of the next message
    this.rooms = new Map(); // room -> Queue of [n, msg]
    this.order = new Queue(); // [n, room], arrival order
    this.lost = new Map(); // room -> drops not yet reported
    this.roomWaiters = new Map(); // room -> [resolve]
    this.allWaiters = [];
    // room -> WeakRef of {end, error}: the current stretch of its streams, held by them alone (a
    // stream made for one read and dropped leaves nothing behind), so that a leave can end them
    this.memberships = new Map();
    this.ended = false;
    this.error = null;
  }

  put(msg) {
    const n = this.n++;
    if (this.size >= this.maxBuffered) this._dropOldest();
    let items = this.rooms.get(msg.room);
    if (!items) {
      items = new Queue();
      this.rooms.set(msg.room, items);
    }
    items.push([n, msg]);
    this.order.push([n, msg.room]);
    this.size += 1;
    // The room's reads are woken first, so their continuations run first: a waiting room read
    // takes the message before a waiting all-rooms read. Every woken read looks again.
    const waiters = this.roomWaiters.get(msg.room);
    if (waiters) {
      this.roomWaiters.delete(msg.room);
      for (const wake of waiters) wake(true);
    }
    if (this.allWaiters.length) {
      const all = this.allWaiters;
      this.allWaiters = [];
      for (const wake of all) wake(true);
    }
  }

  _dropOldest() {
    const msg = this.popOldest();
    if (msg === undefined) return;
    this.dropped += 1;
    const lost = this.lost.get(msg.room) || 0;
    this.lost.set(msg.room, lost + 1);
    if (lost === 0) this.client._emit("overflow", { room: msg.room, dropped: this.dropped });
  }

  popOldest() {
    const order = this.order;
    while (order.length) {
      const [n, room] = order.shift();
      const items = this.rooms.get(room);
      if (items && items.length && items.peek()[0] === n) return this._take(room, items);
    }
    return undefined;
  }

  /** The oldest message of `room` numbered below `before` (any when null), or undefined. */
  popRoom(room, before = null) {
    const items = this.rooms.get(room);
    if (!items || !items.length || (before != null && items.peek()[0] >= before)) return undefined;
    const n = items.peek()[0];
    const msg = this._take(room, items);
    const order = this.order;
    if (order.length && order.peek()[0] === n) order.shift(); // it was the oldest of all
    else if (order.length > 2 * this.size + 64) this._compact();
    return msg;
  }

  _take(room, items) {
    const msg = items.shift()[1];
    if (!items.length) this.rooms.delete(room);
    this.size -= 1;
    return msg;
  }

  _compact() {
    const live = new Set();
    for (const items of this.rooms.values()) for (const [n] of items) live.add(n);
    const order = new Queue();
    for (const entry of this.order) if (live.has(entry[0])) order.push(entry);
    this.order = order;
  }

  /** Throw `MessagesDropped` for the drops a read of `room` (null: every room) could have returned, once. */
  reportLost(room) {
    if (room === null) {
      if (!this.lost.size) return;
      let count = 0;
      for (const c of this.lost.values()) count += c;
      this.lost.clear();
      throw new MessagesDropped(count);
    }
    const count = this.lost.get(room);
    if (count) {
      this.lost.delete(room);
      throw new MessagesDropped(count);
    }
  }

  /** Resolves true when a message (or an end) may be there, false once `deadline` (ms, `now()`) passed. */
  wait(room, deadline) {
    return new Promise((resolve) => {
      let timer = null;
      const wake = (woken) => {
        clearTimeout(timer);
        resolve(woken);
      };
      const list = room === null ? this.allWaiters : this.roomWaiters.get(room) || [];
      if (room !== null && !this.roomWaiters.has(room)) this.roomWaiters.set(room, list);
      list.push(wake);
      if (deadline != null) {
        timer = setTimeout(() => {
          const current = room === null ? this.allWaiters : this.roomWaiters.get(room);
          const i = current ? current.indexOf(wake) : -1;
          if (i >= 0) current.splice(i, 1);
          if (room !== null && current && !current.length) this.roomWaiters.delete(room);
          resolve(false);
        }, Math.max(0, deadline - now()));
      }
    });
  }

  membership(room) {
    let m = this.memberships.get(room)?.deref();
    if (!m) {
      if (this.memberships.size >= 1024) {
        for (const [r, ref] of this.memberships) if (!ref.deref()) this.memberships.delete(r);
      }
      m = { end: null, error: null };
      this.memberships.set(room, new WeakRef(m));
    }
    return m;
  }

  endRoom(room, error = null) {
    const m = this.memberships.get(room)?.deref();
    this.memberships.delete(room);
    if (m) {
      m.end = this.n;
      m.error = error;
    }
    const waiters = this.roomWaiters.get(room);
    if (waiters) {
      this.roomWaiters.delete(room);
      for (const wake of waiters) wake(true);
    }
  }

  end(error = null) {
    if (!this.ended) {
      this.ended = true;
      this.error = error;
    }
    for (const ref of this.memberships.values()) {
      const m = ref.deref();
      if (m && m.end == null) m.end = this.n;
    }
    const all = this.allWaiters;
    this.allWaiters = [];
    for (const wake of all) wake(true);
    for (const [room, waiters] of [...this.roomWaiters]) {
      this.roomWaiters.delete(room);
      for (const wake of waiters) wake(true);
    }
  }
}

/**
 * `for await (const msg of client.messages(room))`, or `await stream.get(timeout)`: a view of the
 * client's buffer (see `MessageBuffer`). Reads reject with `MessagesDropped` once after an
 * overflow, `get(timeout)` with `MessageTimeout` ("no message in room 'r' within 1000 ms"; nothing
 * is lost), and with `ConnectionClosed` once the stream ended. `break` (or `return()`) ends this
 * stream only: the buffer and other streams go on.
 */
export class MessageStream {
  constructor(buffer, room) {
    this._buffer = buffer;
    this.room = room;
    this._membership = room === null ? null : buffer.membership(room);
    this._returned = false;
  }

  /** Messages buffered that this stream can read now. */
  get length() {
    const buffer = this._buffer;
    if (this.room === null) return buffer.size;
    const items = buffer.rooms.get(this.room);
    if (!items) return 0;
    const end = this._membership.end;
    if (end == null) return items.length;
    let count = 0;
    for (const [n] of items) if (n < end) count += 1;
    return count;
  }

  /** Messages the client's buffer dropped since the client started. */
  get dropped() {
    return this._buffer.dropped;
  }

  async _read(timeout) {
    const buffer = this._buffer;
    const deadline = timeout == null ? null : now() + timeout;
    for (;;) {
      if (this._returned) return END;
      buffer.reportLost(this.room);
      const msg = this.room === null ? buffer.popOldest() : buffer.popRoom(this.room, this._membership.end);
      if (msg !== undefined) return msg;
      const membership = this._membership;
      if (membership && membership.end != null) {
        if (membership.error) throw membership.error;
        return END;
      }
      if (buffer.ended) {
        if (buffer.error) throw buffer.error;
        return END;
      }
      if (!(await buffer.wait(this.room, deadline))) {
        const what = this.room === null ? "no message in any room" : `no message in room '${this.room}'`;
        throw new MessageTimeout(what, timeout, this.room);
      }
    }
  }

  next() {
    return this._read(null).then((value) => (value === END ? { value: undefined, done: true } : { value, done: false }));
  }

  /** One message within `timeout` ms (null: wait forever); rejects as the class docs say. */
  async get(timeout = null) {
    const value = await this._read(timeout);
    if (value === END) throw new ConnectionClosed(1000, "stream ended");
    return value;
  }

  /** The next buffered message, or undefined when none (overflow is not reported here). */
  getNowait() {
    if (this._returned) return undefined;
    return this.room === null ? this._buffer.popOldest() : this._buffer.popRoom(this.room, this._membership.end);
  }

  return() {
    this._returned = true;
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

// ------------------------------------------------------------------ one socket

/** One WebSocket: open until welcome, liveness watchdog, and a `closed` promise settled exactly once. */
class Connection {
  constructor(client, url) {
    this.client = client;
    this.welcome = null;
    this.closeInfo = null;
    this.lastReceived = now();
    this._pingSentAt = null;
    this._watchdog = null;
    this.opened = new Promise((resolve, reject) => {
      this._resolveOpened = resolve;
      this._rejectOpened = reject;
    });
    this.closed = new Promise((resolve) => {
      this._resolveClosed = resolve;
    });
    this.opened.catch(() => {}); // a failed open is reported through _open's await, never as unhandled
    const ws = new client._WebSocket(url);
    this.ws = ws;
    this._openTimer = setTimeout(
      () => this.abort(`no welcome within ${client.openTimeout} ms`),
      client.openTimeout,
    );
    ws.onmessage = (ev) => this._onData(ev.data);
    ws.onclose = (ev) => this._lost(ev.code || 1006, ev.reason || "");
    ws.onerror = () => {}; // a close event follows every error
  }

  get isOpen() {
    return this.welcome !== null && this.closeInfo === null;
  }

  send(message) {
    this.ws.send(JSON.stringify(message));
  }

  _onData(data) {
    this.lastReceived = now();
    this._pingSentAt = null; // any inbound traffic proves the connection alive, not only the pong
    if (typeof data !== "string") return; // JSON connections carry text frames only
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (this.welcome === null) {
      if (msg && msg.type === "welcome") {
        this.welcome = msg;
        clearTimeout(this._openTimer);
        this._startWatchdog();
        this._resolveOpened(this);
      }
      return;
    }
    this.client._onFrame(this, msg);
  }

  _startWatchdog() {
    const { pingInterval, pingTimeout } = this.client;
    if (!pingInterval) return;
    const tick = Math.max(10, Math.min(pingInterval, pingTimeout) / 4);
    this._watchdog = setInterval(() => {
      const t = now();
      if (this._pingSentAt !== null) {
        if (t - this._pingSentAt >= pingTimeout) this.abort(`no pong within ${pingTimeout} ms`);
      } else if (t - this.lastReceived >= pingInterval) {
        this._pingSentAt = t;
        try {
          this.send({ type: "ping", ts: Date.now() });
        } catch {
          this.abort("send failed");
        }
      }
    }, tick);
  }

  /** Settle everything once; later close events from the browser are ignored. */
  _lost(code, reason) {
    if (this.closeInfo) return;
    this.closeInfo = { code, reason };
    clearTimeout(this._openTimer);
    clearInterval(this._watchdog);
    const ws = this.ws;
    ws.onmessage = ws.onclose = ws.onerror = null;
    if (this.welcome === null) {
      this._rejectOpened(new ConnectionClosed(code, reason || "connection failed before the welcome"));
    } else {
      this.client._onLost(this, code, reason);
    }
    this._resolveClosed(this.closeInfo);
  }

  /** Declare the connection dead (close code 1006 locally) without waiting for a close handshake. */
  abort(reason = "aborted") {
    try {
      this.ws.close(4000, reason.slice(0, 120)); // browsers allow only 1000 and 3000-4999
    } catch {
      /* already closed */
    }
    this._lost(1006, reason);
  }

  /** Close with `code` and settle at once; the browser finishes the handshake in the background. */
  close(code = 1000, reason = "") {
    try {
      this.ws.close(code, reason);
    } catch {
      // browsers refuse codes other than 1000 and 3000-4999 (InvalidAccessError): close anyway
      try {
        this.ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    this._lost(code, reason);
  }
}

// ------------------------------------------------------------------ the client

function tokenExpired(token, skewSeconds = 0) {
  if (!token) return false;
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    return typeof claims.exp === "number" && claims.exp + skewSeconds <= Date.now() / 1000;
  } catch {
    return false; // not a JWT we can read: let the server decide
  }
}

function resolveUrl(url, token) {
  const base = globalThis.location ? globalThis.location.href : undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (token) u.searchParams.set("token", token);
  return u.toString();
}

/**
 * A pub/sub session against one URL; create it with `await connect(url, options)`.
 *
 * Options (all optional; durations in ms):
 * - `token`: JWT, sent as `?token=`.
 * - `requestTimeout` (5000): default per request, override per call with `{timeout}`; null waits forever.
 * - `openTimeout` (5000): TCP + upgrade + welcome.
 * - `pingInterval` (20000) / `pingTimeout` (10000): after `pingInterval` without inbound
 *   traffic an app-level ping is sent; nothing within `pingTimeout` drops the socket
 *   (disconnected with 1006) and reconnects. `pingInterval: 0` disables.
 * - `reconnect` (true), `backoffBase` (500), `backoffCap` (30000), `maxAttempts` (Infinity),
 *   `random` (Math.random), `stableAfter` (10000): see `Backoff` and the module docs.
 * - `refreshToken(why)`: called with 1000/4001 (close code) or 4001 (token expired before a
 *   reconnect); returns (or resolves to) a new token, or null to stop.
 * - `onMessage(msg)`: every delivery `{type, room, seq, from, payload}`, of the rooms joined
 *   and of the rooms the server joined this connection to (`rooms` lists both), instead of
 *   buffering it for `messages()` (as the Python client's `on_message`).
 * - `onPush(msg)`: every room-less push, as it came: a broadcast `{type: "broadcast", payload}`
 *   or a message of the application's own type (`conn.send`, e.g. `{type: "notice", text}`).
 * - `onEvent(event)`: every lifecycle event as `{type, ...detail}`.
 * - `maxBuffered` (10000): bound of the message buffer, all rooms together (see `MessageBuffer`);
 *   unused with `onMessage`, which takes every delivery instead (then `messages()` throws).
 * - `WebSocket`: constructor to use instead of the global one (tests, old Node).
 *
 * Events (EventTarget; `event.detail` holds the fields): `message`, `push` (the pushed message), `connected`
 * {welcome, reconnect}, `disconnected` {code, reason, willReconnect}, `reconnecting`
 * {attempt, delay, error}, `recovered` {room, since, seq}, `gap` {room, since, seq,
 * reset}, `rejoinfailed` {room, error}, `servererror` {code, message}, `overflow`
 * {room, dropped}, `subscribed` {room, seq, epoch} and `unsubscribed` {room, reason} (the server
 * joined this connection to a room / took it out of one), `closed` {error}. `connected` is the first
 * event of each connection: a reconnect emits `disconnected`, `reconnecting` (each attempt),
 * `connected` {reconnect: true} once every room is rejoined, then each room's `recovered` or
 * `gap` (and any other event of the new connection so far), as the Python client does.
 */
export class Client extends EventTarget {
  constructor(url, options = {}) {
    super();
    const o = options;
    this.url = url;
    this.token = o.token ?? null;
    this.requestTimeout = o.requestTimeout === undefined ? 5000 : o.requestTimeout;
    this.openTimeout = o.openTimeout ?? 5000;
    this.pingInterval = o.pingInterval ?? 20000;
    this.pingTimeout = o.pingTimeout ?? 10000;
    this.reconnect = o.reconnect ?? true;
    this.backoff = new Backoff({
      base: o.backoffBase ?? 500,
      cap: o.backoffCap ?? 30000,
      maxAttempts: o.maxAttempts ?? Infinity,
      random: o.random ?? Math.random,
    });
    this.stableAfter = o.stableAfter ?? 10000;
    this.refreshToken = o.refreshToken ?? null;
    this.onMessage = o.onMessage ?? null;
    this.onPush = o.onPush ?? null;
    this.onEvent = o.onEvent ?? null;
    this.maxBuffered = o.maxBuffered ?? 10000;
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    this.welcome = null;
    this.stats = { messages: 0, presenceEvents: 0, pushes: 0, sent: 0, reconnects: 0, errors: {} };
    this._rooms = new RoomTracker(({ type, ...detail }) => this._emit(type, detail));
    this._pending = new Map();
    this._nextId = 1;
    this._conn = null;
    this._ready = false; // a connection is open and its rooms are rejoined
    this._readyWaiters = new Set();
    this._buffer = this.onMessage ? null : new MessageBuffer(this, this.maxBuffered); // onMessage takes them instead
    this._closing = false;
    this._stopped = null;
    this._started = false;
    this._sleeper = null;
    this._held = null; // events of a connection not yet announced by `connected`
    this._done = new Promise((resolve, reject) => {
      this._resolveDone = resolve;
      this._rejectDone = reject;
    });
    this._done.catch(() => {}); // only waitClosed() callers should see the error
  }

  // ---------------------------------------------------------------- lifecycle

  /** Open the first connection. It is not retried: a wrong URL or token should fail loudly. */
  async start() {
    if (this._started) throw new WsfanError("ALREADY_STARTED", "client already started");
    this._started = true;
    let conn;
    try {
      conn = await this._open(false);
    } catch (e) {
      this._finish(e);
      throw e;
    }
    this._supervise(conn);
    return this;
  }

  /** Close for good: no reconnect, waiting calls fail, message streams end. */
  async close(code = 1000, reason = "") {
    if (this._closing) return this._done.catch(() => {});
    this._closing = true;
    this._wakeSleeper();
    const conn = this._conn;
    if (conn) conn.close(code, reason);
    this._finish(null);
  }

  /** Resolves after close(); rejects with why the client stopped on its own (ConnectionClosed). */
  waitClosed() {
    return this._done;
  }

  get connected() {
    return this._conn !== null && this._ready;
  }

  /** Why the client stopped for good, or null while it runs. */
  get stopped() {
    return this._stopped;
  }

  /**
   * Rooms whose deliveries reach the application: the ones joined (acked; rejoined after a
   * reconnect) and the ones the server joined this connection to (from their `subscribed` push
   * until an `unsubscribed` push or the end of the connection; the server decides again on the
   * next one, and a `gap` event says what was missed when it joins it again).
   */
  get rooms() {
    return this._rooms.subscribed();
  }

  /** The last seq handed to the application for `room`: what a rejoin sends as `since`. */
  lastSeq(room) {
    return this._rooms.lastSeq(room);
  }

  get duplicates() {
    return this._rooms.duplicates;
  }

  // ---------------------------------------------------------------- requests

  /**
   * Subscribe; with `since`, the server replays history after it first. Resolves `{room, seq, recovered}`:
   * `room` is the room actually joined (a server's before_join hook may move the join, docs/app-api.md);
   * the client then tracks, lists (`rooms`), hands over and rejoins that room.
   */
  join(room, { since = null, timeout } = {}) {
    const dl = this._deadline("join", timeout);
    return this._readyConnection(dl).then((conn) => this._joinOn(conn, room, since, dl));
  }

  /** Unsubscribe. The room is forgotten at once (no rejoin; its streams end) even if the reply is lost. */
  async leave(room, { timeout } = {}) {
    const connected = this.connected;
    this._rooms.leave(room, connected); // deliveries still in flight until the ack are dropped
    this._endStreams(room);
    if (!connected) return { room };
    const data = await this._request("leave", { room }, timeout);
    this._rooms.left(room);
    return data;
  }

  /**
   * Publish to a joined room; resolves `{room, seq}`. A payload the protocol refuses (`payloadProblem`:
   * NaN, undefined, a BigInt, a Date...) rejects with `InvalidPayload` before anything is sent.
   */
  async publish(room, payload, { timeout } = {}) {
    checkPayload(payload); // InvalidPayload before anything is sent (`payloadProblem`)
    const data = await this._request("publish", { room, payload }, timeout);
    this._rooms.published(room, data && data.seq);
    return data;
  }

  /** The server sends `payload` back to this connection only; resolves with it. */
  async echo(payload, { timeout } = {}) {
    checkPayload(payload);
    return this._request("echo", { payload }, timeout);
  }

  /** Who is in `room`, cluster-wide: resolves `[{conn, user, joined_at}]` (`joined_at` in unix ms). */
  async presence(room, { timeout } = {}) {
    const data = await this._request("presence", { room }, timeout);
    return data.presence || [];
  }

  /** How many are in `room`: resolves `{connections, users}` (users counted once). */
  async presenceStats(room, { timeout } = {}) {
    const data = await this._request("presence_stats", { room }, timeout);
    return { connections: data.connections, users: data.users };
  }

  /** Round trip through the server's message loop, in ms. */
  async ping({ timeout } = {}) {
    const started = now();
    await this._request("ping", { ts: Date.now() }, timeout);
    return now() - started;
  }

  /**
   * Publish without an id (no ack; errors arrive as `servererror` events). Throws NotConnected while
   * reconnecting, InvalidPayload as `publish` rejects.
   */
  publishNowait(room, payload) {
    checkPayload(payload);
    const conn = this._conn;
    if (!conn || !this._ready) throw new NotConnected(this._stopped ? "client stopped" : "not connected");
    conn.send({ type: "publish", room, payload });
    this.stats.sent += 1;
  }

  /**
   * Deliveries of every room (`room` null) or of one: a view of the client's one bounded buffer,
   * filled from the first connection on, so nothing is lost between `join()` and the first read
   * and `await client.messages(room).get(1000)` in a loop reads every message once, oldest first
   * (the rules: `MessageBuffer`). Throws when the client was created with `onMessage`.
   */
  messages(room = null) {
    if (!this._buffer) {
      throw new WsfanError("NO_BUFFER", "messages() is not available when the client was created with onMessage");
    }
    return new MessageStream(this._buffer, room);
  }

  // ---------------------------------------------------------------- internals: requests

  _deadline(kind, timeout) {
    const limit = timeout === undefined ? this.requestTimeout : timeout;
    return limit == null ? null : { kind, limit, at: now() + limit };
  }

  /** Run `fn` when `dl` expires, unless cancelled; returns the cancel function. */
  _onExpiry(dl, fn) {
    if (!dl) return () => {};
    const timer = setTimeout(fn, Math.max(0, dl.at - now()));
    return () => clearTimeout(timer);
  }

  _readyConnection(dl) {
    if (this._stopped) return Promise.reject(this._stopped);
    if (this._conn && this._ready) return Promise.resolve(this._conn);
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (conn) => {
          cancel();
          resolve(conn);
        },
        reject: (e) => {
          cancel();
          reject(e);
        },
      };
      const cancel = this._onExpiry(dl, () => {
        this._readyWaiters.delete(waiter);
        reject(new RequestTimeout(dl.kind, dl.limit));
      });
      this._readyWaiters.add(waiter);
    });
  }

  _setReady() {
    this._ready = true;
    const waiters = [...this._readyWaiters];
    this._readyWaiters.clear();
    for (const w of waiters) w.resolve(this._conn);
  }

  /** Send one request with a fresh id on `conn` and wait for its reply, bounded by `dl`. */
  _call(conn, kind, fields, dl) {
    if (!conn.isOpen) {
      const info = conn.closeInfo;
      return Promise.reject(info ? new ConnectionClosed(info.code, info.reason) : new NotConnected());
    }
    const id = String(this._nextId++);
    return new Promise((resolve, reject) => {
      const cancel = this._onExpiry(dl, () => {
        if (this._pending.delete(id)) reject(new RequestTimeout(dl.kind, dl.limit));
      });
      this._pending.set(id, {
        resolve: (v) => {
          cancel();
          resolve(v);
        },
        reject: (e) => {
          cancel();
          reject(e);
        },
      });
      const message = { type: kind, id };
      for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) message[k] = v;
      if (kind === "echo" || kind === "publish") message.payload = fields.payload ?? null;
      try {
        conn.send(message);
        this.stats.sent += 1;
      } catch (e) {
        this._pending.delete(id);
        cancel();
        reject(e);
      }
    });
  }

  _request(kind, fields, timeout) {
    const dl = this._deadline(kind, timeout);
    return this._readyConnection(dl).then((conn) => this._call(conn, kind, fields, dl));
  }

  async _joinOn(conn, room, since, dl) {
    const sent = this._rooms.beginJoin(room, since);
    const epoch = sent != null ? this._rooms.epoch(room) : null;
    let data;
    try {
      data = await this._call(conn, "join", { room, since: sent, epoch }, dl);
    } catch (e) {
      this._rooms.abortJoin(room);
      throw e;
    }
    const [released, event] = this._rooms.endJoin(room, data);
    for (const msg of released) this._handOver(msg);
    if (event) {
      const { type, ...detail } = event;
      this._emit(type, detail);
    }
    return data;
  }

  // ---------------------------------------------------------------- internals: incoming

  _onFrame(conn, msg) {
    if (!msg || typeof msg !== "object") return;
    const type = msg.type;
    if (type === "message") {
      if (this._rooms.accept(msg)) this._handOver(msg);
      return;
    }
    if (type === "joined" || type === "left") {
      // Another connection came or went (namespaces with join_leave): not numbered, not in history.
      this.stats.presenceEvents += 1;
      this._emit(type, { room: msg.room, user: msg.user, conn: msg.conn });
      return;
    }
    if (type === "subscribed") {
      // The server joined us (conn.join): numbered from its seq; a gap when it is a room of the
      // previous connection and messages were published while we were away.
      const gap = this._rooms.serverJoined(msg.room, msg.seq, msg.epoch || null);
      this._emit("subscribed", { room: msg.room, seq: msg.seq, epoch: msg.epoch ?? "" });
      if (gap) {
        const { type: kind, ...detail } = gap;
        this._emit(kind, detail);
      }
      return;
    }
    if (type === "unsubscribed") {
      this._rooms.serverLeft(msg.room); // after its last delivery: nothing of it follows
      this._emit("unsubscribed", { room: msg.room, reason: msg.reason ?? "" });
      return;
    }
    if (type !== "ack" && type !== "error" && type !== "echo" && type !== "pong") {
      // A room-less push: a broadcast ({type: "broadcast", payload}) or an application's own
      // message type (conn.send on the server, docs/app-api.md), handed over as it came.
      if (type !== "welcome" && typeof type === "string") this._push(msg);
      return;
    }
    if (type === "error") this.stats.errors[msg.code] = (this.stats.errors[msg.code] || 0) + 1;
    const id = msg.requestId;
    if (id == null) {
      if (type === "error") this._emit("servererror", { code: msg.code, message: msg.message });
      return;
    }
    const entry = this._pending.get(id);
    if (!entry) return; // the caller timed out: a late reply is dropped on purpose
    this._pending.delete(id);
    if (type === "ack") entry.resolve(msg.data ?? {});
    else if (type === "error") entry.reject(new ProtocolError(msg.code, msg.message));
    else if (type === "echo") entry.resolve(msg.payload);
    else entry.resolve(msg.ts);
  }

  _push(msg) {
    this.stats.pushes += 1;
    this._runCallback(this.onPush, msg, "onPush");
    this.dispatchEvent(new CustomEvent("push", { detail: msg }));
  }

  _handOver(msg) {
    this.stats.messages += 1;
    if (this._buffer) this._buffer.put(msg);
    else this._runCallback(this.onMessage, msg, "onMessage");
    this.dispatchEvent(new CustomEvent("message", { detail: msg }));
  }

  // One rule for the user's callbacks: an exception in one is logged and never reaches the
  // client's own receive loop (as the asyncio client's _run_callback does).
  _runCallback(callback, arg, name) {
    if (!callback) return;
    try {
      callback(arg);
    } catch (e) {
      console.error(`wsfan: ${name} failed`, e);
    }
  }

  _emit(type, detail) {
    if (this._held) {
      this._held.push([type, detail]); // a connection is being opened: its events follow its `connected`
      return;
    }
    if (this.onEvent) this._runCallback(this.onEvent, { type, ...detail }, `onEvent for ${type}`);
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** End the streams of `room` (every stream when undefined): they drain what they can read, then end or reject. */
  _endStreams(room, error = null) {
    if (!this._buffer) return;
    if (room === undefined) this._buffer.end(error);
    else this._buffer.endRoom(room, error);
  }

  // ---------------------------------------------------------------- internals: connections

  /**
   * Open a connection, rejoin every room on a reconnect, then emit `connected`: the first event of
   * each connection. What happens on it before every room is rejoined (`recovered`, `gap`,
   * `rejoinfailed`, `subscribed`, `joined`...) is held and emitted right after it, in order; an
   * attempt that fails first emits what it held when it fails, without a `connected` (as
   * client/events.py).
   */
  async _open(reconnect) {
    this._held = [];
    let conn;
    try {
      conn = await this._openHeld(reconnect);
    } catch (e) {
      this._releaseEvents();
      throw e;
    }
    const held = this._held;
    this._held = null;
    this._emit("connected", { welcome: conn.welcome, reconnect });
    for (const [type, detail] of held) this._emit(type, detail);
    return conn;
  }

  _releaseEvents() {
    const held = this._held || [];
    this._held = null;
    for (const [type, detail] of held) this._emit(type, detail);
  }

  async _openHeld(reconnect) {
    const conn = new Connection(this, resolveUrl(this.url, this.token));
    await conn.opened;
    if (this._closing) {
      conn.close(1000, "client closed");
      throw new NotConnected("client closed");
    }
    this._conn = conn;
    this.welcome = conn.welcome;
    if (reconnect) {
      try {
        await this._rejoinAll(conn);
      } catch (e) {
        conn.abort("rejoin failed");
        throw e;
      }
      this.stats.reconnects += 1;
    }
    if (!conn.isOpen) {
      const info = conn.closeInfo || { code: 1006, reason: "" };
      throw new ConnectionClosed(info.code, info.reason);
    }
    this._setReady();
    return conn;
  }

  async _rejoinAll(conn) {
    const rooms = this._rooms.joined();
    const dl = this._deadline("join", undefined);
    const results = await Promise.allSettled(rooms.map((room) => this._joinOn(conn, room, null, dl)));
    let failure = null;
    results.forEach((result, i) => {
      if (result.status === "fulfilled") return;
      const error = result.reason;
      if (error instanceof ProtocolError && !TRANSIENT_CODES.has(error.code)) {
        // the server refuses the room for good (e.g. FORBIDDEN with a new token): drop it and say so
        this._rooms.leave(rooms[i]);
        this._endStreams(rooms[i], error);
        this._emit("rejoinfailed", { room: rooms[i], error });
      } else if (!failure) {
        failure = error;
      }
    });
    if (failure) throw failure; // the connection failed during rejoin: the whole reconnect is retried
  }

  /** Runs synchronously when a welcomed socket closes: nothing may be sent on it afterwards. */
  _onLost(conn, code, reason) {
    if (conn === this._conn) {
      this._conn = null;
      if (!this._stopped) this._ready = false;
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    const error = new ConnectionClosed(code, reason);
    for (const entry of pending) entry.reject(error);
    this._rooms.connectionLost();
  }

  /** Supervise `conn` and its successors until the client stops; never rejects. */
  async _supervise(conn) {
    try {
      while (!this._closing) {
        const connectedAt = now();
        const { code, reason } = await conn.closed;
        if (this._closing) return;
        if (now() - connectedAt >= this.stableAfter) this.backoff.reset();
        let will = this.reconnect;
        if (will && NO_RECONNECT_CODES.has(code)) {
          const token = await this._refreshed(code);
          will = token != null;
          if (will) this.token = token;
        }
        this._emit("disconnected", { code, reason, willReconnect: will });
        if (!will) {
          this._finish(new ConnectionClosed(code, reason));
          return;
        }
        const next = await this._retry();
        if (!next) return;
        conn = next;
      }
    } catch (e) {
      console.error("wsfan: reconnect supervisor failed", e);
      this._finish(e); // a bug here must not leave callers waiting forever
    }
  }

  /** Attempt until connected (the new connection) or stopped for good (null). */
  async _retry() {
    const backoff = this.backoff;
    let error = null;
    while (!this._closing) {
      if (backoff.exhausted) {
        this._finish(new ConnectionClosed(1006, `gave up after ${backoff.attempt} reconnect attempts`));
        return null;
      }
      const delay = backoff.nextDelay();
      this._emit("reconnecting", { attempt: backoff.attempt, delay, error });
      await this._sleep(delay);
      if (this._closing) return null;
      if (tokenExpired(this.token)) {
        // a browser cannot see the 401 the server would answer: ask for a new token first
        const token = await this._refreshed(4001);
        if (token == null) {
          this._finish(new ConnectionClosed(4001, "token expired"));
          return null;
        }
        this.token = token;
      }
      try {
        return await this._open(true);
      } catch (e) {
        error = e;
      }
    }
    return null;
  }

  async _refreshed(why) {
    if (!this.refreshToken) return null;
    try {
      return (await this.refreshToken(why)) || null;
    } catch (e) {
      console.error("wsfan: refreshToken failed", e);
      return null;
    }
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this._sleeper = null;
        resolve();
      }, ms);
      this._sleeper = () => {
        clearTimeout(timer);
        this._sleeper = null;
        resolve();
      };
    });
  }

  _wakeSleeper() {
    if (this._sleeper) this._sleeper();
  }

  /** Stop for good. `error` null means the application closed us; otherwise it is why we gave up. */
  _finish(error) {
    if (this._stopped) return;
    this._closing = true;
    this._stopped = error || new ConnectionClosed(1000, "client closed");
    this._wakeSleeper();
    const conn = this._conn;
    this._conn = null;
    if (conn && conn.isOpen) conn.close(1000, "client stopped");
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) entry.reject(this._stopped);
    const waiters = [...this._readyWaiters];
    this._readyWaiters.clear();
    for (const w of waiters) w.reject(this._stopped);
    this._endStreams(undefined, error);
    this._releaseEvents(); // what an attempt in progress held comes before `closed`
    this._emit("closed", { error });
    if (error) this._rejectDone(error);
    else this._resolveDone();
  }
}

/**
 * `const client = await connect("ws://host:port/ws", { token, onEvent })`. Resolves once the
 * server's welcome arrived (`client.welcome`); the first connection is not retried. A relative
 * or http(s) URL is resolved against the page and turned into ws(s).
 */
export async function connect(url, options = {}) {
  return new Client(url, options).start();
}

export { tokenExpired, resolveUrl };
