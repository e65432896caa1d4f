/**
 * How a session is laid out in Deno KV. A message is one key, or, when it
 * does not fit one value (64 KiB), a head key and as many chunk keys as it
 * needs. A session's meta record is the commit point: it names the range of
 * message keys that make up the history, so a turn whose messages were
 * written but whose meta was not (a crash, an aborted stream) is simply not
 * there.
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
 * Private to `lib/sessions/`.
 *
 * @module
 */

import type { Usage } from "../protocol/reply.ts";
import { commitOrThrow } from "./_util.ts";
import { DamagedRecord } from "./session_store_error.ts";

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

/** A key and value to write for a message. */
export type MessageRecord = [Deno.KvKey, StoredHead | string];

// Deno KV allows 1000 mutations in one atomic operation; stay well below, and
// below its 800 KiB total, when writing or deleting many records.
const BATCH_MUTATIONS = 500;
const BATCH_BYTES = 512 * 1024;
/**
 * UTF-16 code units per chunk: at most 2 bytes each when serialized, so a
 * chunk and the head's other fields stay below Deno KV's 64 KiB per value.
 */
const CHUNK_UNITS = 30_000;

/** The key of a session's meta record. */
export function metaKey(project: string, sessionId: string): Deno.KvKey {
  return ["session", project, sessionId];
}

/** The prefix of a session's message keys. */
export function messagePrefix(project: string, sessionId: string): Deno.KvKey {
  return ["message", project, sessionId];
}

/**
 * A message's records: its head, then its further chunks under `tag` (a new
 * write's; a rewrite keeps the message's own).
 */
export function messageRecords(
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
export function splitText(text: string): string[] {
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
export function recordBytes(value: StoredHead | string): number {
  if (typeof value === "string") return 2 * value.length + 64;
  return 2 * (value.content.length + (value.requestId?.length ?? 0)) + 512;
}

/** A new tag for the chunk keys of one write. */
export function newTag(): string {
  return crypto.randomUUID().slice(0, 8);
}

/**
 * A seq past every one a session used: past its meta record's range when
 * that could be read, and past the time-based ones earlier drops used.
 */
export function freshSeq(meta: SessionMeta | undefined, now: number): number {
  return Math.max(meta?.nextSeq ?? 0, now * 1000);
}

/**
 * The messages of `meta`'s range, their chunks joined.
 *
 * @throws {DamagedRecord} when a message is not one or misses a chunk.
 */
export async function readHistory(
  kv: Deno.Kv,
  project: string,
  sessionId: string,
  meta: SessionMeta,
): Promise<HistoryEntry[]> {
  const prefix = messagePrefix(project, sessionId);
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
  const list = kv.list<StoredHead | string>({
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

/** Writes `writes` in as few atomic operations as Deno KV's limits allow. */
export async function writeBatches(
  kv: Deno.Kv,
  writes: MessageRecord[],
  expireIn: number,
): Promise<void> {
  let op = kv.atomic();
  let count = 0;
  let bytes = 0;
  for (const [key, value] of writes) {
    const size = recordBytes(value);
    if (count > 0 && (count >= BATCH_MUTATIONS || bytes + size > BATCH_BYTES)) {
      await commitOrThrow(op);
      op = kv.atomic();
      count = 0;
      bytes = 0;
    }
    op.set(key, value, { expireIn });
    count++;
    bytes += size;
  }
  if (count > 0) await commitOrThrow(op);
}

/** Deletes a session's message keys with seq in [`from`, `to`) (`to` Infinity: all of them). */
export async function deleteMessages(
  kv: Deno.Kv,
  project: string,
  sessionId: string,
  from: number,
  to: number,
): Promise<void> {
  if (from >= to) return;
  const prefix = messagePrefix(project, sessionId);
  const selector = Number.isFinite(to)
    ? { start: [...prefix, from], end: [...prefix, to] }
    : { prefix };
  let op = kv.atomic();
  let count = 0;
  for await (const { key } of kv.list(selector)) {
    op.delete(key);
    if (++count === BATCH_MUTATIONS) {
      await commitOrThrow(op);
      op = kv.atomic();
      count = 0;
    }
  }
  if (count > 0) await commitOrThrow(op);
}
