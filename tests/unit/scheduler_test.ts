/** Unit tests of the scheduler: order, per-session lines, the in-flight cap, cancel, drain. */

import { deepEqual, equal, throws } from "node:assert/strict";
import { ServiceError } from "../../lib/protocol/errors.ts";
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

Deno.test("scheduler: priority then arrival; one per session; cap; queue_full; cancel", async () => {
  const started: string[] = [];
  const finishers = new Map<string, () => void>();
  const scheduler = new Scheduler<{ sessionKey: string; priority: number; name: string }>({
    maxQueue: 4,
    maxInFlight: 1,
    run: (item) =>
      new Promise<void>((resolve) => {
        started.push(item.name);
        finishers.set(item.name, resolve);
      }),
  });
  const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
  scheduler.submit({ sessionKey: "a", priority: 0, name: "a1" });
  scheduler.submit({ sessionKey: "a", priority: -5, name: "a2" });
  scheduler.submit({ sessionKey: "b", priority: 5, name: "b1" });
  scheduler.submit({ sessionKey: "c", priority: -1, name: "c1" });
  scheduler.submit({ sessionKey: "d", priority: 0, name: "d1" });
  throws(
    () => scheduler.submit({ sessionKey: "e", priority: 0, name: "e1" }),
    (e: ServiceError) => e.code === "queue_full",
  );
  const removed = scheduler.cancel("d", new ServiceError("cancelled", "x"));
  deepEqual(removed.map((i) => i.name), ["d1"]);
  // a2 (priority -5) becomes ready when a1 finishes and beats c1 (-1).
  for (const name of ["a1", "a2", "c1", "b1"]) {
    await tick();
    equal(started.at(-1), name);
    finishers.get(name)!();
  }
  await scheduler.idle();
  deepEqual(started, ["a1", "a2", "c1", "b1"]);
});
