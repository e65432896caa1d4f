/**
 * The write probe of a session store, for its health check: it writes and
 * deletes a small record of its own, so that a store that cannot be written
 * (a full disk) is found before a turn is generated for nothing. Private to
 * `lib/sessions/`.
 *
 * @module
 */

import { commitOrThrow } from "./_util.ts";

/** What the probe writes: about a short turn's size. */
const PROBE_VALUE = "p".repeat(4096);
/** Milliseconds a probe record left behind (its delete failed) lives. */
const PROBE_EXPIRE_MS = 60_000;

/**
 * Writes and deletes `["probe", id]` (never read by anything else): rejects
 * when the store cannot be written.
 */
export async function probeWrite(kv: Deno.Kv, id: string): Promise<void> {
  const key = ["probe", id];
  // Left behind when the delete fails, it expires by itself.
  await commitOrThrow(kv.atomic().set(key, PROBE_VALUE, { expireIn: PROBE_EXPIRE_MS }));
  await commitOrThrow(kv.atomic().delete(key));
}
