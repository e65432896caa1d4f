/**
 * Unit tests of the cross-instance turn order (lib/sessions/turn_order.ts):
 * the arrival window, waiting for another instance's earlier or running
 * turn, an instance whose heartbeat stopped, abort. Instances share a Deno KV
 * file in a temporary directory, in this process; an injected clock and sleep
 * replace real waits.
 */

import assert, { deepEqual, equal, rejects } from "node:assert/strict";
import { TurnOrder, type TurnOrderOptions } from "../../lib/sessions/turn_order.ts";

const POLL_MS = 25;

/** A clock that a sleep moves forward at once; `onSleep` runs on each sleep. */
interface FakeTime {
  now: number;
  readonly sleeps: number[];
  onSleep?: () => unknown;
  /** The clock and sleep, to pass to {@linkcode TurnOrder.open}. */
  readonly options: Required<Pick<TurnOrderOptions, "now" | "sleep">>;
}

function fakeTime(start: number): FakeTime {
  const time: FakeTime = {
    now: start,
    sleeps: [],
    options: {
      now: () => time.now,
      sleep: async (ms, signal) => {
        signal.throwIfAborted();
        time.sleeps.push(ms);
        time.now += ms;
        await time.onSleep?.();
        signal.throwIfAborted();
      },
    },
  };
  return time;
}

/** Runs `body` with two instances (a, b) on one store, and a look at its tickets. */
async function twoInstances(
  time: FakeTime,
  body: (a: TurnOrder, b: TurnOrder, tickets: () => Promise<string[]>) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/turns.kv`;
  const options = { windowMs: 50, instanceTimeoutMs: 60_000, pollMs: POLL_MS, ...time.options };
  const a = await TurnOrder.open(path, { instance: "a", ...options });
  const b = await TurnOrder.open(path, { instance: "b", ...options });
  const look = await Deno.openKv(path);
  const tickets = async () => {
    const held: string[] = [];
    for await (const { key } of look.list({ prefix: ["turn"] })) held.push(String(key[4]));
    return held.map((instance) => instance.split("/")[0]);
  };
  try {
    await body(a, b, tickets);
  } finally {
    look.close();
    a.close();
    b.close();
    await Deno.remove(dir, { recursive: true });
  }
}

const never = new AbortController().signal;

Deno.test("turn order: a turn waits out the window from its arrival, no more", async () => {
  const time = fakeTime(1_000);
  const order = await TurnOrder.open(":memory:", {
    instance: "a",
    windowMs: 50,
    ...time.options,
  });
  try {
    const fresh = await order.take("p", "s", 990);
    await fresh.turn(never);
    deepEqual(time.sleeps, [40]);
    await fresh.finish();
    const late = await order.take("p", "s", time.now - 500);
    await late.turn(never);
    deepEqual(time.sleeps, [40]);
    await late.finish();
  } finally {
    order.close();
  }
});

Deno.test("turn order: a later turn waits for another instance's earlier one to finish", async () => {
  const time = fakeTime(1_000);
  await twoInstances(time, async (a, b, tickets) => {
    const first = await a.take("p", "s", 1_000);
    const second = await b.take("p", "s", 1_010);
    time.now = 2_000; // both past the window
    // The later ticket, not yet running, does not hold the earlier one up.
    await first.turn(never);
    equal(time.sleeps.length, 0);
    let finished = false;
    time.onSleep = async () => {
      if (time.sleeps.length === 3) {
        await first.finish();
        finished = true;
      }
    };
    await second.turn(never);
    assert(finished, "the second turn went before the first finished");
    equal(time.sleeps.length, 3);
    for (const ms of time.sleeps) assert(ms >= POLL_MS / 2 && ms < 1.5 * POLL_MS, `poll ${ms}`);
    deepEqual(await tickets(), ["b"]);
    await second.finish();
    deepEqual(await tickets(), []);
  });
});

Deno.test("turn order: a ticket that reached the store late waits for a later turn that went, started or not", async () => {
  const time = fakeTime(2_000);
  await twoInstances(time, async (a, b) => {
    // a's turn went (nothing earlier in the store) and may still wait in a's queue.
    const running = await a.take("p", "s", 1_010);
    await running.turn(never);
    // Another session is not held up.
    const other = await b.take("p", "other", 1_000);
    await other.turn(never);
    equal(time.sleeps.length, 0);
    const late = await b.take("p", "s", 1_000);
    time.onSleep = () => time.sleeps.length === 2 && running.finish();
    await late.turn(never);
    equal(time.sleeps.length, 2);
    await Promise.all([other.finish(), late.finish()]);
  });
});

Deno.test("turn order: an instance whose heartbeat stopped holds no session up", async () => {
  const time = fakeTime(0);
  await twoInstances(time, async (a, b, tickets) => {
    await a.take("p", "s", 10); // a's heartbeat, written at 0, lasts until 60 000
    const mine = await b.take("p", "s", 20);
    time.now = 60_001;
    await mine.turn(never);
    equal(time.sleeps.length, 0);
    // a counts as gone: its ticket was deleted on the way.
    deepEqual(await tickets(), ["b"]);
    await mine.finish();
  });
});

Deno.test("turn order: an abort ends the wait with its reason", async () => {
  const time = fakeTime(1_000);
  await twoInstances(time, async (a, b) => {
    const first = await a.take("p", "s", 1_000);
    const second = await b.take("p", "s", 1_010);
    time.now = 2_000;
    const controller = new AbortController();
    const reason = new Error("client gone");
    time.onSleep = () => time.sleeps.length === 2 && controller.abort(reason);
    await rejects(second.turn(controller.signal), reason);
    equal(time.sleeps.length, 2);
    await Promise.all([first.finish(), second.finish()]);
  });
});
