/**
 * Listing a store's sessions, and the start-up check that reads every record
 * of it (SQLite's own checks are out of reach through Deno KV), past records
 * that cannot be read. Private to `lib/sessions/`.
 *
 * @module
 */

import { isDamage } from "./session_store_error.ts";
import { readHistory, type SessionMeta } from "./records.ts";
import { readableEntries } from "./scan.ts";
import { sessionKey } from "./session_key.ts";

/** What {@linkcode checkStore} found. */
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

/** A live session as listed by {@linkcode listSessions}. */
export interface SessionRef {
  readonly project: string;
  readonly sessionId: string;
  readonly lastActive: number;
  readonly expiresAt: number;
}

/** Every live session, of one project or all; sessions whose record cannot be read are left out. */
export async function listSessions(
  kv: Deno.Kv,
  project: string | undefined,
  now: number,
): Promise<SessionRef[]> {
  const sessions: SessionRef[] = [];
  const prefix = project === undefined ? ["session"] : ["session", project];
  const entries = readableEntries<SessionMeta>(kv, prefix, 3 - prefix.length, () => {});
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
 * Reads every record of the store: the live sessions, and those whose
 * records cannot be read. Changes nothing. A session's history is read with
 * `reads`, as a turn reads it.
 */
export async function checkStore(kv: Deno.Kv, reads: Deno.Kv, now: number): Promise<StoreCheck> {
  const sessions: SessionRef[] = [];
  const metas = new Map<string, SessionMeta>();
  const unreadable = new Set<string>();
  /** Sessions with an unreadable message record somewhere, by name: their project and id. */
  const suspects = new Map<string, readonly string[]>();
  let records = 0;
  try {
    const entries = readableEntries<SessionMeta>(kv, ["session"], 2, ({ parts }) => {
      unreadable.add(sessionKey(parts[0], parts[1]));
    });
    for await (const { key, value } of entries) {
      records++;
      if (value.expiresAt <= now) continue;
      const [, project, sessionId] = key as [string, string, string];
      metas.set(sessionKey(project, sessionId), value);
      sessions.push({
        project,
        sessionId,
        lastActive: value.lastActive,
        expiresAt: value.expiresAt,
      });
    }
    // Messages in one pass; a session with an unreadable record somewhere is read as a turn
    // would read it (the record may lie outside its history, as one left to expire).
    const messages = readableEntries(kv, ["message"], 2, ({ parts }) => {
      suspects.set(sessionKey(parts[0], parts[1]), parts);
    });
    for await (const _ of messages) records++;
  } catch (error) {
    return { sessions, unreadable: [...unreadable], records, error: String(error) };
  }
  for (const [name, [project, sessionId]] of suspects) {
    const meta = metas.get(name);
    if (!meta) continue;
    try {
      await readHistory(reads, project, sessionId, meta);
    } catch (error) {
      if (!isDamage(error)) throw error;
      unreadable.add(name);
    }
  }
  const readable = sessions.filter((s) => !unreadable.has(sessionKey(s.project, s.sessionId)));
  return { sessions: readable, unreadable: [...unreadable], records };
}
