/**
 * Conversation history in Deno KV, one key per message (a value holds at most
 * 64 KiB). A session's meta record is the commit point: it names the range of
 * message keys that make up the history, so a turn whose messages were written
 * but whose meta was not (a crash, an aborted stream) is simply not there.
 *
 * Keys:
 * - `["session", project, sessionId]` → {@linkcode SessionMeta}
 * - `["message", project, sessionId, seq]` → {@linkcode StoredMessage}
 *
 * The meta record carries `expireIn` (the session TTL), refreshed on each
 * turn; KV expiry is lazy, so reads also check `expiresAt`. Messages live twice
 * as long and are rewritten only when a live session's oldest ones would
 * otherwise expire before its meta record, about once a TTL: rewriting the
 * whole history on every turn made a turn's cost grow with its history.
 *
 * A store keeps the sessions it loaded or saved last, each with its meta
 * record's versionstamp: a load whose meta record still has that versionstamp
 * (nobody wrote the session since) reads no messages. Given the process's
 * {@linkcode WriteGenerations} (when it is the sessions' only writer), a load
 * reads nothing at all while the session's counter is unchanged.
 *
 * @module
 */

import { abortableSleep } from "../_util.ts";
import { commitUnlessBusy, openKv } from "./_util.ts";
import type { WriteGenerations } from "./write_generations.ts";

/** One message of a session's history. */
export interface StoredMessage {
  readonly role: "user" | "assistant";
  readonly content: string;
  /** Its share of the prompt in tokens: exact when the engine reported usage. */
  readonly tokens: number;
}

/** A stored message with its position. */
export interface HistoryEntry extends StoredMessage {
  readonly seq: number;
}

/** The record that says which messages make up a session. */
export interface SessionMeta {
  /** Sequence number of the oldest message kept. */
  readonly firstSeq: number;
  /** Sequence number the next message gets. */
  readonly nextSeq: number;
  readonly lastActive: number;
  readonly expiresAt: number;
  /** A system prompt set for this session alone (the `template` control topic). */
  readonly systemPrompt?: string;
  /** No kept message expires before this time (absent: unknown, rewrite them). */
  readonly messagesExpireAt?: number;
}

/** A session as loaded: its meta (if it exists and is live) and its messages. */
export interface Session {
  readonly meta: SessionMeta | undefined;
  readonly history: readonly HistoryEntry[];
  /** The meta record's versionstamp when loaded (null: none), checked when the turn commits. */
  readonly versionstamp: string | null;
}

/** A live session as listed by {@linkcode SessionStore.list}. */
export interface SessionRef {
  readonly project: string;
  readonly sessionId: string;
  readonly lastActive: number;
  readonly expiresAt: number;
}

