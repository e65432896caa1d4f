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
    if (!/database is locked/i.test((error as Error).message)) throw error;
    return "busy";
  }
}

/**
 * Commits the operation `build` fills in (checked against what it read),
 * building it again on a fresh operation after a backoff while another writer
 * changes or locks the keys first. `build` answers false when there is
 * nothing to write, and so does this.
 */
export async function commitChecked(
  kv: Deno.Kv,
  what: string,
  build: (op: Deno.AtomicOperation) => Promise<boolean>,
  attempts = 50,
): Promise<boolean> {
  for (let attempt = 0; attempt < attempts; attempt++) {
    const op = kv.atomic();
    if (!(await build(op))) return false;
    const result = await commitUnlessBusy(op);
    if (result !== "busy" && result.ok) return true;
    await abortableSleep(1 + Math.random() * 10);
  }
  throw new Error(`session store: ${what} kept changing or locked after ${attempts} tries`);
}
