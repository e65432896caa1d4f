/**
 * The sessions a store loaded or saved last, each with what tells whether it
 * is still current without reading its messages again: the meta record's
 * versionstamp (a load whose meta record still has it reads no messages) and,
 * given the process's {@linkcode WriteGenerations} (when the store is the
 * sessions' only writer), the session's write counter (while it is unchanged,
 * a load reads nothing at all). Private to `lib/sessions/`.
 *
 * @module
 */

import { LruMap } from "../_util.ts";
import type { Session } from "./records.ts";
import { sessionKey } from "./session_key.ts";
import type { WriteGenerations } from "./write_generations.ts";

/** Sessions a store remembers; the least recently used is forgotten first. */
const CACHED_SESSIONS = 1024;

/** A remembered session. */
export interface CachedSession {
  readonly session: Session;
  /** The write counter when it was read or written (undefined: unknown, read the meta record). */
  readonly generation: number | undefined;
}

/** Recently used sessions of one store. */
export class SessionCache {
  readonly #generations: WriteGenerations | undefined;
  readonly #entries = new LruMap<string, CachedSession>(CACHED_SESSIONS);

  constructor(generations?: WriteGenerations) {
    this.#generations = generations;
  }

  /**
   * The session's write counter now (undefined without shared counters). Read
   * it before the read or write it vouches for: a write after that then makes
   * the next load read again.
   */
  generation(project: string, sessionId: string): number | undefined {
    return this.#generations?.current(project, sessionId);
  }

  /**
   * Takes what is remembered of a session out of the cache: a load puts back
   * what it returns, and a load that fails leaves nothing stale behind.
   */
  take(project: string, sessionId: string): CachedSession | undefined {
    const key = sessionKey(project, sessionId);
    const cached = this.#entries.get(key);
    this.#entries.delete(key);
    return cached;
  }

  /**
   * Keeps `session` as the most recently used; `generation` is the session's
   * write counter when it was read or written (undefined: unknown). Returns
   * `session`.
   */
  remember(
    project: string,
    sessionId: string,
    session: Session,
    generation: number | undefined,
  ): Session {
    this.#entries.set(sessionKey(project, sessionId), { session, generation });
    return session;
  }

  /**
   * Remembers a session the store just wrote; `before` is its write counter
   * read before the write.
   */
  committed(project: string, sessionId: string, session: Session, before: number | undefined) {
    const after = this.#generations?.bump(project, sessionId);
    // Another thread's write in between (the counter moved by more than ours) leaves the
    // generation unknown: the next load then checks the versionstamp.
    const generation = after !== undefined && after === before! + 1 ? after : undefined;
    this.remember(project, sessionId, session, generation);
  }

  /** Counts a write of the session and forgets what was remembered of it. */
  written(project: string, sessionId: string): void {
    this.#generations?.bump(project, sessionId);
    this.#entries.delete(sessionKey(project, sessionId));
  }
}
