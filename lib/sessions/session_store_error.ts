/**
 * How the session store fails, as its modules throw and recognise it: a
 * write that could not be made ({@linkcode SessionStoreError}), and a record
 * that was read but cannot be understood ({@linkcode DamagedRecord}). A disk
 * with no room is told apart elsewhere (`storage_health.ts`).
 *
 * @module
 */

/**
 * Whether `error` says that a stored record cannot be read: a value Deno KV
 * cannot deserialize, a damaged SQLite page, or a message missing some of its
 * chunks ({@linkcode DamagedRecord}).
 */
export function isDamage(error: unknown): boolean {
  if (error instanceof DamagedRecord) return true;
  return /could not deserialize|disk image is malformed|not a database|database corrupt/i.test(
    (error as Error)?.message ?? "",
  );
}

/** Why a session store write failed (other than for the disk: see `storage_health.ts`). */
export type SessionStoreErrorCode =
  /** Another connection held the store's lock for too long. */
  | "busy"
  /** A checked write found the record changed. */
  | "rejected"
  /** Other writers changed the session on every try of a turn's commit. */
  | "conflict";

/** A session store write that failed; a client whose turn it ends is told its message (`internal`). */
export class SessionStoreError extends Error {
  readonly code: SessionStoreErrorCode;

  constructor(code: SessionStoreErrorCode, message: string) {
    super(message);
    this.code = code;
  }
}

/** A record that was read but does not make sense (e.g. a message missing a chunk). */
export class DamagedRecord extends Error {
  override name = "DamagedRecord";
}
