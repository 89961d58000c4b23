// The Bun baseline: the same protocol subset on Bun.serve and its built-in pub/sub (uWebSockets topics).
//
//   bun bench/baselines/bun_server.js --port PORT [--idle-timeout SECONDS] [--deflate]
//
// Written the way Bun's documentation shows it: ws.subscribe(room) on join and
// ws.publish(room, data) on publish, which sends to every subscriber of the topic
// except the publishing socket (server.publish would include it; the protocol says
// "every subscriber except the sender"). Payloads are parsed with JSON.parse and
// re-serialised with JSON.stringify, as idiomatic JavaScript does. No auth, rate
// limits or history. Heartbeats are Bun's own: idleTimeout (default 120 s) with
// sendPings.

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}
const port = Number(option("--port", "8768"));
const host = option("--host", "127.0.0.1");
const idleTimeout = Number(option("--idle-timeout", "120"));
// --deflate: negotiate permessage-deflate and compress publications (ws.publish's compress flag);
// Bun/uWebSockets' shared compressor, the baseline for wsfan --compression.
const deflate = args.includes("--deflate");

const seqs = new Map();
let ids = 0;

function error(requestId, code, message) {
  const out = { type: "error", success: false, code, message };
  if (requestId !== undefined) out.requestId = requestId;
  return JSON.stringify(out);
}

function ack(requestId, data) {
  return JSON.stringify({ type: "ack", requestId, success: true, data });
}

const server = Bun.serve({
  hostname: host,
  port,
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/ws") {
      const user = "bun-" + (++ids).toString(16);
      if (server.upgrade(req, { data: { user, rooms: new Set() } })) return undefined;
      return new Response("upgrade failed\n", { status: 400 });
    }
    if (url.pathname === "/healthz") return new Response("ok\n");
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    idleTimeout,
    sendPings: true,
    perMessageDeflate: deflate,
    publishToSelf: false,
    maxPayloadLength: 64 * 1024,
    open(ws) {
      const user = ws.data.user;
      ws.send(JSON.stringify({ type: "welcome", conn: user, user, heartbeat: idleTimeout * 1000, node: "bun" }));
    },
    message(ws, raw) {
      let msg;
      try {
        msg = JSON.parse(raw);
      } catch {
        ws.send(error(undefined, "INVALID_MESSAGE", "not parseable"));
        return;
      }
      const id = msg.id;
      const room = msg.room;
      switch (msg.type) {
        case "publish": {
          if (!ws.data.rooms.has(room)) {
            ws.send(error(id, "NOT_JOINED", `join ${room} before publishing to it`));
            return;
          }
          const seq = (seqs.get(room) ?? 0) + 1;
          seqs.set(room, seq);
          ws.publish(room, JSON.stringify({ type: "message", room, seq, from: ws.data.user, payload: msg.payload }), deflate);
          if (id !== undefined) ws.send(ack(id, { room, seq }));
          return;
        }
        case "join":
          if (typeof room !== "string" || room.length === 0) {
            ws.send(error(id, "INVALID_MESSAGE", "room required"));
            return;
          }
          ws.subscribe(room);
          ws.data.rooms.add(room);
          if (id !== undefined) ws.send(ack(id, { room, seq: seqs.get(room) ?? 0, recovered: false }));
          return;
        case "leave":
          ws.unsubscribe(room);
          ws.data.rooms.delete(room);
          if (id !== undefined) ws.send(ack(id, { room }));
          return;
        case "echo":
          ws.send(JSON.stringify({ type: "echo", requestId: id, payload: msg.payload }));
          return;
        case "ping":
          ws.send(JSON.stringify({ type: "pong", requestId: id, ts: msg.ts }));
          return;
        default:
          ws.send(error(id, "UNKNOWN_TYPE", `unknown message type ${msg.type}`));
      }
    },
  },
});

function shutdown() {
  server.stop(true);
  process.exit(0);
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
