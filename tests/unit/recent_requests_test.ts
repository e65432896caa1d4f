/** Unit tests of the dedup window, on an injected clock. */

import { deepEqual, equal, ok } from "node:assert/strict";
import { RecentRequests } from "../../lib/gateway/recent_requests.ts";
import type { ReplyBody } from "../../lib/protocol/mod.ts";

const done: ReplyBody = {
  type: "done",
  response: "hi",
  finish_reason: "stop",
  usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
  timing: { queue_ms: 0, ttft_ms: 0, total_ms: 0 },
};

Deno.test("recent requests: a repeat is running, then answered, until the window ends", () => {
  let now = 0;
  const recent = new RecentRequests(1000, { now: () => now });
  deepEqual(recent.check("a"), { kind: "new" });
  deepEqual(recent.check("a"), { kind: "running" });
  recent.answered("a", done);
  now = 999;
  deepEqual(recent.check("a"), { kind: "answered", answer: done });
  now = 1000;
  deepEqual(recent.check("a"), { kind: "new" }, "the window is over");
});

Deno.test("recent requests: record takes no repeat; forget allows a retry; 0 is off", () => {
  const recent = new RecentRequests(1000, { now: () => 0 });
  deepEqual(recent.record("a"), { kind: "new" });
  deepEqual(recent.record("a"), { kind: "new" });
  deepEqual(recent.check("a"), { kind: "running" }, "a redelivery of a recorded request");
  recent.forget("a");
  deepEqual(recent.check("a"), { kind: "new" });
  const off = new RecentRequests(0, { now: () => 0 });
  deepEqual(off.check("a"), { kind: "new" });
  deepEqual(off.check("a"), { kind: "new" });
});

Deno.test("recent requests: bounded in number, the oldest forgotten first", () => {
  const recent = new RecentRequests(1000, { maxEntries: 2, now: () => 0 });
  recent.check("a");
  recent.check("b");
  recent.check("c");
  deepEqual(recent.check("a"), { kind: "new" }, "a was forgotten");
  deepEqual(recent.check("c"), { kind: "running" });
});

Deno.test("recent requests: bounded by the bytes of their answers, the oldest forgotten first", () => {
  const recent = new RecentRequests(60_000, { maxBytes: 100_000, now: () => 0 });
  const long: ReplyBody = { ...done, response: "x".repeat(1000) } as ReplyBody;
  for (let i = 0; i < 1000; i++) {
    recent.check(`r${i}`);
    recent.answered(`r${i}`, long);
  }
  ok(recent.bytes <= 100_000, `${recent.bytes} bytes`);
  ok(recent.size > 30 && recent.size < 50, `${recent.size} kept`);
  deepEqual(recent.check("r999"), { kind: "answered", answer: long }, "the newest is kept");
  deepEqual(recent.check("r0"), { kind: "new" }, "the oldest is forgotten");
  for (let i = 0; i < 1000; i++) recent.forget(`r${i}`);
  deepEqual([recent.size, recent.bytes], [0, 0], "forgetting gives every byte back");
});

Deno.test("recent requests: a sweep forgets what the window has passed, with no request coming", () => {
  let now = 0;
  const recent = new RecentRequests(1000, { now: () => now });
  for (let i = 0; i < 10_000; i++) {
    recent.record(`s${i}#hash`);
    recent.check(`s${i}/r1`);
    recent.answered(`s${i}/r1`, done);
  }
  equal(recent.size, 20_000);
  now = 999;
  recent.sweep();
  equal(recent.size, 20_000);
  now = 1000;
  recent.sweep();
  deepEqual([recent.size, recent.bytes], [0, 0]);
});
