// The JS client against a real server (run by tests/test_browser.py with node's
// --experimental-websocket): the README pattern, one `messages(room).get()` per message, reads
// every message once, and a stream's timeout says what it waited for.
// argv: ws URL of a server. Prints one JSON line with what it saw; exits 1 on error.
import { InvalidPayload, connect } from "../../client/js/wsfan.js";

const [url] = process.argv.slice(2);
const alice = await connect(url, { pingInterval: 0 });
const bob = await connect(url, { pingInterval: 0 });
const room = "chat.general";
await alice.join(room);
await bob.join(room);
for (let i = 0; i < 20; i++) await bob.publish(room, { text: i });
const got = [];
for (let i = 0; i < 20; i++) got.push((await alice.messages(room).get(2000)).payload.text);
let timeout = null;
try {
  await alice.messages(room).get(50);
} catch (e) {
  timeout = [e.name, e.message];
}
await bob.publish(room, "late"); // a timeout loses nothing
const late = (await alice.messages().get(2000)).payload;
// payloads: the edges of the rule arrive exactly; what it refuses is refused before sending
const nest = (n) => (n === 0 ? [] : [nest(n - 1)]);
const edges = [2 ** 63, -(2 ** 63) + 1024, 2 ** 64 - 4096, 1e21, 0.1, "ü😀", nest(63), { a: [1, null, { b: "x" }] }];
const arrived = [];
for (const value of edges) {
  await bob.publish(room, value);
  arrived.push(JSON.stringify((await alice.messages(room).get(2000)).payload) === JSON.stringify(value));
}
const refusals = [];
for (const value of [NaN, Infinity, undefined, 10n, new Date(0), 2 ** 64, -(2 ** 63), "\ud800"]) {
  try {
    await bob.publish(room, value);
    refusals.push("sent");
  } catch (e) {
    refusals.push(e instanceof InvalidPayload ? "refused" : `${e.name}: ${e.message}`);
  }
}
const out = {
  got, timeout, late, arrived, refusals, errors: bob.stats.errors, handed: alice.stats.messages,
  buffered: alice._buffer.size,
};
await alice.close();
await bob.close();
console.log(JSON.stringify(out));
