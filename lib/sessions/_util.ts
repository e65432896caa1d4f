/**
 * Helpers shared by the modules that use a Deno KV store (sessions, experiments, the routing
 * ledger, `tools/ab_report.ts`). Private to this repository.
 *
 * @module
 */

import { abortableSleep, backoffDelay } from "../_util.ts";
import { SessionStoreError } from "./session_store_error.ts";

/**
 * How long a write waits for a store that another connection keeps locked
 * (Deno KV's expiry sweep deletes every expired key in one transaction, which
 * takes seconds with many expired sessions) before it fails.
 */
const BUSY_PATIENCE_MS = 30_000;

/**
 * Commits `op`, or says "busy" when SQLite refused the lock: a checked write
 * reads inside its transaction, and SQLite answers a read lock's upgrade under
 * contention with "database is locked" at once rather than waiting. The caller
 * backs off and tries again.
 */
async function commitUnlessBusy(
  op: Deno.AtomicOperation,
): Promise<Deno.KvCommitResult | Deno.KvCommitError | "busy"> {
  try {
    return await op.commit();
  } catch (error) {
    if (!isLocked(error)) throw error;
    return "busy";
  }
}

/**
 * Backs off after the `busyTries`-th "busy" answer in a row (1, 2, 4 … 64 ms,
 * with jitter); throws once the store has been busy for {@linkcode BUSY_PATIENCE_MS}
 * since `busySince`.
 */
async function waitWhileBusy(busyTries: number, busySince: number): Promise<void> {
  if (performance.now() - busySince > BUSY_PATIENCE_MS) {
    throw new SessionStoreError(
      "busy",
      `session store: busy (locked by another writer) for ${BUSY_PATIENCE_MS} ms`,
    );
  }
  await abortableSleep(backoffDelay(busyTries, { firstMs: 1, maxMs: 64 }));
}

/**
 * Commits `op`, waiting while another connection holds the store's lock (up
 * to {@linkcode BUSY_PATIENCE_MS}): a lock is not a change of the records, so
 * the same operation is tried again. Resolves with the commit's result, which
 * is not `ok` when a check failed.
 */
export async function commitWhenFree(
  op: Deno.AtomicOperation,
): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  const since = performance.now();
  for (let tries = 0;; tries++) {
    const result = await commitUnlessBusy(op);
    if (result !== "busy") return result;
    await waitWhileBusy(tries, since);
  }
}

/** Commits `op`, waiting while the store is locked; throws if a check failed. */
export async function commitOrThrow(op: Deno.AtomicOperation): Promise<Deno.KvCommitResult> {
  const result = await commitWhenFree(op);
  if (!result.ok) {
    throw new SessionStoreError("rejected", "session store: atomic write was rejected");
  }
  return result;
}

/**
 * Opens the Deno KV at `path`, trying again while another process holds the
 * lock: opening a new SQLite file writes its schema, and instances started
 * together on one data directory meet there.
 */
export async function openKv(path: string): Promise<Deno.Kv> {
  for (let attempt = 1;; attempt++) {
    try {
      return await Deno.openKv(path);
    } catch (error) {
      if (attempt === 20 || !isLocked(error)) throw error;
      await abortableSleep(attempt * 10 * (0.5 + Math.random()));
    }
  }
}

/** Whether `error` is SQLite refusing a lock another connection holds. */
function isLocked(error: unknown): boolean {
  return /database is locked/i.test((error as Error)?.message ?? "");
}
