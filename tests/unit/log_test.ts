import { deepEqual } from "node:assert/strict";
import { LogThrottle } from "../../lib/log.ts";

Deno.test("log throttle: one line per kind a minute, the next one counts what was left out", () => {
  let now = 0;
  const throttle = new LogThrottle({ now: () => now });
  const taken: (number | undefined)[] = [];
  taken.push(throttle.take("a"));
  for (let i = 0; i < 5; i++) {
    now += 1000;
    taken.push(throttle.take("a"));
  }
  // Another kind is not held back by the first.
  taken.push(throttle.take("b"));
  now = 60_000;
  taken.push(throttle.take("a"), throttle.take("a"));
  deepEqual(taken, [0, undefined, undefined, undefined, undefined, undefined, 0, 5, undefined]);
});

Deno.test("log throttle: the interval is the caller's", () => {
  let now = 0;
  const throttle = new LogThrottle({ everyMs: 10, now: () => now });
  deepEqual([throttle.take("a"), throttle.take("a")], [0, undefined]);
  now = 10;
  deepEqual(throttle.take("a"), 1);
});
