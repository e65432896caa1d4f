/**
 * Conversation history in Deno KV. A message is one key, or, when it does not
 * fit one value (64 KiB), a head key and as many chunk keys as it needs. A
 * session's meta record is the commit point: it names the range of message
 * keys that make up the history, so a turn whose messages were written but
 * whose meta was not (a crash, an aborted stream) is simply not there.
 *
 * Keys:
 * - `["session", project, sessionId]` → {@linkcode SessionMeta}
 * - `["message", project, sessionId, seq]` → the message (its first chunk of
 *   text, and, if it has more, how many and the tag of their write)
 * - `["message", project, sessionId, seq, tag, i]` → its i-th further chunk
 *   of text (i ≥ 1). Chunks sort right after their head, so one range read
 *   returns a history in order. The tag tells them from chunks another write
 *   left under the same seq (a turn that lost its commit).
 *
 * A turn's messages and its meta record are written in one atomic operation
 * (or, for a turn too large for one (800 KiB), the chunks first and the heads
 * with the meta record last).
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
 * A session whose records cannot be read (a value Deno KV cannot deserialize,
 * a damaged page, a message missing a chunk) is dropped with a warning: its
 * meta record is rewritten to name an empty range past every key the session
 * used, so the damaged keys are never read again and expire by themselves.
 *
 * @module
 */

import { logger } from "../log.ts";
import type { Usage } from "../protocol/reply.ts";
import {
  commitOrThrow,
  commitUnlessBusy,
  DamagedRecord,
  isDamage,
  openKv,
  waitWhileBusy,
} from "./_util.ts";
import { readableEntries } from "./scan.ts";
import type { WriteGenerations } from "./write_generations.ts";

const log = logger("sessions");

/** One message of a session's history. */
export interface StoredMessage {
  readonly role: "user" | "assistant";
  readonly content: string;
  /** Its share of the prompt in tokens: exact when the engine reported usage. */
  readonly tokens: number;
  /** On a user message: the `request_id` it came with, to answer a repeat from history. */
  readonly requestId?: string;
  /** On an answer: the engine's usage of its turn, as reported to the client. */
  readonly usage?: Usage;
  /** On an answer: why the engine stopped. */
  readonly finishReason?: string;
}

/** A stored message with its position. */
export interface HistoryEntry extends StoredMessage {
  readonly seq: number;
  /** The tag of its chunk keys, when it has any (kept when it is rewritten). */
  readonly tag?: string;
}

/** A message's head record: its first chunk, and how many follow under which tag. */
interface StoredHead extends StoredMessage {
  readonly parts?: number;
  readonly tag?: string;
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
  /** The session's records could not be read: it was dropped, and starts afresh. */
  readonly lost?: boolean;
}

/** What {@linkcode SessionStore.check} found. */
export interface StoreCheck {
  /** The live sessions whose records could all be read. */
  readonly sessions: SessionRef[];
  /** `project/sessionId` of the sessions whose records could not be read. */
  readonly unreadable: string[];
  /** Records read. */
  readonly records: number;
  /** Set when the check had to stop: the store is damaged beyond single records. */
  readonly error?: string;
}

/** A live session as listed by {@linkcode SessionStore.list}. */
export interface SessionRef {
  readonly project: string;
  readonly sessionId: string;
  readonly lastActive: number;
  readonly expiresAt: number;
}

// Deno KV allows 1000 mutations in one atomic operation; stay well below, and
// below its 800 KiB total, when refreshing a long history.
const BATCH_MUTATIONS = 500;
const BATCH_BYTES = 512 * 1024;
/** A turn larger than this writes its chunks before the atomic operation that commits it. */
const TURN_BYTES = 640 * 1024;
/**
 * UTF-16 code units per chunk: at most 2 bytes each when serialized, so a
 * chunk and the head's other fields stay below Deno KV's 64 KiB per value.
 */
