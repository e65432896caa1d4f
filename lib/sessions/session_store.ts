/**
 * Conversation history in Deno KV: {@linkcode SessionStore}, the sessions'
 * one door. How a session is laid out (a meta record naming a range of
 * message keys, long messages in chunks) is described in `records.ts`, how a
 * turn commits in `commit_turn.ts`.
 *
 * A store keeps the sessions it loaded or saved last (`session_cache.ts`),
 * each with its meta record's versionstamp: a load whose meta record still
 * has that versionstamp (nobody wrote the session since) reads no messages.
 * Given the process's {@linkcode WriteGenerations} (when it is the sessions'
 * only writer), a load reads nothing at all while the session's counter is
 * unchanged.
 *
 * A session whose records cannot be read (a value Deno KV cannot deserialize,
 * a damaged page, a message missing a chunk) is dropped with a warning: its
 * meta record is rewritten to name an empty range past every key the session
 * used, so the damaged keys are never read again and expire by themselves.
 *
 * @module
 */

import { logger } from "../log.ts";
import { commitOrThrow, openKv } from "./_util.ts";
import { isDamage } from "./session_store_error.ts";
import { commitTurn, type TurnCommitContext } from "./commit_turn.ts";
import { GroupCommit } from "./group_commit.ts";
import {
  deleteMessages,
  freshSeq,
  type HistoryEntry,
  metaKey,
  readHistory,
  type Session,
  type SessionMeta,
  type StoredMessage,
} from "./records.ts";
import { SessionCache } from "./session_cache.ts";
import { checkStore, listSessions, type SessionRef, type StoreCheck } from "./store_check.ts";
import { probeWrite } from "./write_probe.ts";
import type { WriteGenerations } from "./write_generations.ts";

export type { HistoryEntry, Session, SessionMeta, StoredMessage } from "./records.ts";
export type { SessionRef, StoreCheck } from "./store_check.ts";

const log = logger("sessions");

/** Session history on one Deno KV database. */
export class SessionStore {
  readonly #kv: Deno.Kv;
  /**
   * A second connection for the turn's read: one connection runs its
   * operations one at a time, and a read queued behind other turns' commits
   * (each a disk sync) waited 13 ms (p50) at 256 streams.
   */
  readonly #reads: Deno.Kv;
  readonly #ttlMs: number;
  /** Recently used sessions, with the write counter seen when they were read or written. */
  readonly #cache: SessionCache;
  /** What a turn's commit works with. */
  readonly #turns: TurnCommitContext;

