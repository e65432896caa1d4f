/**
 * The session store (lib/sessions/session_store.ts) on a KV file shared by
 * two stores, as two workers or two processes share it.
 */

import assert, { deepEqual, equal } from "node:assert/strict";
import { SessionStore } from "../../lib/sessions/session_store.ts";
import { WriteGenerations } from "../../lib/sessions/write_generations.ts";
import { removeTempDir, tempDir } from "../_helpers.ts";

Deno.test("session store: two writers on one base both keep their turn, one after the other", async () => {
  const dir = await tempDir("vllm-mqtt-kv-");
  const [a, b] = await Promise.all([
    SessionStore.open(`${dir}/s.kv`, 60_000),
    SessionStore.open(`${dir}/s.kv`, 60_000),
  ]);
  try {
    const turn = (text: string) => [
      { role: "user" as const, content: text, tokens: 5 },
      { role: "assistant" as const, content: `re: ${text}`, tokens: 5 },
    ];
    // Both instances load the same (empty) session, then both commit.
    const [seenByA, seenByB] = await Promise.all([a.load("p", "s"), b.load("p", "s")]);
    await a.commitTurn("p", "s", seenByA, 0, turn("from a"));
    await b.commitTurn("p", "s", seenByB, 0, turn("from b"));
    const { history, meta } = await a.load("p", "s");
    deepEqual(history.map((m) => [m.seq, m.content]), [
      [0, "from a"],
      [1, "re: from a"],
      [2, "from b"],
      [3, "re: from b"],
    ]);
    deepEqual([meta!.firstSeq, meta!.nextSeq], [0, 4]);
  } finally {
    a.close();
    b.close();
    await removeTempDir(dir);
  }
});

Deno.test("session store: kept messages outlive the meta record, rewritten about once a TTL", async () => {
  const dir = await tempDir("vllm-mqtt-kv-");
  const ttl = 60_000;
  const store = await SessionStore.open(`${dir}/s.kv`, ttl);
  try {
    const t0 = Date.now();
    const lifetimes: number[] = [];
    for (let turn = 0; turn < 12; turn++) {
      const now = t0 + turn * (ttl / 4);
      const session = await store.load("p", "s", now);
      await store.commitTurn("p", "s", session, 0, [
        { role: "user", content: `turn ${turn}`, tokens: 5 },
        { role: "assistant", content: "ok", tokens: 5 },
      ], now);
      const { meta, history } = await store.load("p", "s", now);
      equal(history.length, 2 * (turn + 1));
      // Every kept message lives at least as long as the record that names it.
      assert(meta!.messagesExpireAt! >= meta!.expiresAt, `turn ${turn}`);
      lifetimes.push(meta!.messagesExpireAt!);
    }
    // 12 turns over 2.75 TTLs: the history was written 3 times, not 12.
    equal(new Set(lifetimes).size, 3, String(lifetimes.map((t) => t - t0)));
  } finally {
    store.close();
    await removeTempDir(dir);
  }
});

Deno.test("session store: threads sharing write counters see each other's turns without re-reading", async () => {
  const dir = await tempDir("vllm-mqtt-kv-");
  const generations = WriteGenerations.create();
  // Two workers of one process: each store gets the counters from the shared buffer.
  const [a, b] = await Promise.all([
    SessionStore.open(`${dir}/s.kv`, 60_000, generations),
    SessionStore.open(`${dir}/s.kv`, 60_000, WriteGenerations.from(generations.buffer)),
  ]);
  const turn = (text: string) => [
    { role: "user" as const, content: text, tokens: 5 },
    { role: "assistant" as const, content: `re: ${text}`, tokens: 5 },
  ];
  try {
    await a.commitTurn("p", "s", await a.load("p", "s"), 0, turn("one"));
    const cached = await a.load("p", "s");
    equal(await a.load("p", "s"), cached, "an unchanged session is served from memory");
    await b.commitTurn("p", "s", await b.load("p", "s"), 0, turn("two"));
    deepEqual((await a.load("p", "s")).history.map((m) => m.content), [
      "one",
      "re: one",
      "two",
      "re: two",
    ]);
    await b.clear("p", "s");
    deepEqual((await a.load("p", "s")).history, []);
  } finally {
    a.close();
    b.close();
    await removeTempDir(dir);
  }
});