const CHUNK_UNITS = 30_000;
/** Tries of a turn's commit against writers that keep changing the session. */
const COMMIT_ATTEMPTS = 20;
/** What {@linkcode SessionStore.probe} writes: about a short turn's size. */
const PROBE_VALUE = "p".repeat(4096);
/** Sessions a store remembers; the least recently used is forgotten first. */
const CACHED_SESSIONS = 1024;

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

  /**
   * Loads a session's history; an expired or unknown session is empty. A
   * session whose records cannot be read is dropped (see the module's doc) and
   * comes back empty with `lost` set.
   */
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
    let entry: Deno.KvEntryMaybe<SessionMeta>;
    try {
      entry = await this.#reads.get<SessionMeta>(["session", project, sessionId]);
    } catch (error) {
      if (!isDamage(error)) throw error;
      return await this.#drop(project, sessionId, undefined, error, now);
    }
    const meta = entry.value;
    const { versionstamp } = entry;
    if (!meta || meta.expiresAt <= now) return { meta: undefined, history: [], versionstamp };
    if (cached?.session.versionstamp === versionstamp) {
      return this.#remember(cacheKey, cached.session, generation);
    }
    let history: HistoryEntry[];
    try {
      history = await this.#readHistory(project, sessionId, meta);
    } catch (error) {
      if (!isDamage(error)) throw error;
      return await this.#drop(project, sessionId, { meta, versionstamp }, error, now);
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
   * and appends after the other's turn. While another connection holds the
   * store's lock (Deno KV's expiry sweep, other turns' commits), it waits, up
   * to {@linkcode BUSY_PATIENCE_MS}.
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
    const prefix = ["message", project, sessionId];
    let busyTries = 0;
    let busySince = 0;
    let refreshed: Session | undefined;
    for (let conflicts = 0; conflicts < COMMIT_ATTEMPTS;) {
      const base = session.meta?.nextSeq ?? 0;
      const kept = session.history.slice(drop);
      let messagesExpireAt = session.meta?.messagesExpireAt ?? 0;
      if (messagesExpireAt < now + expireIn) {
        // The oldest kept messages would expire before the meta record: give them a new
        // lifetime (once per loaded session, not again on each try). Rewriting them is
        // harmless even if this attempt loses.
        if (refreshed !== session) {
          await this.#writeBatches(
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
      const op = this.#kv.atomic().check({ key: metaKey, versionstamp: session.versionstamp });
      let bytes = 0;
      for (const [, value] of records.flat()) bytes += recordBytes(value);
      if (bytes <= TURN_BYTES) {
        for (const [key, value] of records.flat()) {
          op.set(key, value, { expireIn: messageExpireIn });
        }
      } else {
        // Too large for one atomic operation: the chunks first (nobody reads them before a
        // meta record names them), the heads with the meta record.
        await this.#writeBatches(records.flatMap((list) => list.slice(1)), messageExpireIn);
        for (const [key, value] of records.map((list) => list[0])) {
          op.set(key, value, { expireIn: messageExpireIn });
        }
      }
      op.set(metaKey, meta, { expireIn });
      const before = this.#generations?.current(project, sessionId);
      const committed = await commitUnlessBusy(op);
      if (committed === "busy") {
        // Another connection holds the lock: not a change of the session, so no conflict.
        if (busyTries === 0) busySince = performance.now();
        await waitWhileBusy(busyTries++, busySince);
        continue;
      }
      busyTries = 0;
      if (committed.ok) {
        const history = [
          ...kept,
          ...added.map((message, i) => ({
            ...message,
            seq: base + i,
            ...(records[i].length > 1 && { tag }),
          })),
        ];
        this.#committed(
          project,
          sessionId,
          { meta, history, versionstamp: committed.versionstamp },
          before,
        );
        await this.#deleteRange(project, sessionId, session.meta?.firstSeq ?? 0, meta.firstSeq)
          .catch((error) => {
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
      conflicts++;
      session = await this.load(project, sessionId, now);
      drop = 0;
    }
    throw new Error(`session store: ${project}/${sessionId} kept changing under this turn`);
  }

  /** Forgets a session's history; keeps a per-session system prompt unless `deleteSession`. */
  async clear(project: string, sessionId: string, deleteSession = false): Promise<void> {
    const key = ["session", project, sessionId];
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
      await this.#deleteRange(project, sessionId, 0, Infinity);
    } catch (error) {
      if (!isDamage(error)) throw error;
      // Some message cannot be read, so neither can its key be listed: leave them all to
      // expire, out of reach of the session's next range.
      warnDropped(project, sessionId, error);
      await this.#kv.set(key, emptyAt(freshSeq(meta ?? undefined, now)), {
        expireIn: this.#ttlMs,
      });
    }
    this.#written(project, sessionId);
  }

  /** Sets (or, with undefined, removes) a session's own system prompt. */
  async setSystemPrompt(
    project: string,
    sessionId: string,
    systemPrompt: string | undefined,
  ): Promise<void> {
    const key = ["session", project, sessionId];
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
    this.#written(project, sessionId);
  }

  /**
   * Writes and deletes a small record of its own (`["probe", id]`, never read
   * by anything else): rejects when the store cannot be written.
   */
  async probe(id: string): Promise<void> {
    const key = ["probe", id];
    // Left behind when the delete fails, it expires by itself.
    await commitOrThrow(this.#kv.atomic().set(key, PROBE_VALUE, { expireIn: 60_000 }));
    await commitOrThrow(this.#kv.atomic().delete(key));
  }

  /** Every live session, of one project or all; sessions whose record cannot be read are left out. */
  async list(project?: string, now = Date.now()): Promise<SessionRef[]> {
    const sessions: SessionRef[] = [];
    const prefix = project === undefined ? ["session"] : ["session", project];
    const entries = readableEntries<SessionMeta>(this.#kv, prefix, 3 - prefix.length, () => {});
    for await (const { key, value } of entries) {
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

  /**
   * Reads every record of the store (a start-up check: SQLite's own checks are
   * out of reach through Deno KV): the live sessions, and those whose records
   * cannot be read. Damaged sessions are not changed here: each is dropped,
   * with a warning, when its client next writes to it.
   */
  async check(now = Date.now()): Promise<StoreCheck> {
    const sessions: SessionRef[] = [];
    const metas = new Map<string, SessionMeta>();
    const unreadable = new Set<string>();
    const suspects = new Set<string>();
    let records = 0;
    try {
      const entries = readableEntries<SessionMeta>(this.#kv, ["session"], 2, ({ parts }) => {
        unreadable.add(parts.join("/"));
      });
      for await (const { key, value } of entries) {
        records++;
        if (value.expiresAt <= now) continue;
        const [, project, sessionId] = key as [string, string, string];
        metas.set(`${project}/${sessionId}`, value);
        sessions.push({
          project,
          sessionId,
          lastActive: value.lastActive,
          expiresAt: value.expiresAt,
        });
      }
      // Messages in one pass; a session with an unreadable record somewhere is read as a turn
      // would read it (the record may lie outside its history, as one left to expire).
      const messages = readableEntries(this.#kv, ["message"], 2, ({ parts }) => {
        suspects.add(parts.join("/"));
      });
      for await (const _ of messages) records++;
    } catch (error) {
      return { sessions, unreadable: [...unreadable], records, error: String(error) };
    }
    for (const name of suspects) {
      const meta = metas.get(name);
      if (!meta) continue;
      const [project, ...rest] = name.split("/");
      try {
        await this.#readHistory(project, rest.join("/"), meta);
      } catch (error) {
        if (!isDamage(error)) throw error;
        unreadable.add(name);
      }
    }
    const readable = sessions.filter((s) => !unreadable.has(`${s.project}/${s.sessionId}`));
    return { sessions: readable, unreadable: [...unreadable], records };
  }

  close(): void {
    this.#kv.close();
    if (this.#reads !== this.#kv) this.#reads.close();
  }

  /** The messages of `meta`'s range, their chunks joined. */
  async #readHistory(
    project: string,
    sessionId: string,
    meta: SessionMeta,
  ): Promise<HistoryEntry[]> {
    const prefix = ["message", project, sessionId];
    const history: HistoryEntry[] = [];
    let head: { seq: number; value: StoredHead; chunks: string[] } | undefined;
    const finish = () => {
      if (!head) return;
      const { seq, value, chunks } = head;
      const { parts = 0, tag, ...message } = value;
      if (chunks.length !== parts + 1) {
        throw new DamagedRecord(
          `message ${seq} has ${chunks.length - 1} of its ${parts} further chunks`,
        );
      }
      history.push({
        ...message,
        content: chunks.length === 1 ? chunks[0] : chunks.join(""),
        seq,
        ...(tag !== undefined && { tag }),
      });
      head = undefined;
    };
    const list = this.#reads.list<StoredHead | string>({
      start: [...prefix, meta.firstSeq],
      end: [...prefix, meta.nextSeq],
    });
    for await (const { key, value } of list) {
      if (key.length === 4) {
        finish();
        if (typeof value !== "object" || value === null || typeof value.content !== "string") {
          throw new DamagedRecord(`message ${String(key[3])} is not a message`);
        }
        head = { seq: key[3] as number, value, chunks: [value.content] };
      } else if (
        head && key.length === 6 && key[3] === head.seq && key[4] === head.value.tag &&
        key[5] === head.chunks.length && typeof value === "string"
      ) {
        head.chunks.push(value);
      }
      // Anything else is a chunk another write left under this seq: not part of the history.
    }
    finish();
    return history;
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
    const metaKey = ["session", project, sessionId];
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
    if (known) op.check({ key: metaKey, versionstamp: known.versionstamp });
    op.set(metaKey, meta, { expireIn: this.#ttlMs });
    const before = this.#generations?.current(project, sessionId);
    let committed: Deno.KvCommitResult;
    try {
      committed = await commitOrThrow(op);
    } catch (failure) {
      if (!known || isDamage(failure)) throw failure;
      // Someone wrote the session in between (another instance dropping it too): read theirs.
      return { ...(await this.load(project, sessionId, now)), lost: true };
    }
    const session: Session = { meta, history: [], versionstamp: committed.versionstamp };
    this.#committed(project, sessionId, session, before);
    return { ...session, lost: true };
  }

  /**
   * Remembers a session this store just wrote; `before` is its write counter
   * read before the write.
   */
  #committed(project: string, sessionId: string, session: Session, before: number | undefined) {
    const after = this.#generations?.bump(project, sessionId);
    // Another thread's write in between (the counter moved by more than ours) leaves the
    // generation unknown: the next load then checks the versionstamp.
    const generation = after !== undefined && after === before! + 1 ? after : undefined;
    this.#remember(`${project}/${sessionId}`, session, generation);
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

  async #writeBatches(writes: MessageRecord[], expireIn: number): Promise<void> {
    let op = this.#kv.atomic();
    let count = 0;
    let bytes = 0;
    for (const [key, value] of writes) {
      const size = recordBytes(value);
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

/** A key and value to write for a message. */
type MessageRecord = [Deno.KvKey, StoredHead | string];

/**
 * A message's records: its head, then its further chunks under `tag` (a new
 * write's; a rewrite keeps the message's own).
 */
function messageRecords(
  prefix: Deno.KvKey,
  seq: number,
  message: StoredMessage & { readonly seq?: number; readonly tag?: string },
  tag?: string,
): MessageRecord[] {
  const { seq: _seq, tag: ownTag, content, ...fields } = message;
  const chunks = splitText(content);
  if (chunks.length === 1) return [[[...prefix, seq], { ...fields, content }]];
  const chunkTag = ownTag ?? tag ?? newTag();
  return [
    [[...prefix, seq], { ...fields, content: chunks[0], parts: chunks.length - 1, tag: chunkTag }],
    ...chunks.slice(1).map((chunk, i): MessageRecord => [[...prefix, seq, chunkTag, i + 1], chunk]),
  ];
}

/** `text` in chunks of at most {@linkcode CHUNK_UNITS}, never splitting a surrogate pair. */
function splitText(text: string): string[] {
  if (text.length <= CHUNK_UNITS) return [text];
  const chunks: string[] = [];
  for (let at = 0; at < text.length;) {
    let end = Math.min(at + CHUNK_UNITS, text.length);
    const last = text.charCodeAt(end - 1);
    if (end < text.length && last >= 0xd800 && last <= 0xdbff) end--;
    chunks.push(text.slice(at, end));
    at = end;
  }
  return chunks;
}

/** A record's size when serialized, from above: 2 bytes per UTF-16 unit, and room for the rest. */
function recordBytes(value: StoredHead | string): number {
  if (typeof value === "string") return 2 * value.length + 64;
  return 2 * (value.content.length + (value.requestId?.length ?? 0)) + 512;
}

function newTag(): string {
  return crypto.randomUUID().slice(0, 8);
}

/**
 * A seq past every one a session used: past its meta record's range when
 * that could be read, and past the time-based ones earlier drops used.
 */
function freshSeq(meta: SessionMeta | undefined, now: number): number {
  return Math.max(meta?.nextSeq ?? 0, now * 1000);
}

function warnDropped(project: string, sessionId: string, error: unknown): void {
  log.warn(
    "Session {project}/{sessionId} cannot be read ({message}): dropped; its client starts a fresh conversation",
    { project, sessionId, message: (error as Error)?.message ?? String(error) },
  );
}
