/**
 * Helpers shared by the session modules. Private to `lib/sessions/`.
 *
 * @module
 */

import { abortableSleep } from "../_util.ts";

/**
 * Commits `op`, or says "busy" when SQLite refused the lock: a checked write
 * reads inside its transaction, and SQLite answers a read lock's upgrade under
 * contention with "database is locked" at once rather than waiting. The caller
 * backs off and tries again.
 */
export async function commitUnlessBusy(
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
