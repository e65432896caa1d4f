/**
 * A turn's commit. The turn's messages and the session's meta record are
 * written in one atomic operation checked against the versionstamp the
 * session was loaded with, so the turn appears whole or not at all, and two
 * instances never both append on the same base: the one that loses reloads
 * and appends after the other's turn. A turn too large for one atomic
 * operation (800 KiB) writes its chunks first (nobody reads them before a
 * meta record names them) and the heads with the meta record last. Turns of
 * other sessions that finish at the same time share that atomic operation
 * (`group_commit.ts`): each keeps its own check, and its commit resolves only
 * once its own records are durable.
 *
 * The meta record carries `expireIn` (the session TTL), refreshed on each
 * turn; KV expiry is lazy, so reads also check `expiresAt`. Messages live
 * twice as long and are rewritten only when a live session's oldest ones
 * would otherwise expire before its meta record, about once a TTL: rewriting
 * the whole history on every turn made a turn's cost grow with its history.
 *
 * Private to `lib/sessions/`.
 *
 * @module
 */

import { logger } from "../log.ts";
import { SessionStoreError } from "./session_store_error.ts";
import { type GroupCommit, PendingWrite } from "./group_commit.ts";
import {
  deleteMessages,
  messagePrefix,
  messageRecords,
  metaKey,
  newTag,
  recordBytes,
  type Session,
  type SessionMeta,
  type StoredMessage,
  writeBatches,
} from "./records.ts";
import type { SessionCache } from "./session_cache.ts";
import { sessionKey } from "./session_key.ts";

const log = logger("sessions");

/** A turn larger than this writes its chunks before the atomic operation that commits it. */
const TURN_BYTES = 640 * 1024;
/** Tries of a turn's commit against writers that keep changing the session. */
const COMMIT_ATTEMPTS = 20;

/** A meta record's size when serialized, from above (as `recordBytes` for messages). */
function metaBytes(meta: SessionMeta): number {
  return 2 * (meta.systemPrompt?.length ?? 0) + 512;
}

/** What a turn's commit works with: the store's connection, TTL, cache and load. */
export interface TurnCommitContext {
  readonly kv: Deno.Kv;
  /** Commits the turns' atomic writes on `kv`, several at once when they come together. */
  readonly commits: GroupCommit;
  /** The session TTL in milliseconds. */
  readonly ttlMs: number;
  readonly cache: SessionCache;
  /** Loads the session again after another writer changed it. */
  readonly load: (project: string, sessionId: string, now: number) => Promise<Session>;
}

/**
 * Commits a turn: keeps `session.history.slice(drop)`, appends `added`, and
 * renews the kept messages' expiry when it would come before the meta
 * record's (about once a TTL). See the module's doc.
 *
 * @throws {SessionStoreError} `conflict` when other writers changed the
 *   session on each of {@linkcode COMMIT_ATTEMPTS} tries, `busy` when the
 *   store stayed locked too long.
 */
export async function commitTurn(
  context: TurnCommitContext,
  project: string,
  sessionId: string,
  session: Session,
  drop: number,
  added: readonly StoredMessage[],
  now: number,
): Promise<void> {
  const { kv, cache } = context;
  const expireIn = context.ttlMs;
  const messageExpireIn = 2 * expireIn;
  const metaRecordKey = metaKey(project, sessionId);
  const prefix = messagePrefix(project, sessionId);
  let refreshed: Session | undefined;
  for (let conflicts = 0; conflicts < COMMIT_ATTEMPTS; conflicts++) {
    const base = session.meta?.nextSeq ?? 0;
    const kept = session.history.slice(drop);
    let messagesExpireAt = session.meta?.messagesExpireAt ?? 0;
    if (messagesExpireAt < now + expireIn) {
      // The oldest kept messages would expire before the meta record: give them a new
      // lifetime (once per loaded session: a reload may give back the same one). Rewriting
      // them is harmless even if this attempt loses.
      if (refreshed !== session) {
        await writeBatches(
          kv,
          kept.flatMap((message) => messageRecords(prefix, message.seq, message)),
          messageExpireIn,
        );
        refreshed = session;
      }
      messagesExpireAt = now + messageExpireIn;
    }
    const meta: SessionMeta = {
      firstSeq: kept[0]?.seq ?? base,
      nextSeq: base + added.length,
      lastActive: now,
      expiresAt: now + expireIn,
      messagesExpireAt,
      ...(session.meta?.systemPrompt !== undefined &&
        { systemPrompt: session.meta.systemPrompt }),
    };
    const tag = newTag();
    const records = added.map((message, i) => messageRecords(prefix, base + i, message, tag));
    const write = new PendingWrite().check({
      key: metaRecordKey,
      versionstamp: session.versionstamp,
    });
    let bytes = 0;
    for (const [, value] of records.flat()) bytes += recordBytes(value);
    if (bytes <= TURN_BYTES) {
      for (const [key, value] of records.flat()) {
        write.set(key, value, recordBytes(value), messageExpireIn);
      }
    } else {
      // Too large for one atomic operation: the chunks first, the heads with the meta record.
      await writeBatches(kv, records.flatMap((list) => list.slice(1)), messageExpireIn);
      for (const [key, value] of records.map((list) => list[0])) {
        write.set(key, value, recordBytes(value), messageExpireIn);
      }
    }
    write.set(metaRecordKey, meta, metaBytes(meta), expireIn);
    const before = cache.generation(project, sessionId);
    // Resolves once this turn is durable. While another connection holds the lock (Deno KV's
    // expiry sweep, other turns' commits), this waits: that is not a change of the session,
    // so no conflict.
    const committed = await context.commits.commit(write);
    if (committed.ok) {
      const history = [
        ...kept,
        ...added.map((message, i) => ({
          ...message,
          seq: base + i,
          ...(records[i].length > 1 && { tag }),
        })),
      ];
      cache.committed(
        project,
        sessionId,
        { meta, history, versionstamp: committed.versionstamp },
        before,
      );
      const trimmedFrom = session.meta?.firstSeq ?? 0;
      await deleteMessages(kv, project, sessionId, trimmedFrom, meta.firstSeq).catch((error) => {
        // Left to expire: a turn does not fail for the messages it trimmed.
        log.warn("Session {project}/{sessionId}: trimmed messages not deleted: {message}", {
          project,
          sessionId,
          message: String(error),
        });
      });
      return;
    }
    // Another writer (another instance, a control command, Deno KV's expiry sweep deleting
    // an expired meta record) changed the session first.
    session = await context.load(project, sessionId, now);
    drop = 0;
  }
  throw new SessionStoreError(
    "conflict",
    `session store: ${sessionKey(project, sessionId)} kept changing under this turn`,
  );
}
