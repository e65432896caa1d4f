/**
 * The sessions a store loaded or saved last, each with what tells whether it
 * is still current without reading its messages again: the meta record's
 * versionstamp (a load whose meta record still has it reads no messages) and,
 * given the process's {@linkcode WriteGenerations} (when the store is the
 * sessions' only writer), the session's write counter (while it is unchanged,
 * a load reads nothing at all). Bounded in number and in the bytes the
 * histories take, the least recently used forgotten first: a burst of long
 * conversations cannot grow a worker's heap past it. Private to `lib/sessions/`.
 *
 * @module
 */

import type { Session } from "./records.ts";
import { sessionKey } from "./session_key.ts";
import type { WriteGenerations } from "./write_generations.ts";

/** Sessions a store remembers; the least recently used is forgotten first. */
const CACHED_SESSIONS = 1024;
/** Bytes the histories a store remembers may take (about two a character). */
const CACHED_BYTES = 16 * 1024 * 1024;
/** The heap a message takes besides its text (its object and fields). */
const MESSAGE_BYTES = 120;

/** A remembered session. */
export interface CachedSession {
  readonly session: Session;
  /** The write counter when it was read or written (undefined: unknown, read the meta record). */
  readonly generation: number | undefined;
  /** What its history takes of the heap, about. */
  readonly bytes: number;
}

/** Options of {@linkcode SessionCache}. */
export interface SessionCacheOptions {
  /**
   * Sessions remembered at most.
   * @default {1024}
   */
  readonly maxSessions?: number;
  /**
   * Bytes their histories may take (about two a character).
   * @default {16777216}
   */
  readonly maxBytes?: number;
}

/** Recently used sessions of one store. */
export class SessionCache {
  readonly #generations: WriteGenerations | undefined;
  readonly #maxSessions: number;
  readonly #maxBytes: number;
  /** Insertion order is recency order: the first entry is the least recently used. */
  readonly #entries = new Map<string, CachedSession>();
  #bytes = 0;

  constructor(generations?: WriteGenerations, options: SessionCacheOptions = {}) {
    this.#generations = generations;
    this.#maxSessions = options.maxSessions ?? CACHED_SESSIONS;
    this.#maxBytes = options.maxBytes ?? CACHED_BYTES;
  }

  /** Sessions remembered now. */
  get size(): number {
    return this.#entries.size;
  }

  /** Bytes the histories remembered now take, about. */
  get bytes(): number {
    return this.#bytes;
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
    return this.#delete(sessionKey(project, sessionId));
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
    const key = sessionKey(project, sessionId);
    this.#delete(key);
    const bytes = historyBytes(session);
    this.#entries.set(key, { session, generation, bytes });
    this.#bytes += bytes;
    for (const oldest of this.#entries.keys()) {
      if (this.#entries.size <= this.#maxSessions && this.#bytes <= this.#maxBytes) break;
      this.#delete(oldest);
    }
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
    this.#delete(sessionKey(project, sessionId));
  }

  #delete(key: string): CachedSession | undefined {
    const cached = this.#entries.get(key);
    if (!cached) return undefined;
    this.#entries.delete(key);
    this.#bytes -= cached.bytes;
    return cached;
  }
}

/** The heap a session's history takes, about: its texts and a little per message. */
function historyBytes(session: Session): number {
  let bytes = MESSAGE_BYTES;
  for (const message of session.history) bytes += MESSAGE_BYTES + 2 * message.content.length;
  return bytes;
}
