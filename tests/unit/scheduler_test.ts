/** Unit tests of the scheduler: order, per-session lines, the in-flight cap, cancel, drain. */

import { deepEqual, equal, throws } from "node:assert/strict";
import { QueueFullError, Scheduler } from "../../lib/scheduler/scheduler.ts";

interface Item {
  readonly sessionKey: string;
  readonly priority: number;
  readonly name: string;
}

/** A scheduler whose runs end when the test says, and the signals they got. */
function scheduler(maxQueue: number, maxInFlight: number) {
  const started: string[] = [];
  const finish = new Map<string, () => void>();
  const signals = new Map<string, AbortSignal>();
  const s = new Scheduler<Item>({
    maxQueue,
    maxInFlight,
    run: (item, signal) => {
      started.push(item.name);
      signals.set(item.name, signal);
      const { promise, resolve } = Promise.withResolvers<void>();
      finish.set(item.name, resolve);
      return promise;
    },
  });
  const item = (sessionKey: string, name: string, priority = 0) => ({ sessionKey, priority, name });
  return { s, started, finish, signals, item };
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

Deno.test("scheduler: a full queue throws its own QueueFullError, with code queue_full", () => {
  const { s, item } = scheduler(1, 1);
  s.submit(item("a", "a1")); // runs at once
  s.submit(item("b", "b1")); // waits
  throws(
    () => s.submit(item("c", "c1")),
    (e) =>
      e instanceof QueueFullError && e.code === "queue_full" && e.maxQueue === 1 &&
      e.message === "the queue is full (1 waiting)",
  );
  equal(s.queued, 1);
  equal(s.inFlight, 1);
});

Deno.test("scheduler: one turn per session at a time; others run beside it", async () => {
  const { s, started, finish, item } = scheduler(10, 4);
  s.submit(item("a", "a1"));
  s.submit(item("a", "a2", -10));
  s.submit(item("b", "b1"));
  deepEqual(started, ["a1", "b1"], "a2 waits behind a1 whatever its priority");
  equal(s.hasSession("a"), true);
  equal(s.hasSession("a", (i) => i.name === "a2"), true);
  equal(s.hasSession("c"), false);
  finish.get("a1")!();
  await tick();
  deepEqual(started, ["a1", "b1", "a2"]);
  finish.get("a2")!();
  finish.get("b1")!();
  await s.idle();
  equal(s.hasSession("a"), false);
});

Deno.test("scheduler: cancel removes waiting turns and aborts the running one", async () => {
  const { s, started, finish, signals, item } = scheduler(10, 1);
  s.submit(item("a", "a1"));
  s.submit(item("a", "a2"));
  s.submit(item("b", "b1"));
  const reason = new Error("cancelled");
  deepEqual(s.cancel("a", reason, (i) => i.name === "a2").map((i) => i.name), ["a2"]);
  equal(signals.get("a1")!.aborted, false);
  deepEqual(s.cancel("a", reason).map((i) => i.name), [], "a running turn is not returned");
  equal(signals.get("a1")!.reason, reason);
  finish.get("a1")!();
  await tick();
  deepEqual(started, ["a1", "b1"]);
  finish.get("b1")!();
  await s.idle();
});

Deno.test("scheduler: drainQueue and abortRunning empty it at shutdown", async () => {
  const { s, finish, signals, item } = scheduler(10, 1);
  s.submit(item("a", "a1"));
  s.submit(item("a", "a2"));
  s.submit(item("b", "b1"));
  deepEqual(s.drainQueue().map((i) => i.name).sort(), ["a2", "b1"]);
  equal(s.queued, 0);
  const reason = new Error("stopping");
  s.abortRunning(reason);
  equal(signals.get("a1")!.reason, reason);
  let idle = false;
  const waited = s.idle().then(() => idle = true);
  await tick();
  equal(idle, false, "idle waits for the running turn");
  finish.get("a1")!();
  await waited;
  equal(idle, true);
});
