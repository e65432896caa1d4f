/**
 * Unit tests of the session record layout (lib/sessions/records.ts): long
 * messages in chunks that never split a surrogate pair, read back whole from
 * an in-memory Deno KV, chunks of another write left out, a missing chunk
 * reported as damage.
 */

import { deepEqual, equal, rejects } from "node:assert/strict";
import {
  messagePrefix,
  messageRecords,
  readHistory,
  type SessionMeta,
  splitText,
  writeBatches,
} from "../../lib/sessions/records.ts";
import { isDamage } from "../../lib/sessions/session_store_error.ts";

const meta = (firstSeq: number, nextSeq: number): SessionMeta => ({
  firstSeq,
  nextSeq,
  lastActive: 0,
  expiresAt: Infinity,
});

Deno.test("records: text is cut in chunks of 30 000 units, never inside a surrogate pair", () => {
  deepEqual(splitText("short"), ["short"]);
  const exact = "a".repeat(30_000);
  deepEqual(splitText(exact), [exact]);
  // An emoji (two units) across the boundary moves whole into the next chunk.
  const text = "a".repeat(29_999) + "😀" + "b".repeat(10);
  const chunks = splitText(text);
  deepEqual(chunks.map((chunk) => chunk.length), [29_999, 12]);
  equal(chunks.join(""), text);
  equal(splitText("x".repeat(60_001)).length, 3);
});

Deno.test("records: a long message is a head and tagged chunks, read back whole", async () => {
  const prefix = messagePrefix("p", "s");
  const long = "é".repeat(65_000);
  const records = messageRecords(prefix, 1, { role: "assistant", content: long, tokens: 9 }, "t1");
  deepEqual(records.map(([key]) => key), [
    ["message", "p", "s", 1],
    ["message", "p", "s", 1, "t1", 1],
    ["message", "p", "s", 1, "t1", 2],
  ]);
  const short = messageRecords(prefix, 0, { role: "user", content: "hi", tokens: 1 }, "t1");
  deepEqual(short, [[["message", "p", "s", 0], { role: "user", content: "hi", tokens: 1 }]]);
  using kv = await Deno.openKv(":memory:");
  // A chunk another write left under seq 1 (a turn that lost its commit) is not read.
  await kv.set([...prefix, 1, "t0", 1], "stale");
  await writeBatches(kv, [...short, ...records], 60_000);
  const history = await readHistory(kv, "p", "s", meta(0, 2));
  deepEqual(history, [
    { role: "user", content: "hi", tokens: 1, seq: 0 },
    { role: "assistant", content: long, tokens: 9, seq: 1, tag: "t1" },
  ]);
  // Only the range the meta record names.
  deepEqual((await readHistory(kv, "p", "s", meta(1, 2))).map((m) => m.seq), [1]);
  // A rewrite keeps the message's own tag.
  const rewritten = messageRecords(prefix, 1, history[1], "t2");
  equal(rewritten[1][0][4], "t1");
});

Deno.test("records: a message missing a chunk is damage", async () => {
  const prefix = messagePrefix("p", "s");
  const records = messageRecords(prefix, 0, {
    role: "user",
    content: "x".repeat(70_000),
    tokens: 1,
  }, "t");
  using kv = await Deno.openKv(":memory:");
  await writeBatches(kv, records.filter((_, i) => i !== 2), 60_000);
  await rejects(readHistory(kv, "p", "s", meta(0, 1)), (error) => isDamage(error));
});
