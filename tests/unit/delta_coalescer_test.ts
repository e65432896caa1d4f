/** Unit tests of the delta coalescer, with an injected timer. */

import { deepEqual, equal } from "node:assert/strict";
import { DeltaCoalescer } from "../../lib/workers/delta_coalescer.ts";

/** A timer that fires only when the test says so. */
function manualTimer() {
  const pending: { flush: () => void; ms: number; cancelled: boolean }[] = [];
  return {
    pending,
    schedule: (flush: () => void, ms: number) => {
      const entry = { flush, ms, cancelled: false };
      pending.push(entry);
      return () => entry.cancelled = true;
    },
    fire: () => {
      for (const entry of pending.splice(0)) if (!entry.cancelled) entry.flush();
    },
  };
}

Deno.test("delta coalescer: the first piece at once, then by size or time, numbered", () => {
  const sent: [number, string][] = [];
  const timer = manualTimer();
  const coalescer = new DeltaCoalescer((seq, text) => sent.push([seq, text]), {
    maxChars: 5,
    maxDelayMs: 50,
    schedule: timer.schedule,
  });
  coalescer.push("He");
  deepEqual(sent, [[0, "He"]]);
  coalescer.push("l");
  coalescer.push("l");
  equal(timer.pending.length, 1, "one timer for what waits");
  equal(timer.pending[0].ms, 50);
  timer.fire();
  deepEqual(sent, [[0, "He"], [1, "ll"]]);
  coalescer.push("o, wor");
  deepEqual(sent.at(-1), [2, "o, wor"], "5 characters or more go at once");
  coalescer.push("ld");
  coalescer.flush();
  deepEqual(sent.at(-1), [3, "ld"]);
  equal(timer.pending.every((entry) => entry.cancelled), true, "a flush stops the timer");
  coalescer.push("");
  coalescer.flush();
  equal(sent.length, 4, "nothing waiting: nothing sent");
});

Deno.test("delta coalescer: discard drops what waits", () => {
  const sent: string[] = [];
  const timer = manualTimer();
  const coalescer = new DeltaCoalescer((_, text) => sent.push(text), { schedule: timer.schedule });
  coalescer.push("a");
  coalescer.push("b");
  coalescer.discard();
  timer.fire();
  coalescer.flush();
  deepEqual(sent, ["a"]);
});
