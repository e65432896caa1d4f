/**
 * Helpers shared by the session modules. Private to `lib/sessions/`.
 *
 * @module
 */

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
