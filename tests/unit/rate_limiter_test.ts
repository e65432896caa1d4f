/** Unit tests of the per-key token buckets, on an injected clock. */

import { equal } from "node:assert/strict";
import { RateLimiter } from "../../lib/gateway/rate_limiter.ts";

Deno.test("rate limiter: a burst goes through, then the rate applies, per key", () => {
  let now = 0;
  const limiter = new RateLimiter({ perMinute: 60, burst: 2, now: () => now });
  equal(limiter.take("a"), 0);
  equal(limiter.take("a"), 0);
  // Empty: one token a second, so the next one is a full second away.
  equal(limiter.take("a"), 1000);
  equal(limiter.take("b"), 0, "another key has its own bucket");
  now = 400;
  equal(limiter.take("a"), 600);
  now = 1000;
  equal(limiter.take("a"), 0);
  equal(limiter.take("a"), 1000);
});

Deno.test("rate limiter: refills up to the burst only; 0 per minute is off", () => {
  let now = 0;
  const limiter = new RateLimiter({ perMinute: 60, burst: 2, now: () => now });
  limiter.take("a");
  limiter.take("a");
  now = 60_000;
  equal(limiter.take("a"), 0);
  equal(limiter.take("a"), 0);
  equal(limiter.take("a"), 1000);
  const off = new RateLimiter({ perMinute: 0, burst: 1, now: () => now });
  for (let i = 0; i < 5; i++) equal(off.take("a"), 0);
});

Deno.test("rate limiter: past maxKeys the least recently used bucket is forgotten", () => {
  const limiter = new RateLimiter({ perMinute: 1, burst: 1, maxKeys: 2, now: () => 0 });
  equal(limiter.take("a"), 0);
  equal(limiter.take("b"), 0);
  equal(limiter.take("a") > 0, true);
  equal(limiter.take("c"), 0); // forgets b, the least recently used
  equal(limiter.take("a") > 0, true, "a was kept");
  equal(limiter.take("b"), 0, "b starts with a full bucket again");
});

Deno.test("rate limiter: a bucket that has filled up again is dropped; a burst of keys leaves none", () => {
  let now = 0;
  // 6 a minute: a bucket that gave one token is full again 10 s later.
  const limiter = new RateLimiter({ perMinute: 6, burst: 10, now: () => now });
  for (let i = 0; i < 10_000; i++) {
    now = i;
    equal(limiter.take(`session-${i}`), 0);
  }
  equal(limiter.size, 10_000);
  now = 14_999.5;
  equal(limiter.size, 5_000, "the first half has been idle 10 s");
  now = 19_999.5;
  equal(limiter.size, 0);
  // A bucket not full yet is kept, and still counts what it holds.
  for (let i = 0; i < 10; i++) limiter.take("busy");
  equal(limiter.take("busy"), 10_000);
  now += 50_000;
  limiter.sweep();
  equal(limiter.size, 1);
  equal(limiter.take("busy"), 0);
});
