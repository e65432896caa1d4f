/**
 * Unit tests of the session store's health gate (lib/sessions/storage_health.ts),
 * on an injected timer: no test waits for real time to pass.
 */

import assert, { equal, match, throws } from "node:assert/strict";
import { ServiceError } from "../lib/protocol/errors.ts";
import { SessionStore } from "../lib/sessions/session_store.ts";
import {
  asStorageError,
  checkHeadroom,
  storageFailure,
  StorageHealth,
} from "../lib/sessions/storage_health.ts";

/** A timer the test advances by hand: each sleep waits until the test fires it. */
class ManualTimer {
  readonly sleeps: { ms: number; wake: () => void }[] = [];

  sleep = (ms: number, signal: AbortSignal): Promise<void> =>
    new Promise((resolve, reject) => {
      const entry = { ms, wake: resolve };
      this.sleeps.push(entry);
      signal.addEventListener("abort", () => {
        this.sleeps.splice(this.sleeps.indexOf(entry), 1);
        reject(signal.reason);
      }, { once: true });
    });

  /** Waits for the probe loop's next sleep, ends it, and returns its length. */
  async fire(): Promise<number> {
    await settle(() => this.sleeps.length > 0);
    const { ms, wake } = this.sleeps.shift()!;
    wake();
    return ms;
  }
}

/** Lets the event loop turn until `check` holds (a bounded number of turns, no timing). */
async function settle(check: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !check(); i++) await new Promise((r) => setTimeout(r, 0));
  assert(check(), "the probe loop did not get there");
}

const DISK_FULL = new TypeError("database or disk is full");

Deno.test("storage health: what counts as a storage failure", () => {
  equal(storageFailure(DISK_FULL), "the disk is full");
  equal(storageFailure(new Error("No space left on device (os error 28)")), "the disk is full");
  match(storageFailure(new Error("disk I/O error"))!, /disk cannot be written/);
  equal(storageFailure(new Error("database is locked")), undefined);
  equal(storageFailure(new ServiceError("engine_unavailable", "x")), undefined);
  // An error from a worker crosses the thread as code and message: its reason survives.
  const fromWorker = asStorageError(DISK_FULL)!;
  equal(fromWorker.code, "storage_unavailable");
  equal(fromWorker.retryAfterMs, 5000);
  equal(
    storageFailure(new ServiceError(fromWorker.code, fromWorker.message)),
    "the disk is full",
  );
  equal(asStorageError(new Error("boom")), undefined);
});

Deno.test("storage health: a failed write opens it, the probe closes it once there is room", async () => {
  const timer = new ManualTimer();
  /** What the next probes do: throw an error, or succeed. */
  const outcomes: (Error | undefined)[] = [];
  const probes: boolean[] = [];
  const health = new StorageHealth({
    probe: (down) => {
      probes.push(down);
      const outcome = outcomes.shift();
      return outcome ? Promise.reject(outcome) : Promise.resolve();
    },
    intervalMs: 5000,
    downIntervalMs: 1000,
    sleep: timer.sleep,
  }).start();
  try {
    health.check();
    equal(health.available, true);
    // Healthy: probes every 5 s, and a success changes nothing.
    equal(await timer.fire(), 5000);
    await settle(() => probes.length === 1);
    equal(probes[0], false);
    equal(health.available, true);

    // Another failure than a storage one does not open it.
    equal(health.failed(new Error("session store: kept changing")), false);
    equal(health.available, true);

    // A turn's write fails for want of space: open at once, and the probe hurries up.
    equal(health.failed(DISK_FULL), true);
    equal(health.available, false);
    equal(health.outages, 1);
    equal(health.reason, "the disk is full");
    throws(() => health.check(), (error: ServiceError) => {
      equal(error.code, "storage_unavailable");
      equal(error.retryAfterMs, 5000);
      match(error.message, /disk is full/);
      return true;
    });
    // The probe loop was woken from its 5 s sleep and now probes every second, asking for room.
    outcomes.push(new Error("No space left on device (os error 28)"));
    equal(await timer.fire(), 1000);
    await settle(() => probes.length === 2);
    equal(probes[1], true);
    equal(health.available, false);
    equal(await timer.fire(), 1000);
    await settle(() => probes.length === 3);
    // Room again: closed, and back to the healthy interval.
    equal(health.available, true);
    equal(health.reason, undefined);
    health.check();
    // The healthy probe finds the disk full without any turn failing: open again.
    outcomes.push(DISK_FULL);
    equal(await timer.fire(), 5000);
    await settle(() => probes.length === 4);
    equal(health.available, false);
    equal(health.outages, 2);
  } finally {
    await health.close();
  }
});

Deno.test("storage health: probeNow reports a store that cannot be written", async () => {
  const health = new StorageHealth({
    probe: () => Promise.reject(new TypeError("database or disk is full")),
    sleep: new ManualTimer().sleep,
  });
  equal(await health.probeNow(), false);
  equal(health.reason, "the disk is full");
  await health.close();
});

Deno.test("storage health: the store's probe leaves nothing behind; headroom is checked with a file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vllm-mqtt-storage-" });
  const store = await SessionStore.open(`${dir}/sessions.kv`, 60_000);
  try {
    await store.probe("me");
    const kv = await Deno.openKv(`${dir}/sessions.kv`);
    try {
      equal((await Array.fromAsync(kv.list({ prefix: ["probe"] }))).length, 0);
    } finally {
      kv.close();
    }
    await checkHeadroom(dir, 100_000);
    equal([...Deno.readDirSync(dir)].some((entry) => entry.name.startsWith(".headroom")), false);
  } finally {
    store.close();
    await Deno.remove(dir, { recursive: true });
  }
});
