// Unit tests of client/js/wsfan.js under node's test runner (`node --test tests/browser/`),
// run from tests/test_browser.py. A fake WebSocket talks to a tiny in-memory server that
// implements the protocol's join/leave/publish/echo/ping with per-room seq and history, so
// reconnect, rejoin with since, dedupe, gap and timeout rules can be driven exactly
// (drop a socket, freeze the server, lose history) without a browser or a real server.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Backoff,
  Client,
  ConnectionClosed,
  InvalidPayload,
  MessagesDropped,
  MessageTimeout,
  ProtocolError,
  RequestTimeout,
  connect,
  payloadProblem,
  tokenExpired,
} from "../../client/js/wsfan.js";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(predicate, timeout = 2000) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeout} ms: ${predicate}`);
    await sleep(2);
  }
}

/** Numbers from a fixed list, like a seeded RNG: predictable jitter. */
function sequence(values) {
  let i = 0;
  return () => values[i++ % values.length];
}

// ------------------------------------------------------------------ fake server

class FakeServer {
  constructor({ historySize = 100 } = {}) {
    this.rooms = new Map();
    this.sockets = [];
    this.urls = [];
    this.historySize = historySize;
    this.refuse = false; // new connections fail like a refused TCP connection (close 1006)
    this.frozen = false; // nothing is answered, not even pings
    this.received = [];
    this.nextConn = 1;
    this.epochs = 0;
    this.refuseJoins = new Map(); // room -> error code for every join of it (FORBIDDEN, UNAVAILABLE, ...)
  }

  get WebSocket() {
    const server = this;
    return class FakeWebSocket {
      constructor(url) {
        this.url = url;
        this.joined = new Set();
        this.open = true;
        server.urls.push(url);
        server.sockets.push(this);
        setTimeout(() => {
          if (server.refuse) return this.drop(1006);
          this.conn = `c${server.nextConn++}`;
          this.push({ type: "welcome", conn: this.conn, user: this.conn, heartbeat: 30000, node: "fake" });
        }, 1);
      }
      send(data) {
        if (!this.open) throw new Error("send on closed socket");
        const msg = JSON.parse(data);
        server.received.push(msg);
        if (!server.frozen) server.handle(this, msg);
      }
      close(code = 1000, reason = "") {
        this.closedWith = { code, reason };
        this.open = false;
        setTimeout(() => this.onclose && this.onclose({ code, reason }), 1);
      }
      push(obj) {
        if (this.open && this.onmessage) this.onmessage({ data: JSON.stringify(obj) });
      }
      /** The server side ends the connection (1006: no close frame, the socket died). */
      drop(code = 1006, reason = "") {
        this.open = false;
        if (this.onclose) this.onclose({ code, reason });
      }
    };
  }

  room(name) {
    if (!this.rooms.has(name)) this.rooms.set(name, { seq: 0, history: [], epoch: `e${++this.epochs}` });
    return this.rooms.get(name);
  }

  handle(ws, m) {
    const reply = (obj) => ws.push(obj);
    const ack = (data) => m.id && reply({ type: "ack", requestId: m.id, success: true, data });
    switch (m.type) {
      case "join": {
        const refused = this.refuseJoins.get(m.room);
        if (refused) {
          reply({ type: "error", requestId: m.id, success: false, code: refused, message: "refused" });
          return;
        }
        const room = this.room(m.room);
        ws.joined.add(m.room);
        const since = m.since;
        const sameEpoch = m.epoch == null || m.epoch === room.epoch;
        // like the real server: a stale epoch gets the whole new numbering that history holds
        const replay = since == null ? [] : room.history.filter((d) => !sameEpoch || d.seq > since);
        const oldest = room.history.length ? room.history[0].seq : room.seq + 1;
        const recovered = since != null && sameEpoch && since <= room.seq && oldest <= since + 1;
        ack({ room: m.room, seq: room.seq, recovered, epoch: room.epoch });
        replay.forEach(reply);
        break;
      }
      case "leave":
        ws.joined.delete(m.room);
        ack({ room: m.room });
        break;
      case "publish": {
        if (!ws.joined.has(m.room)) {
          if (m.id) reply({ type: "error", requestId: m.id, success: false, code: "NOT_JOINED", message: "join first" });
          return;
        }
        this.publish(m.room, m.payload, ws);
        ack({ room: m.room, seq: this.room(m.room).seq });
        break;
      }
      case "echo":
        reply({ type: "echo", requestId: m.id, payload: m.payload });
        break;
      case "ping":
        reply({ type: "pong", requestId: m.id, ts: m.ts });
        break;
      default:
        reply({ type: "error", requestId: m.id, success: false, code: "UNKNOWN_TYPE", message: m.type });
    }
  }

  /** Publish as another user (or as `sender`'s socket): delivered to every other member. */
  publish(name, payload, sender = null) {
    const room = this.room(name);
    room.seq += 1;
    const delivery = { type: "message", room: name, seq: room.seq, from: sender ? sender.conn : "other", payload };
    room.history.push(delivery);
    if (room.history.length > this.historySize) room.history.shift();
    for (const ws of this.sockets) if (ws !== sender && ws.open && ws.joined.has(name)) ws.push(delivery);
    return room.seq;
  }

  /** The server joins `ws` to a room (conn.join): a `subscribed` push, then its deliveries. */
  serverJoin(ws, name) {
    const room = this.room(name);
    ws.joined.add(name);
    ws.push({ type: "subscribed", room: name, seq: room.seq, epoch: room.epoch });
  }

  /** The server takes `ws` out of a room (conn.leave, POST /unsubscribe): an `unsubscribed` push. */
  serverLeave(ws, name, reason) {
    ws.joined.delete(name);
    ws.push(reason ? { type: "unsubscribed", room: name, reason } : { type: "unsubscribed", room: name });
  }

  /** Like a single node restarting: rooms and history gone, numbering starts over. */
  forget() {
    this.rooms.clear();
  }

  get last() {
    return this.sockets[this.sockets.length - 1];
  }
}

function fastOptions(server, extra = {}) {
  return {
    WebSocket: server.WebSocket,
    backoffBase: 5,
    backoffCap: 20,
    requestTimeout: 500,
    openTimeout: 300,
    pingInterval: 0,
    ...extra,
  };
}

// ------------------------------------------------------------------ backoff

test("backoff is full jitter: random() * min(cap, base * 2**attempt)", () => {
  const rnd = sequence([0.5, 1, 0.25, 0.999, 0, 0.75, 1, 1]);
  const ref = sequence([0.5, 1, 0.25, 0.999, 0, 0.75, 1, 1]);
  const b = new Backoff({ base: 100, cap: 1000, random: rnd });
  const delays = Array.from({ length: 8 }, () => b.nextDelay());
  const expected = Array.from({ length: 8 }, (_, i) => ref() * Math.min(1000, 100 * 2 ** i));
  assert.deepEqual(delays, expected);
  assert.deepEqual(delays.slice(0, 4), [50, 200, 100, 799.2]);
  assert.ok(delays.every((d) => d >= 0 && d <= 1000));
  assert.equal(b.attempt, 8);
});

test("backoff reset, max attempts, and no overflow on long outages", () => {
  const b = new Backoff({ base: 1, cap: 10, maxAttempts: 2, random: () => 1 });
  assert.equal(b.exhausted, false);
  b.nextDelay();
  b.nextDelay();
  assert.equal(b.exhausted, true);
  b.reset();
  assert.equal(b.exhausted, false);
  assert.equal(b.attempt, 0);
  assert.equal(new Backoff().exhausted, false);
  assert.equal(new Backoff({ maxAttempts: null }).maxAttempts, Infinity);
  assert.equal(new Backoff({ base: 1000, cap: 30000 }).window(5000), 30000);
  assert.throws(() => new Backoff({ base: -1 }), RangeError);
});

// ------------------------------------------------------------------ rooms: dedupe and recovery
// The numbering rules are shared with the Python client as vectors: numbering.test.mjs.

// ------------------------------------------------------------------ client against the fake server

test("requests resolve with ack data; server errors reject with code and message", async () => {
  const server = new FakeServer();
  const c = await connect("ws://127.0.0.1:1/ws", fastOptions(server, { token: "a.b.c" }));
  assert.equal(new URL(server.urls[0]).searchParams.get("token"), "a.b.c");
  assert.equal(c.welcome.type, "welcome");
  assert.deepEqual(await c.join("r"), { room: "r", seq: 0, recovered: false, epoch: "e1" });
  assert.deepEqual(await c.publish("r", { x: 1 }), { room: "r", seq: 1 });
  assert.deepEqual(await c.echo({ deep: [1, null] }), { deep: [1, null] });
  assert.equal(await c.echo(null), null);
  assert.ok((await c.ping()) >= 0);
  await assert.rejects(c.publish("nope", 1), (e) => {
    assert.ok(e instanceof ProtocolError);
    assert.equal(e.code, "NOT_JOINED");
    assert.equal(e.serverMessage, "join first");
    return true;
  });
  assert.equal(c.stats.errors.NOT_JOINED, 1);
  const sent = server.received.find((x) => x.type === "join");
  assert.deepEqual(sent, { type: "join", id: sent.id, room: "r" }); // no since on a fresh join
  await c.close();
  await c.waitClosed();
  assert.equal(server.sockets[0].closedWith.code, 1000);
});

test("a timeout rejects, removes the pending entry, and the late reply is dropped", async () => {
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server));
  server.frozen = true;
  const started = Date.now();
  await assert.rejects(c.echo("late", { timeout: 50 }), (e) => {
    assert.ok(e instanceof RequestTimeout);
    assert.equal(e.code, "TIMEOUT");
    assert.equal(e.kind, "echo");
    return true;
  });
  assert.ok(Date.now() - started < 400);
  assert.equal(c._pending.size, 0);
  server.frozen = false;
  const late = server.received.find((x) => x.payload === "late");
  server.last.push({ type: "echo", requestId: late.id, payload: "late" }); // arrives after the timeout
  assert.equal(await c.echo("fresh"), "fresh");
  assert.equal(c._pending.size, 0);
  await c.close();
});

test("deliveries reach the callback or the buffer, and the EventTarget", async () => {
  const server = new FakeServer();
  const got = [];
  const c = await connect("ws://x/ws", fastOptions(server, { onMessage: (msg) => got.push(msg.seq) }));
  const events = [];
  c.addEventListener("message", (e) => events.push(e.detail.payload));
  await c.join("a");
  server.publish("a", "a1");
  server.publish("a", "a2");
  assert.deepEqual(events, ["a1", "a2"]);
  assert.deepEqual(got, [1, 2]);
  // onMessage takes every delivery instead of the buffer, as the Python client's on_message
  assert.throws(() => c.messages(), (e) => e.code === "NO_BUFFER");
  await c.close();
});

test("streams are views of one buffer: each message is read once, by the first read that asks", async () => {
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server));
  const events = [];
  c.addEventListener("message", (e) => events.push(e.detail.payload));
  const all = c.messages();
  const roomA = c.messages("a");
  await c.join("a");
  await c.join("b");
  server.publish("a", "a1");
  server.publish("b", "b1");
  server.publish("a", "a2");
  server.publish("a", "a3");
  assert.deepEqual(events, ["a1", "b1", "a2", "a3"]); // the EventTarget sees every delivery
  assert.deepEqual([(await roomA.get(100)).payload, (await roomA.get(100)).payload], ["a1", "a2"]);
  const seen = [];
  for await (const msg of all) {
    seen.push(msg.payload);
    if (seen.length === 2) break;
  }
  assert.deepEqual(seen, ["b1", "a3"]); // what the room stream read is not read again
  await assert.rejects(all.get(20), ConnectionClosed); // break ended that stream only
  await assert.rejects(roomA.get(20), MessageTimeout);
  // a waiting room read takes its room's message before a waiting all-rooms read
  const viaAll = c.messages().get(200);
  const viaRoom = roomA.get(200);
  server.publish("a", "a4");
  server.publish("b", "b2");
  assert.deepEqual([(await viaRoom).payload, (await viaAll).payload], ["a4", "b2"]);
  server.publish("a", "a5");
  await c.leave("a");
  assert.equal((await roomA.get(20)).payload, "a5"); // what came before the leave is read, then
  await assert.rejects(roomA.get(20), ConnectionClosed); // leaving ends the room's streams
  await c.close();
});

test("the README pattern, a stream per get, reads every message and leaks no stream", async () => {
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server));
  await c.join("js");
  for (let i = 0; i < 50; i++) server.publish("js", i);
  const got = [];
  for (let i = 0; i < 50; i++) got.push((await c.messages("js").get(1000)).payload);
  assert.deepEqual(got, [...Array(50).keys()]);
  for (let i = 0; i < 1000; i++) await assert.rejects(c.messages("js").get(0), MessageTimeout);
  // nothing holds those 1000 streams: later messages are buffered once, not once per stream made
  for (let i = 0; i < 3; i++) server.publish("js", 100 + i);
  assert.equal(c._buffer.size, 3);
  assert.equal(c._buffer.roomWaiters.size + c._buffer.allWaiters.length, 0);
  assert.deepEqual([(await c.messages().get(100)).payload, (await c.messages("js").get(100)).payload], [100, 101]);
  await c.close();
});

test("a stream's timeout says what it waited for", async () => {
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server));
  await assert.rejects(c.messages("chat.general").get(30), (e) => {
    assert.ok(e instanceof MessageTimeout && e instanceof RequestTimeout);
    assert.equal(e.message, "no message in room 'chat.general' within 30 ms");
    assert.equal(e.room, "chat.general");
    return true;
  });
  await assert.rejects(c.messages().get(30), { message: "no message in any room within 30 ms" });
  await c.close();
});

test("a callback that throws is logged and the client goes on (onMessage, onPush, onEvent)", async () => {
  const server = new FakeServer();
  const logged = [];
  const original = console.error;
  console.error = (...args) => logged.push(String(args[0]));
  try {
    const boom = () => {
      throw new Error("user bug");
    };
    const c = await connect("ws://x/ws", fastOptions(server, { onMessage: boom, onPush: boom, onEvent: boom }));
    const got = [];
    c.addEventListener("message", (e) => got.push(e.detail.payload));
    const pushed = [];
    c.addEventListener("push", (e) => pushed.push(e.detail.type));
    await c.join("a");
    server.publish("a", "a1");
    server.last.push({ type: "broadcast", payload: 1 });
    server.publish("a", "a2");
    assert.deepEqual(got, ["a1", "a2"]); // the EventTarget still saw every delivery
    assert.deepEqual(pushed, ["broadcast"]);
    assert.equal(await c.echo("still here"), "still here");
    assert.ok(logged.includes("wsfan: onMessage failed"), logged.join("|"));
    assert.ok(logged.includes("wsfan: onPush failed"), logged.join("|"));
    assert.ok(logged.some((line) => line.startsWith("wsfan: onEvent for ")), logged.join("|"));
    await c.close();
  } finally {
    console.error = original;
  }
});

test("room-less pushes and deliveries of rooms the server joined us to reach the application", async () => {
  const server = new FakeServer();
  const pushes = [];
  const c = await connect("ws://x/ws", fastOptions(server, { onPush: (msg) => pushes.push(msg) }));
  const events = [];
  c.addEventListener("push", (e) => events.push(e.detail.type));
  const got = [];
  c.addEventListener("message", (e) => got.push([e.detail.room, e.detail.seq]));
  server.last.push({ type: "broadcast", payload: { notice: "restart" } });
  server.last.push({ type: "notice", text: "hi" }); // an application's own type (conn.send)
  assert.deepEqual(pushes, [
    { type: "broadcast", payload: { notice: "restart" } },
    { type: "notice", text: "hi" },
  ]);
  assert.deepEqual(events, ["broadcast", "notice"]);
  assert.equal(c.stats.pushes, 2);
  server.last.joined.add("user:1"); // the server joins the connection (conn.join): no ack, no request
  server.publish("user:1", "dm1");
  server.publish("user:1", "dm2");
  assert.deepEqual(got, [["user:1", 1], ["user:1", 2]]);
  assert.deepEqual(c.rooms, ["user:1"]);
  await c.leave("user:1");
  server.publish("user:1", "after"); // the fake left us out of it: nothing arrives
  assert.deepEqual(c.rooms, []);
  server.last.drop(1006); // a new connection: the server's joins were that connection's
  await new Promise((resolve) => c.addEventListener("connected", resolve, { once: true }));
  assert.deepEqual(c.rooms, []);
  await c.close();
});

test("subscribed/unsubscribed pushes: a server-joined room is listed, numbered, left, and its gap after a reconnect reported", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { onEvent: (e) => events.push(e) }));
  const seen = [];
  c.addEventListener("subscribed", (e) => seen.push(["subscribed", e.detail]));
  c.addEventListener("unsubscribed", (e) => seen.push(["unsubscribed", e.detail]));
  const got = [];
  c.addEventListener("message", (e) => got.push([e.detail.room, e.detail.seq]));
  server.publish("feed", "before"); // seq 1: before the join, not ours
  server.serverJoin(server.last, "feed");
  assert.deepEqual(seen, [["subscribed", { room: "feed", seq: 1, epoch: "e1" }]]);
  assert.deepEqual(c.rooms, ["feed"]); // listed at once, before any delivery
  server.publish("feed", "a");
  assert.deepEqual(got, [["feed", 2]]);
  assert.equal(c.lastSeq("feed"), 2);
  server.last.drop(1006); // the client does not rejoin it: the server joins the new connection
  await new Promise((resolve) => c.addEventListener("connected", resolve, { once: true }));
  assert.deepEqual(c.rooms, []);
  assert.ok(!server.received.some((m) => m.type === "join"), "no join sent for a server-joined room");
  server.publish("feed", "missed");
  server.publish("feed", "missed too");
  server.serverJoin(server.last, "feed");
  const gaps = events.filter((e) => e.type === "gap");
  assert.deepEqual(gaps, [{ type: "gap", room: "feed", since: 2, seq: 4, reset: false }]);
  assert.equal(events.indexOf(gaps[0]), events.findIndex((e) => e.type === "subscribed" && e.seq === 4) + 1);
  server.publish("feed", "b");
  assert.deepEqual(got, [["feed", 2], ["feed", 5]]);
  server.serverLeave(server.last, "feed", "kicked");
  assert.deepEqual(seen.at(-1), ["unsubscribed", { room: "feed", reason: "kicked" }]);
  assert.deepEqual(c.rooms, []);
  await c.join("mine");
  server.serverLeave(server.last, "mine");
  assert.deepEqual(seen.at(-1), ["unsubscribed", { room: "mine", reason: "" }]);
  assert.deepEqual(c.rooms, []); // one of the client's own rooms: gone too
  await c.close();
});

test("a slow stream drops its oldest messages and reports overflow", async () => {
  const server = new FakeServer();
  const overflow = [];
  const c = await connect("ws://x/ws", fastOptions(server, { maxBuffered: 3, onEvent: (e) => e.type === "overflow" && overflow.push(e.dropped) }));
  const s = c.messages("r");
  await c.join("r");
  for (let i = 1; i <= 5; i++) server.publish("r", i);
  assert.equal(s.dropped, 2);
  assert.deepEqual(overflow, [1]); // once per burst, as the Python client
  await assert.rejects(s.get(), (e) => e instanceof MessagesDropped && e.count === 2); // reported once
  assert.deepEqual([(await s.get()).payload, (await s.get()).payload, (await s.get()).payload], [3, 4, 5]);
  await c.close();
});

test("no reconnect after close 1000 or 4001 without a token refresh", async () => {
  for (const code of [1000, 4001]) {
    const server = new FakeServer();
    const events = [];
    const c = await connect("ws://x/ws", fastOptions(server, { onEvent: (e) => events.push(e) }));
    server.last.drop(code, "bye");
    await assert.rejects(c.waitClosed(), (e) => e instanceof ConnectionClosed && e.closeCode === code);
    assert.deepEqual(
      events.filter((e) => e.type === "disconnected").map((e) => [e.code, e.willReconnect]),
      [[code, false]],
    );
    assert.equal(events.some((e) => e.type === "reconnecting"), false);
    assert.equal(server.sockets.length, 1);
    await assert.rejects(c.ping(), ConnectionClosed);
  }
});

test("4001 reconnects when refreshToken supplies a new token", async () => {
  const server = new FakeServer();
  const asked = [];
  const c = await connect(
    "ws://x/ws",
    fastOptions(server, { token: "old", refreshToken: async (why) => (asked.push(why), "new") }),
  );
  server.last.drop(4001, "token expired");
  await until(() => c.connected && server.sockets.length === 2);
  assert.deepEqual(asked, [4001]);
  assert.equal(new URL(server.urls[1]).searchParams.get("token"), "new");
  await c.close();
});

test("an expired JWT is refreshed before reconnecting (a browser cannot see the 401)", async () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const expired = `${b64({ alg: "HS256" })}.${b64({ sub: "u", exp: Math.floor(Date.now() / 1000) - 60 })}.sig`;
  const fresh = `${b64({ alg: "HS256" })}.${b64({ sub: "u", exp: Math.floor(Date.now() / 1000) + 600 })}.sig`;
  assert.equal(tokenExpired(expired), true);
  assert.equal(tokenExpired(fresh), false);
  assert.equal(tokenExpired("not a jwt"), false);
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server, { token: expired, refreshToken: () => fresh }));
  server.last.drop(1006);
  await until(() => c.connected && server.sockets.length === 2);
  assert.equal(new URL(server.urls[1]).searchParams.get("token"), fresh);
  await c.close();
  const s2 = new FakeServer();
  const c2 = await connect("ws://x/ws", fastOptions(s2, { token: expired }));
  s2.last.drop(1006);
  await assert.rejects(c2.waitClosed(), (e) => e.closeCode === 4001);
  assert.equal(s2.sockets.length, 1); // no pointless attempt with a token the server would refuse
});

test("reconnect rejoins with since and delivers each missed message once, in order", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { backoffBase: 30, backoffCap: 100, random: () => 1, onEvent: (e) => events.push(e) }));
  const stream = c.messages("rec");
  await c.join("rec");
  server.publish("rec", "m1");
  await c.publish("rec", "own"); // never handed back, not even on replay
  server.publish("rec", "m3");
  server.last.drop(1006); // the socket dies under the client
  assert.equal(c.connected, false);
  for (const text of ["m4", "m5", "m6"]) server.publish("rec", text); // while away (the reconnect waits 30 ms)
  await until(() => c.connected);
  const rejoin = server.received.filter((x) => x.type === "join").at(-1);
  assert.equal(rejoin.since, 3);
  assert.equal(rejoin.epoch, "e1"); // sent back so a renumbered room is not taken for the same one
  const payloads = [];
  while (stream.length) payloads.push((await stream.get()).payload);
  assert.deepEqual(payloads, ["m1", "m3", "m4", "m5", "m6"]);
  assert.deepEqual(events.find((e) => e.type === "recovered"), { type: "recovered", room: "rec", since: 3, seq: 6 });
  const kinds = events.map((e) => e.type);
  // connected is the first event of each connection: the rejoin's outcome follows it (client/events.py)
  assert.deepEqual(kinds, ["connected", "disconnected", "reconnecting", "connected", "recovered"]);
  assert.equal(events[1].code, 1006);
  assert.equal(events[1].willReconnect, true);
  assert.deepEqual([events[2].attempt, events[2].delay], [1, 30]);
  assert.equal(events[3].reconnect, true);
  server.publish("rec", "m7");
  assert.equal((await stream.get(100)).seq, 7);
  assert.equal(c.duplicates, 0);
  assert.equal(c.stats.reconnects, 1);
  await c.close();
});

test("a server that lost the room's history reports a gap and the new numbering continues", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { onEvent: (e) => events.push(e) }));
  const stream = c.messages("g");
  await c.join("g");
  for (const i of [1, 2, 3]) server.publish("g", i);
  server.last.drop(1001, "server going away");
  server.forget();
  await until(() => c.connected);
  assert.deepEqual(events.find((e) => e.type === "gap"), { type: "gap", room: "g", since: 3, seq: 0, reset: true });
  const order = events.filter((e) => e.type !== "reconnecting").map((e) => e.type);
  assert.deepEqual(order, ["connected", "disconnected", "connected", "gap"]); // as the Python client
  assert.equal(events.at(-2).reconnect, true);
  server.publish("g", "after");
  const seqs = [];
  while (stream.length) seqs.push((await stream.get()).seq);
  assert.deepEqual(seqs, [1, 2, 3, 1]);
  await c.close();
});

test("a room renumbered past since (new epoch) is a reset: the new numbering is delivered whole", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { backoffBase: 30, backoffCap: 100, random: () => 1, onEvent: (e) => events.push(e) }));
  const stream = c.messages("ep");
  await c.join("ep");
  for (const i of [1, 2]) server.publish("ep", `old ${i}`);
  server.last.drop(1006);
  server.forget(); // the broker lost the room; its new numbering soon passes our since (2)
  for (const i of [1, 2, 3, 4]) server.publish("ep", `new ${i}`);
  await until(() => c.connected);
  assert.deepEqual(events.find((e) => e.type === "gap"), { type: "gap", room: "ep", since: 2, seq: 4, reset: true });
  const got = [];
  while (stream.length) got.push((await stream.get()).payload);
  // new 1 and new 2 have seqs we saw before: without the epoch they would be dropped as duplicates
  assert.deepEqual(got, ["old 1", "old 2", "new 1", "new 2", "new 3", "new 4"]);
  server.publish("ep", "new 5");
  assert.equal((await stream.get(100)).payload, "new 5");
  assert.equal(c.duplicates, 0);
  await c.close();
});

test("history too short for the outage: gap without reset, partial replay delivered", async () => {
  const server = new FakeServer({ historySize: 2 });
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { backoffBase: 30, backoffCap: 100, random: () => 1, onEvent: (e) => events.push(e) }));
  const stream = c.messages("h");
  await c.join("h");
  server.publish("h", 1);
  server.last.drop(1006);
  for (const i of [2, 3, 4, 5]) server.publish("h", i);
  await until(() => c.connected);
  assert.deepEqual(events.find((e) => e.type === "gap"), { type: "gap", room: "h", since: 1, seq: 5, reset: false });
  const got = [];
  while (stream.length) got.push((await stream.get()).payload);
  assert.deepEqual(got, [1, 4, 5]);
  await c.close();
});

test("reconnect delays follow the injected random and give up after maxAttempts", async () => {
  const server = new FakeServer();
  const events = [];
  const values = [0.9, 0.1, 0.5, 1];
  const c = await connect(
    "ws://x/ws",
    fastOptions(server, { backoffBase: 2, backoffCap: 10, maxAttempts: 4, random: sequence(values), onEvent: (e) => events.push(e) }),
  );
  server.refuse = true;
  server.last.drop(1006);
  await assert.rejects(c.waitClosed(), (e) => e instanceof ConnectionClosed && e.closeCode === 1006 && /gave up after 4/.test(e.message));
  const attempts = events.filter((e) => e.type === "reconnecting");
  assert.deepEqual(attempts.map((e) => e.attempt), [1, 2, 3, 4]);
  assert.deepEqual(attempts.map((e) => e.delay), [0.9 * 2, 0.1 * 4, 0.5 * 8, 1 * 10]);
  assert.ok(attempts.slice(1).every((e) => e.error instanceof ConnectionClosed && e.error.closeCode === 1006));
  assert.equal(server.sockets.length, 5);
  assert.equal(events.at(-1).type, "closed");
});

test("the backoff resets after a stable connection, not after a flapping one", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { stableAfter: 80, random: () => 0, onEvent: (e) => events.push(e) }));
  const attempts = () => events.filter((e) => e.type === "reconnecting").map((e) => e.attempt);
  server.last.drop(1006);
  await until(() => c.connected && server.sockets.length === 2);
  server.last.drop(1006); // right away: unstable, the attempt count goes on
  await until(() => c.connected && server.sockets.length === 3);
  assert.deepEqual(attempts(), [1, 2]);
  await sleep(120); // stable now
  server.last.drop(1006);
  await until(() => c.connected && server.sockets.length === 4);
  assert.deepEqual(attempts(), [1, 2, 1]);
  await c.close();
});

test("a silent connection is detected by app-level pings and replaced", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { pingInterval: 40, pingTimeout: 60, onEvent: (e) => events.push(e) }));
  await c.join("alive");
  await sleep(120); // idle but answering: pings keep it up
  assert.ok(server.received.filter((x) => x.type === "ping" && x.id === undefined).length >= 1);
  assert.equal(events.some((e) => e.type === "disconnected"), false);
  server.frozen = true; // half-open: the socket stays "open" but nothing comes back
  await until(() => events.some((e) => e.type === "disconnected"), 1000);
  const gone = events.find((e) => e.type === "disconnected");
  assert.equal(gone.code, 1006);
  assert.match(gone.reason, /no pong/);
  assert.equal(server.sockets[0].closedWith.code, 4000);
  server.frozen = false;
  await until(() => c.connected);
  assert.deepEqual(c.rooms, ["alive"]);
  await c.close();
});

test("requests made while reconnecting wait for the new connection within their timeout", async () => {
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server, { backoffBase: 60, random: () => 1 }));
  server.last.drop(1006);
  await assert.rejects(c.echo("x", { timeout: 10 }), RequestTimeout);
  assert.equal(c._readyWaiters.size, 0);
  assert.equal(await c.echo("waited", { timeout: 1000 }), "waited");
  await c.close();
  await assert.rejects(c.echo("after close"), ConnectionClosed);
});

test("requests in flight when the socket drops fail with ConnectionClosed, not resent", async () => {
  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server));
  server.frozen = true;
  const inflight = c.echo("lost");
  await until(() => server.received.some((x) => x.payload === "lost")); // sent, never answered
  server.last.drop(1006);
  await assert.rejects(inflight, (e) => e instanceof ConnectionClosed && e.closeCode === 1006);
  server.frozen = false;
  await until(() => c.connected);
  assert.equal(server.received.filter((x) => x.payload === "lost").length, 1);
  await c.close();
});

test("a rejoin refused for good drops the room; a transient refusal retries the reconnect", async () => {
  const server = new FakeServer();
  const events = [];
  const c = await connect("ws://x/ws", fastOptions(server, { random: () => 1, onEvent: (e) => events.push(e) }));
  const gone = c.messages("secret");
  await c.join("secret");
  await c.join("busy");
  server.refuseJoins.set("secret", "FORBIDDEN");
  server.refuseJoins.set("busy", "UNAVAILABLE"); // the broker is overloaded for a while
  server.last.drop(1006);
  await until(() => server.sockets.length >= 3); // the first rejoin attempts were given up and retried
  assert.equal(c.connected, false);
  server.refuseJoins.delete("busy");
  await until(() => c.connected);
  assert.deepEqual(c.rooms, ["busy"]);
  const failed = events.filter((e) => e.type === "rejoinfailed");
  assert.deepEqual(failed.map((e) => [e.room, e.error.code]), [["secret", "FORBIDDEN"]]);
  await assert.rejects(gone.get(50), (e) => e.code === "FORBIDDEN"); // its stream ends with the reason
  assert.ok(events.some((e) => e.type === "reconnecting" && e.error && e.error.code === "UNAVAILABLE"));
  await c.close();
});

test("a first connection that fails is not retried", async () => {
  const server = new FakeServer();
  server.refuse = true;
  await assert.rejects(connect("ws://x/ws", fastOptions(server)), ConnectionClosed);
  assert.equal(server.sockets.length, 1);
  if (typeof globalThis.WebSocket !== "function") {
    assert.throws(() => new Client("ws://x/ws"), TypeError); // Node 20: no global WebSocket
  }
});

test("payloads JSON would not carry exactly are refused before sending", async () => {
  const nest = (n) => (n === 0 ? [] : [nest(n - 1)]);
  class Point {
    constructor() {
      this.x = 1;
    }
  }
  const refused = [
    NaN, Infinity, -Infinity, undefined, 10n, 2 ** 64, -(2 ** 63), // JSON writes -9223372036854776000 () => 1, Symbol("s"),
    new Date(0), new Map(), new Set([1]), new Uint8Array(2), new Point(), "\ud800", { ["a\udfff"]: 1 },
    [1, , 3], { toJSON: () => 1 }, { [Symbol("k")]: 1 }, { a: [1, { b: NaN }] }, { a: undefined }, nest(64),
  ];
  for (const [i, value] of refused.entries()) assert.ok(payloadProblem(value), `refused[${i}] passed`);
  assert.equal(payloadProblem({ a: [1, { b: NaN }] }), "payload.a[1].b is NaN or Infinity, which JSON writes as null");
  const fine = [null, true, 0, -0.5, 1e21, 2 ** 63, -(2 ** 63) + 1024, 2 ** 64 - 4096, "ü😀", [], {}, Object.create(null), nest(63), { a: [1, "x", null] }];
  for (const [i, value] of fine.entries()) assert.equal(payloadProblem(value), null, `fine[${i}]`);

  const server = new FakeServer();
  const c = await connect("ws://x/ws", fastOptions(server));
  await c.join("p");
  const before = server.received.length;
  for (const value of [NaN, undefined, 10n, new Date(0)]) {
    await assert.rejects(c.publish("p", value), InvalidPayload);
    await assert.rejects(c.echo(value), InvalidPayload);
    assert.throws(() => c.publishNowait("p", value), InvalidPayload);
  }
  assert.equal(server.received.length, before); // nothing was sent
  await c.close();
});
