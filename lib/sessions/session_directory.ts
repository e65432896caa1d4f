/**
 * The live sessions, least recently used first, kept on the gateway thread so
 * that the `--max-sessions` cap and the live-session count need no scan of the
 * store. Rebuilt from the store at start-up.
 *
 * @module
 */

import { logger } from "../log.ts";
import { sessionKey } from "./session_key.ts";
import type { SessionStore } from "./session_store.ts";

const log = logger("sessions");

interface Entry {
  readonly project: string;
  readonly sessionId: string;
  expiresAt: number;
}

/** Options of {@linkcode SessionDirectory}. */
export interface SessionDirectoryOptions {
  /** The store the sessions live in: checked at start-up, cleared on eviction. */
  readonly store: Pick<SessionStore, "check" | "clear">;
  /** Live sessions kept; beyond it the least recently used (and not busy) is evicted. */
  readonly maxSessions: number;
  /** Milliseconds a session lives after its last use. */
  readonly ttlMs: number;
  /** A session with a request queued or running is never evicted. */
  readonly isBusy: (project: string, sessionId: string) => boolean;
  /**
   * The clock, in milliseconds since the epoch; injected by tests.
   * @default {Date.now}
   */
  readonly now?: () => number;
}

/** Live sessions in LRU order, with eviction beyond a cap. */
export class SessionDirectory {
  readonly #store: Pick<SessionStore, "check" | "clear">;
  readonly #maxSessions: number;
  readonly #ttlMs: number;
  readonly #isBusy: (project: string, sessionId: string) => boolean;
  readonly #now: () => number;
  /**
   * Insertion order is recency order: the first entry is the least recently
   * used. Not an `LruMap`: a busy session is passed over, and evicting one
   * clears it in the store.
   */
  readonly #entries = new Map<string, Entry>();
  readonly #clearing = new Map<string, Promise<void>>();

  constructor(options: SessionDirectoryOptions) {
    this.#store = options.store;
    this.#maxSessions = options.maxSessions;
    this.#ttlMs = options.ttlMs;
    this.#isBusy = options.isBusy;
    this.#now = options.now ?? Date.now;
  }

  /**
   * Loads the live sessions of the store, reading every record of it on the
   * way: sessions whose records cannot be read, and a store damaged beyond
   * single records, are reported as warnings.
   */
  async load(): Promise<void> {
    const started = performance.now();
    const { sessions, unreadable, records, error } = await this.#store.check();
    if (unreadable.length > 0) {
      log.warn(
        "Session store: {count} sessions cannot be read ({names}); each is dropped when its client next writes",
        { count: unreadable.length, names: unreadable.slice(0, 20).join(", ") },
      );
    }
    if (error !== undefined) {
      log.warn(
        "Session store is damaged beyond single records; the check stopped after {records} records: {error}",
        { records, error },
      );
    }
    log.debug("Session store: {records} records checked in {ms} ms", {
      records,
      ms: Math.round(performance.now() - started),
    });
    sessions.sort((a, b) => a.lastActive - b.lastActive);
    for (const { project, sessionId, expiresAt } of sessions) {
      this.#entries.set(sessionKey(project, sessionId), { project, sessionId, expiresAt });
    }
  }

  /** Live sessions now. */
  get size(): number {
    this.sweep();
    return this.#entries.size;
  }

  /** Marks a session as just used; evicts the least recently used beyond the cap. */
  touch(project: string, sessionId: string): void {
    const key = sessionKey(project, sessionId);
    this.#entries.delete(key);
    this.#entries.set(key, { project, sessionId, expiresAt: this.#now() + this.#ttlMs });
    if (this.#entries.size <= this.#maxSessions) return;
    for (const [candidate, entry] of this.#entries) {
      if (this.#entries.size <= this.#maxSessions) break;
      if (this.#isBusy(entry.project, entry.sessionId)) continue;
      this.#entries.delete(candidate);
      const clearing = this.#store.clear(entry.project, entry.sessionId, true).catch(() => {})
        .finally(() => this.#clearing.delete(candidate));
      this.#clearing.set(candidate, clearing);
    }
  }

  /**
   * Resolves once an eviction of this session still being written is done, so
   * that a new turn never reads the history it is deleting.
   */
  settled(project: string, sessionId: string): Promise<void> {
    return this.#clearing.get(sessionKey(project, sessionId)) ?? Promise.resolve();
  }

  /** Whether a session is live here (it has history that has not expired). */
  has(project: string, sessionId: string): boolean {
    const entry = this.#entries.get(sessionKey(project, sessionId));
    return entry !== undefined && entry.expiresAt > this.#now();
  }

  /** Forgets a session (deleted by a client). */
  forget(project: string, sessionId: string): void {
    this.#entries.delete(sessionKey(project, sessionId));
  }

  /** The sessions of a project. */
  sessionsOf(project: string): string[] {
    const ids: string[] = [];
    for (const entry of this.#entries.values()) {
      if (entry.project === project) ids.push(entry.sessionId);
    }
    return ids;
  }

  /** Drops expired entries (their data expires in the store by itself). */
  sweep(): void {
    const now = this.#now();
    for (const [key, entry] of this.#entries) {
      if (entry.expiresAt <= now) this.#entries.delete(key);
    }
  }
}
