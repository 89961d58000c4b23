// The JS client against a real server (run by tests/test_presence.py with node's
// --experimental-websocket): presence(), presenceStats() and joined/left events.
// argv: ws URL of a server whose namespace "chat" has presence and join_leave, and a
// token for each of two users. Prints one JSON line with what it saw; exits 1 on error.
import { connect, ProtocolError } from "../../client/js/wsfan.js";

const [url, tokenA, tokenB] = process.argv.slice(2);
const events = [];
const waiters = [];
const onEvent = (e) => {
  if (e.type === "joined" || e.type === "left") events.push(e);
  waiters.splice(0).forEach((w) => w());
};
const nextEvent = (n) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${n}th event`)), 5000);
    const check = () => (events.length >= n ? (clearTimeout(timer), resolve()) : waiters.push(check));
    check();
  });

const a = await connect(url, { token: tokenA, onEvent, pingInterval: 0 });
const b = await connect(url, { token: tokenB, pingInterval: 0 });
const room = "chat:js";
await a.join(room);
const viaTarget = new Promise((resolve) => a.addEventListener("joined", (e) => resolve(e.detail), { once: true }));
await b.join(room);
await nextEvent(1);
const presence = await a.presence(room);
const stats = await b.presenceStats(room);
let notAvailable = null;
try {
  await a.presence("lobby");
} catch (e) {
  notAvailable = e instanceof ProtocolError ? e.code : String(e);
}
await b.leave(room);
await nextEvent(2);
const out = {
  events,
  target: await viaTarget,
  presence: presence.map((p) => [p.conn, p.user]).sort(),
  stats,
  notAvailable,
  counted: a.stats.presenceEvents,
  conns: [a.welcome.conn, b.welcome.conn],
};
await a.close();
await b.close();
console.log(JSON.stringify(out));
