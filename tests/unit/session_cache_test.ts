/**
 * Unit tests of a store's session cache (lib/sessions/session_cache.ts): the
 * write counter that lets a load skip every read, a write of another thread
 * in between, and the bound on what is remembered.
 */

import { equal, ok } from "node:assert/strict";
import type { Session } from "../../lib/sessions/records.ts";
import { SessionCache } from "../../lib/sessions/session_cache.ts";
import { WriteGenerations } from "../../lib/sessions/write_generations.ts";

const session = (nextSeq: number): Session => ({
  meta: { firstSeq: 0, nextSeq, lastActive: 0, expiresAt: 1 },
  history: [],
  versionstamp: `v${nextSeq}`,
});

Deno.test("session cache: a commit is remembered with its write counter; take empties the slot", () => {
  const generations = WriteGenerations.create();
  const cache = new SessionCache(generations);
  const before = cache.generation("p", "s");
  equal(before, 0);
  const one = session(1);
  cache.committed("p", "s", one, before);
  const cached = cache.take("p", "s");
  equal(cached?.session, one);
  equal(cached?.generation, 1);
  equal(cache.generation("p", "s"), 1);
  // Taken out: a second take finds nothing until the load puts it back.
  equal(cache.take("p", "s"), undefined);
  equal(cache.remember("p", "s", one, 1), one);
  equal(cache.take("p", "s")?.generation, 1);
});

Deno.test("session cache: another thread's write in between leaves the counter unknown", () => {
  const generations = WriteGenerations.create();
  const cache = new SessionCache(generations);
  const other = new SessionCache(WriteGenerations.from(generations.buffer));
  const before = cache.generation("p", "s");
  other.written("p", "s"); // e.g. a control command's clear on another thread
  cache.committed("p", "s", session(2), before);
  equal(cache.take("p", "s")?.generation, undefined);
  // A write forgets what was remembered.
  cache.committed("p", "s", session(3), cache.generation("p", "s"));
  cache.written("p", "s");
  equal(cache.take("p", "s"), undefined);
});

Deno.test("session cache: without shared counters nothing is vouched for; 1024 sessions at most", () => {
  const cache = new SessionCache();
  equal(cache.generation("p", "s"), undefined);
  cache.committed("p", "s", session(1), undefined);
  equal(cache.take("p", "s")?.generation, undefined);
  for (let i = 0; i <= 1024; i++) cache.remember("p", `s${i}`, session(i), undefined);
  equal(cache.take("p", "s0"), undefined, "the least recently used is forgotten");
  equal(cache.take("p", "s1")?.session.meta?.nextSeq, 1);
  equal(cache.take("p", "s1024")?.session.meta?.nextSeq, 1024);
});

Deno.test("session cache: bounded by the bytes its histories take, the least recently used forgotten first", () => {
  const cache = new SessionCache(undefined, { maxBytes: 1024 * 1024 });
  const long = (nextSeq: number): Session => ({
    ...session(nextSeq),
    history: Array.from({ length: 4 }, (_, seq) => ({
      seq,
      role: seq % 2 === 0 ? "user" : "assistant",
      content: "x".repeat(10_000),
      tokens: 2500,
    })),
  });
  for (let i = 0; i < 1000; i++) cache.remember("p", `s${i}`, long(i), undefined);
  ok(cache.bytes <= 1024 * 1024, `${cache.bytes} bytes`);
  ok(cache.size >= 12 && cache.size <= 13, `${cache.size} sessions`);
  equal(cache.take("p", "s999")?.session.meta?.nextSeq, 999);
  equal(cache.take("p", "s0"), undefined);
  for (let i = 0; i < 1000; i++) cache.take("p", `s${i}`);
  equal(cache.bytes, 0, "taking gives every byte back");
});