// Deno KV allows 1000 mutations in one atomic operation; stay well below, and
// below its 800 KB total, when refreshing a long history.
const BATCH_MUTATIONS = 500;
/** Tries of a turn's commit against writers that keep changing or locking the session. */
const COMMIT_ATTEMPTS = 20;
/** Sessions a store remembers; the least recently used is forgotten first. */
const CACHED_SESSIONS = 1024;
const BATCH_BYTES = 512 * 1024;

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
  readonly #generations: WriteGenerations | undefined;
  /** Recently used sessions, with the write counter seen when they were read or written. */
  readonly #cache = new Map<string, { session: Session; generation: number | undefined }>();

  constructor(kv: Deno.Kv, ttlMs: number, generations?: WriteGenerations, reads: Deno.Kv = kv) {
    this.#kv = kv;
    this.#reads = reads;
    this.#ttlMs = ttlMs;
    this.#generations = generations;
  }

  /** Opens (creating if needed) the store at `path`. */
  static async open(
    path: string,
    ttlMs: number,
    generations?: WriteGenerations,
  ): Promise<SessionStore> {
    const [kv, reads] = await Promise.all([openKv(path), openKv(path)]);
    return new SessionStore(kv, ttlMs, generations, reads);
  }

  /** Loads a session's history; an expired or unknown session is empty. */
  async load(project: string, sessionId: string, now = Date.now()): Promise<Session> {
    const cacheKey = `${project}/${sessionId}`;
    const cached = this.#cache.get(cacheKey);
    this.#cache.delete(cacheKey);
    // Read before the store: a write after this makes the next load read again.
    const generation = this.#generations?.current(project, sessionId);
    if (
      cached && generation !== undefined && cached.generation === generation &&
      cached.session.meta && cached.session.meta.expiresAt > now
    ) {
      return this.#remember(cacheKey, cached.session, generation);
    }
    const entry = await this.#reads.get<SessionMeta>(["session", project, sessionId]);
    const meta = entry.value;
    const { versionstamp } = entry;
    if (!meta || meta.expiresAt <= now) return { meta: undefined, history: [], versionstamp };
    if (cached?.session.versionstamp === versionstamp) {
      return this.#remember(cacheKey, cached.session, generation);
    }
    const history: HistoryEntry[] = [];
    const prefix = ["message", project, sessionId];
    const list = this.#reads.list<StoredMessage>({
      start: [...prefix, meta.firstSeq],
      end: [...prefix, meta.nextSeq],
    });
    for await (const { key, value } of list) {
      history.push({ ...value, seq: key[3] as number });
    }
    return this.#remember(cacheKey, { meta, history, versionstamp }, generation);
  }

  /**
   * Commits a turn: keeps `history.slice(drop)`, appends `added`, and renews
   * the kept messages' expiry when it would come before the meta record's
   * (about once a TTL). The new messages and the meta record are
   * written in one atomic operation checked against the versionstamp the
   * session was loaded with, so the turn appears whole or not at all, and two
   * instances never both append on the same base: the one that loses reloads
   * and appends after the other's turn.
   */
  async commitTurn(
    project: string,
    sessionId: string,
    session: Session,
    drop: number,
    added: readonly StoredMessage[],
    now = Date.now(),
  ): Promise<void> {
    const expireIn = this.#ttlMs;
    const messageExpireIn = 2 * expireIn;
    const metaKey = ["session", project, sessionId];
    for (let attempt = 0; attempt < COMMIT_ATTEMPTS; attempt++) {
      const base = session.meta?.nextSeq ?? 0;
      const kept = session.history.slice(drop);
      let messagesExpireAt = session.meta?.messagesExpireAt ?? 0;
      if (messagesExpireAt < now + expireIn) {
        // The oldest kept messages would expire before the meta record: give them a new
        // lifetime. Rewriting them is harmless even if this attempt loses.
        await this.#writeBatches(
          kept.map(({ seq, ...message }) => [["message", project, sessionId, seq], message]),
          messageExpireIn,
        );
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
      const op = this.#kv.atomic().check({ key: metaKey, versionstamp: session.versionstamp });
      added.forEach((message, i) =>
        op.set(["message", project, sessionId, base + i], message, { expireIn: messageExpireIn })
      );
      op.set(metaKey, meta, { expireIn });
      const before = this.#generations?.current(project, sessionId);
      const committed = await commitUnlessBusy(op);
      if (committed === "busy") {
        await abortableSleep(1 + Math.random() * 10);
        continue;
      }
      if (committed.ok) {
        const after = this.#generations?.bump(project, sessionId);
        // Another thread's write in between (the counter moved by more than ours) leaves the
        // generation unknown: the next load then checks the versionstamp.
        const generation = after !== undefined && after === before! + 1 ? after : undefined;
        this.#remember(`${project}/${sessionId}`, {
          meta,
          history: [...kept, ...added.map((message, i) => ({ ...message, seq: base + i }))],
          versionstamp: committed.versionstamp,
        }, generation);
        await this.#deleteRange(project, sessionId, session.meta?.firstSeq ?? 0, meta.firstSeq);
        return;
      }
      // Another writer (another instance, a control command) changed the session first.
      session = await this.load(project, sessionId, now);
      drop = 0;
    }
    throw new Error(`session store: ${project}/${sessionId} kept changing under this turn`);
  }

  /** Forgets a session's history; keeps a per-session system prompt unless `deleteSession`. */
  async clear(project: string, sessionId: string, deleteSession = false): Promise<void> {
    const key = ["session", project, sessionId];
    const meta = (await this.#kv.get<SessionMeta>(key)).value;
    if (!deleteSession && meta?.systemPrompt !== undefined) {
      const now = Date.now();
      await this.#kv.set(
        key,
        {
          firstSeq: meta.nextSeq,
          nextSeq: meta.nextSeq,
          lastActive: now,
          expiresAt: now + this.#ttlMs,
          systemPrompt: meta.systemPrompt,
        } satisfies SessionMeta,
        { expireIn: this.#ttlMs },
      );
    } else {
      await this.#kv.delete(key);
    }
    await this.#deleteRange(project, sessionId, 0, Infinity);
    this.#written(project, sessionId);
  }

  /** Sets (or, with undefined, removes) a session's own system prompt. */
  async setSystemPrompt(
    project: string,
    sessionId: string,
    systemPrompt: string | undefined,
  ): Promise<void> {
    const key = ["session", project, sessionId];
    const meta = (await this.#kv.get<SessionMeta>(key)).value;
    const now = Date.now();
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
    this.#written(project, sessionId);
  }

  /** Every live session, of one project or all. */
  async list(project?: string, now = Date.now()): Promise<SessionRef[]> {
    const sessions: SessionRef[] = [];
    const prefix = project === undefined ? ["session"] : ["session", project];
    for await (const { key, value } of this.#kv.list<SessionMeta>({ prefix })) {
      if (value.expiresAt <= now) continue;
      sessions.push({
        project: key[1] as string,
        sessionId: key[2] as string,
        lastActive: value.lastActive,
        expiresAt: value.expiresAt,
      });
    }
    return sessions;
  }

  close(): void {
    this.#kv.close();
    if (this.#reads !== this.#kv) this.#reads.close();
  }

  /** Counts a write of the session and forgets what this store remembered of it. */
  #written(project: string, sessionId: string): void {
    this.#generations?.bump(project, sessionId);
    this.#cache.delete(`${project}/${sessionId}`);
  }

  /**
   * Keeps `session` as the most recently used, forgetting the least recently
   * used beyond the cap; `generation` is the session's write counter when it
   * was read or written (undefined: unknown, read the meta record next time).
   */
  #remember(key: string, session: Session, generation: number | undefined): Session {
    this.#cache.set(key, { session, generation });
    if (this.#cache.size > CACHED_SESSIONS) {
      this.#cache.delete(this.#cache.keys().next().value!);
    }
    return session;
  }

  async #writeBatches(writes: [Deno.KvKey, StoredMessage][], expireIn: number): Promise<void> {
    let op = this.#kv.atomic();
    let count = 0;
    let bytes = 0;
    for (const [key, value] of writes) {
      const size = value.content.length * 3 + 64;
      if (count > 0 && (count >= BATCH_MUTATIONS || bytes + size > BATCH_BYTES)) {
        await commitOrThrow(op);
        op = this.#kv.atomic();
        count = 0;
        bytes = 0;
      }
      op.set(key, value, { expireIn });
      count++;
      bytes += size;
    }
    if (count > 0) await commitOrThrow(op);
  }

  async #deleteRange(project: string, sessionId: string, from: number, to: number): Promise<void> {
    if (from >= to) return;
    const prefix = ["message", project, sessionId];
    const selector = Number.isFinite(to)
      ? { start: [...prefix, from], end: [...prefix, to] }
      : { prefix };
    let op = this.#kv.atomic();
    let count = 0;
    for await (const { key } of this.#kv.list(selector)) {
      op.delete(key);
      if (++count === BATCH_MUTATIONS) {
        await commitOrThrow(op);
        op = this.#kv.atomic();
        count = 0;
      }
    }
    if (count > 0) await commitOrThrow(op);
  }
}

async function commitOrThrow(op: Deno.AtomicOperation): Promise<void> {
  const result = await op.commit();
  if (!result.ok) throw new Error("session store: atomic write was rejected");
}
