// The JS client against a real server (run by tests/test_browser.py with node's
// --experimental-websocket): the README pattern, one `messages(room).get()` per message, reads
// every message once, and a stream's timeout says what it waited for.
// argv: ws URL of a server. Prints one JSON line with what it saw; exits 1 on error.
import { connect } from "../../client/js/wsfan.js";

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
const out = { got, timeout, late, handed: alice.stats.messages, buffered: alice._buffer.size };
await alice.close();
await bob.close();
console.log(JSON.stringify(out));
