// The JS client's numbering rules (gap, duplicate, reset, recovered:false), from the shared
// vectors tests/vectors/numbering.json, which tests/test_numbering.py runs against
// client/rooms.py: one rule changed in one client and not the other fails one of the two.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { RoomTracker } from "../../client/js/wsfan.js";

const VECTORS = JSON.parse(readFileSync(new URL("../vectors/numbering.json", import.meta.url), "utf8"));

const delivery = (room, seq) => ({ type: "message", room, seq, from: "u", payload: seq });

function runStep(rooms, resets, step, where) {
  if ("join" in step) {
    const sent = rooms.beginJoin(step.join, step.since ?? null, step.epoch ?? null);
    assert.equal(sent, step.sends, where);
    if ("epoch_after" in step) assert.equal(rooms.epoch(step.join), step.epoch_after, where);
  } else if ("ack" in step) {
    const [released, event] = rooms.endJoin(step.ack, step.data);
    assert.deepEqual(released.map((m) => m.seq), step.released, where);
    assert.deepEqual(event, step.event, where);
  } else if ("deliver" in step) {
    const accepted = step.seqs.map((s) => rooms.accept(delivery(step.deliver, s)));
    assert.deepEqual(accepted, step.accepted, where);
  } else if ("published" in step) {
    rooms.published(step.published, step.seq);
  } else if ("lost" in step) {
    rooms.connectionLost();
  } else if ("abort" in step) {
    rooms.abortJoin(step.abort);
  } else if ("leave" in step) {
    rooms.leave(step.leave);
  } else if ("left" in step) {
    rooms.left(step.left);
  } else if ("server_join" in step) {
    const event = rooms.serverJoined(step.server_join, step.seq, step.epoch ?? null);
    assert.deepEqual(event, step.event, where);
  } else if ("server_leave" in step) {
    rooms.serverLeft(step.server_leave);
  } else if ("expect" in step) {
    const want = step.expect;
    for (const counter of ["duplicates", "resets", "unknown"]) {
      if (counter in want) assert.equal(rooms[counter], want[counter], `${where}: ${counter}`);
    }
    for (const [room, seq] of Object.entries(want.last_seq ?? {})) {
      assert.equal(rooms.lastSeq(room), seq, `${where}: last_seq of ${room}`);
    }
    for (const [room, epoch] of Object.entries(want.epoch ?? {})) {
      assert.equal(rooms.epoch(room), epoch, `${where}: epoch of ${room}`);
    }
    if ("joined" in want) assert.deepEqual(rooms.joined(), want.joined, where);
    if ("subscribed" in want) assert.deepEqual(rooms.subscribed(), want.subscribed, where);
    if ("reset_events" in want) assert.deepEqual(resets, want.reset_events, where);
  } else {
    assert.fail(`${where}: unknown step`);
  }
}

for (const c of VECTORS.cases) {
  test(`numbering: ${c.rule}`, () => {
    const resets = [];
    const rooms = new RoomTracker((event) => resets.push(event));
    c.steps.forEach((step, i) => runStep(rooms, resets, step, `step ${i}: ${JSON.stringify(step)}`));
  });
}

test("numbering: every step kind is exercised", () => {
  const kinds = new Set(VECTORS.cases.flatMap((c) => c.steps.map((s) => Object.keys(s)[0])));
  assert.deepEqual([...kinds].sort(), Object.keys(VECTORS.steps).sort());
});