  /** @param commits How turns are committed: grouped on `kv` unless given (see `open`). */
  constructor(
    kv: Deno.Kv,
    ttlMs: number,
    generations?: WriteGenerations,
    reads: Deno.Kv = kv,
    commits: GroupCommit = new GroupCommit(kv),
  ) {
    this.#kv = kv;
    this.#reads = reads;
    this.#ttlMs = ttlMs;
    this.#cache = new SessionCache(generations);
    this.#turns = {
      kv,
      commits,
      ttlMs,
      cache: this.#cache,
      load: (project, sessionId, now) => this.load(project, sessionId, now),
    };
  }

  /** Opens (creating if needed) the store at `path`. */
  static async open(
    path: string,
    ttlMs: number,
    generations?: WriteGenerations,
  ): Promise<SessionStore> {
    const [kv, reads] = await Promise.all([openKv(path), openKv(path)]);
    // A remote store (`--kv-url`) takes few checks an operation: its turns are not grouped.
    const grouped = !/^https?:\/\//.test(path);
    return new SessionStore(kv, ttlMs, generations, reads, new GroupCommit(kv, { grouped }));
  }

  /**
   * Loads a session's history; an expired or unknown session is empty. A
   * session whose records cannot be read is dropped (see the module's doc) and
   * comes back empty with `lost` set.
   */
  async load(project: string, sessionId: string, now = Date.now()): Promise<Session> {
    const cached = this.#cache.take(project, sessionId);
    // Read before the store: a write after this makes the next load read again.
    const generation = this.#cache.generation(project, sessionId);
    if (
      cached && generation !== undefined && cached.generation === generation &&
      cached.session.meta && cached.session.meta.expiresAt > now
    ) {
      return this.#cache.remember(project, sessionId, cached.session, generation);
    }
    let entry: Deno.KvEntryMaybe<SessionMeta>;
    try {
      entry = await this.#reads.get<SessionMeta>(metaKey(project, sessionId));
    } catch (error) {
      if (!isDamage(error)) throw error;
      return await this.#drop(project, sessionId, undefined, error, now);
    }
    const meta = entry.value;
    const { versionstamp } = entry;
    if (!meta || meta.expiresAt <= now) return { meta: undefined, history: [], versionstamp };
    if (cached?.session.versionstamp === versionstamp) {
      return this.#cache.remember(project, sessionId, cached.session, generation);
    }
    let history: HistoryEntry[];
    try {
      history = await readHistory(this.#reads, project, sessionId, meta);
    } catch (error) {
      if (!isDamage(error)) throw error;
      return await this.#drop(project, sessionId, { meta, versionstamp }, error, now);
    }
    return this.#cache.remember(project, sessionId, { meta, history, versionstamp }, generation);
  }

  /**
   * Commits a turn: keeps `history.slice(drop)` and appends `added`, whole or
   * not at all, checked against the versionstamp `session` was loaded with
   * (on a conflict it reloads and appends after the other writer's turn).
   * While another connection holds the store's lock (Deno KV's expiry sweep,
   * other turns' commits), it waits, up to 30 s.
   */
  commitTurn(
    project: string,
    sessionId: string,
    session: Session,
    drop: number,
    added: readonly StoredMessage[],
    now = Date.now(),
  ): Promise<void> {
    return commitTurn(this.#turns, project, sessionId, session, drop, added, now);
  }

  /** Forgets a session's history; keeps a per-session system prompt unless `deleteSession`. */
  async clear(project: string, sessionId: string, deleteSession = false): Promise<void> {
    const key = metaKey(project, sessionId);
    const now = Date.now();
    let meta: SessionMeta | null = null;
    let damaged = false;
    try {
      meta = (await this.#kv.get<SessionMeta>(key)).value;
    } catch (error) {
      if (!isDamage(error)) throw error;
      warnDropped(project, sessionId, error);
      damaged = true;
    }
    /** An empty history at `seq`, keeping the session's own prompt unless it is deleted. */
    const emptyAt = (seq: number): SessionMeta => ({
      firstSeq: seq,
      nextSeq: seq,
      lastActive: now,
      expiresAt: now + this.#ttlMs,
      ...(!deleteSession && meta?.systemPrompt !== undefined &&
        { systemPrompt: meta.systemPrompt }),
    });
    if (damaged) {
      await this.#kv.set(key, emptyAt(freshSeq(undefined, now)), { expireIn: this.#ttlMs });
    } else if (!deleteSession && meta?.systemPrompt !== undefined) {
      await this.#kv.set(key, emptyAt(meta.nextSeq), { expireIn: this.#ttlMs });
    } else {
      await this.#kv.delete(key);
    }
    try {
      await deleteMessages(this.#kv, project, sessionId, 0, Infinity);
    } catch (error) {
      if (!isDamage(error)) throw error;
      // Some message cannot be read, so neither can its key be listed: leave them all to
      // expire, out of reach of the session's next range.
      warnDropped(project, sessionId, error);
      await this.#kv.set(key, emptyAt(freshSeq(meta ?? undefined, now)), {
        expireIn: this.#ttlMs,
      });
    }
    this.#cache.written(project, sessionId);
  }

  /** Sets (or, with undefined, removes) a session's own system prompt. */
  async setSystemPrompt(
    project: string,
    sessionId: string,
    systemPrompt: string | undefined,
  ): Promise<void> {
    const key = metaKey(project, sessionId);
    let meta: SessionMeta | null;
    const now = Date.now();
    try {
      meta = (await this.#kv.get<SessionMeta>(key)).value;
    } catch (error) {
      if (!isDamage(error)) throw error;
      warnDropped(project, sessionId, error);
      const seq = freshSeq(undefined, now);
      meta = { firstSeq: seq, nextSeq: seq, lastActive: now, expiresAt: now + this.#ttlMs };
    }
    const { systemPrompt: _old, ...rest } = meta && meta.expiresAt > now
      ? meta
      : { firstSeq: 0, nextSeq: 0 };
    await this.#kv.set(
      key,
      {
        ...rest,
        lastActive: now,
        expiresAt: now + this.#ttlMs,
        ...(systemPrompt !== undefined && { systemPrompt }),
      } satisfies SessionMeta,
      { expireIn: this.#ttlMs },
    );
    this.#cache.written(project, sessionId);
  }

  /**
   * Writes and deletes a small record of its own (`["probe", id]`, never read
   * by anything else): rejects when the store cannot be written.
   */
  probe(id: string): Promise<void> {
    return probeWrite(this.#kv, id);
  }

  /** Every live session, of one project or all; sessions whose record cannot be read are left out. */
  list(project?: string, now = Date.now()): Promise<SessionRef[]> {
    return listSessions(this.#kv, project, now);
  }

  /**
   * Reads every record of the store (a start-up check: SQLite's own checks are
   * out of reach through Deno KV): the live sessions, and those whose records
   * cannot be read. Damaged sessions are not changed here: each is dropped,
   * with a warning, when its client next writes to it.
   */
  check(now = Date.now()): Promise<StoreCheck> {
    return checkStore(this.#kv, this.#reads, now);
  }

  close(): void {
    this.#kv.close();
    if (this.#reads !== this.#kv) this.#reads.close();
  }

  /**
   * Drops a session whose records cannot be read: rewrites its meta record to
   * name an empty range past every seq it used, keeping its own system prompt
   * when that could be read. Returns the empty session, with `lost` set.
   */
  async #drop(
    project: string,
    sessionId: string,
    known: { meta: SessionMeta; versionstamp: string | null } | undefined,
    error: unknown,
    now: number,
  ): Promise<Session> {
    warnDropped(project, sessionId, error);
    const key = metaKey(project, sessionId);
    const seq = freshSeq(known?.meta, now);
    const meta: SessionMeta = {
      firstSeq: seq,
      nextSeq: seq,
      lastActive: now,
      expiresAt: now + this.#ttlMs,
      messagesExpireAt: now + 2 * this.#ttlMs,
      ...(known?.meta.systemPrompt !== undefined && { systemPrompt: known.meta.systemPrompt }),
    };
    const op = this.#kv.atomic();
    // A record that cannot be read has no versionstamp to check: overwrite it.
    if (known) op.check({ key, versionstamp: known.versionstamp });
    op.set(key, meta, { expireIn: this.#ttlMs });
    const before = this.#cache.generation(project, sessionId);
    let committed: Deno.KvCommitResult;
    try {
      committed = await commitOrThrow(op);
    } catch (failure) {
      if (!known || isDamage(failure)) throw failure;
      // Someone wrote the session in between (another instance dropping it too): read theirs.
      return { ...(await this.load(project, sessionId, now)), lost: true };
    }
    const session: Session = { meta, history: [], versionstamp: committed.versionstamp };
    this.#cache.committed(project, sessionId, session, before);
    return { ...session, lost: true };
  }
}

function warnDropped(project: string, sessionId: string, error: unknown): void {
  log.warn(
    "Session {project}/{sessionId} cannot be read ({message}): dropped; its client starts a fresh conversation",
    { project, sessionId, message: (error as Error)?.message ?? String(error) },
  );
}
