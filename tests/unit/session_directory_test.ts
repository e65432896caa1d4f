/**
 * Unit tests of the live-session directory (lib/sessions/session_directory.ts):
 * start-up load, LRU eviction past busy sessions, `settled`, expiry. A fake
 * store and an injected clock: no Deno KV, no sleeps.
 */

import { deepEqual, equal } from "node:assert/strict";
import { SessionDirectory } from "../../lib/sessions/session_directory.ts";
import type { SessionRef, StoreCheck } from "../../lib/sessions/session_store.ts";

const TTL = 60_000;

/** A store that answers `check` with `sessions` and records each `clear`. */
function fakeStore(sessions: SessionRef[] = []) {
  const cleared: string[] = [];
  let release = Promise.resolve();
  return {
    cleared,
    /** Makes the next clears wait until the returned function is called. */
    hold(): () => void {
      const { promise, resolve } = Promise.withResolvers<void>();
      release = promise;
      return resolve;
    },
    check: (): Promise<StoreCheck> =>
      Promise.resolve({ sessions: [...sessions], unreadable: [], records: sessions.length }),
    async clear(project: string, sessionId: string, deleteSession = false): Promise<void> {
      cleared.push(`${project}/${sessionId}${deleteSession ? " (deleted)" : ""}`);
      await release;
    },
  };
}

function directory(
  store: ReturnType<typeof fakeStore>,
  maxSessions: number,
  options: { busy?: Set<string>; clock?: { now: number } } = {},
) {
  const clock = options.clock ?? { now: 1_000_000 };
  return new SessionDirectory({
    store,
    maxSessions,
    ttlMs: TTL,
    isBusy: (project, sessionId) => options.busy?.has(`${project}/${sessionId}`) ?? false,
    now: () => clock.now,
  });
}

const ref = (project: string, sessionId: string, lastActive: number): SessionRef => ({
  project,
  sessionId,
  lastActive,
  expiresAt: lastActive + TTL,
});

Deno.test("session directory: load keeps the store's live sessions, least recently active first", async () => {
  const clock = { now: 1_000_000 };
  const store = fakeStore([ref("p", "b", 999_000), ref("p", "a", 998_000), ref("q", "c", 999_500)]);
  const sessions = directory(store, 3, { clock });
  await sessions.load();
  equal(sessions.size, 3);
  deepEqual(sessions.sessionsOf("p").sort(), ["a", "b"]);
  // One more session: the least recently active of the loaded ones (p/a) is evicted.
  sessions.touch("q", "d");
  equal(sessions.size, 3);
  deepEqual(store.cleared, ["p/a (deleted)"]);
  deepEqual(sessions.sessionsOf("p"), ["b"]);
});

Deno.test("session directory: beyond the cap the least recently used idle session is evicted", () => {
  const store = fakeStore();
  const busy = new Set(["p/s1"]);
  const sessions = directory(store, 2, { busy });
  sessions.touch("p", "s1");
  sessions.touch("p", "s2");
  sessions.touch("p", "s1"); // s1 most recently used now, but it is busy anyway
  sessions.touch("p", "s3");
  deepEqual(store.cleared, ["p/s2 (deleted)"]);
  deepEqual(sessions.sessionsOf("p"), ["s1", "s3"]);
  // Every session busy (the new one too: its request is running): the cap is exceeded
  // rather than a busy session evicted.
  busy.add("p/s3").add("p/s4");
  sessions.touch("p", "s4");
  deepEqual(sessions.sessionsOf("p"), ["s1", "s3", "s4"]);
  equal(store.cleared.length, 1);
  busy.clear();
  sessions.touch("p", "s5");
  deepEqual(store.cleared, ["p/s2 (deleted)", "p/s1 (deleted)", "p/s3 (deleted)"]);
  deepEqual(sessions.sessionsOf("p"), ["s4", "s5"]);
});

Deno.test("session directory: settled waits for the eviction of that session to finish", async () => {
  const store = fakeStore();
  const sessions = directory(store, 1);
  const release = store.hold();
  sessions.touch("p", "old");
  sessions.touch("p", "new");
  deepEqual(store.cleared, ["p/old (deleted)"]);
  let settled = false;
  const waiting = sessions.settled("p", "old").then(() => settled = true);
  // Another session, and a session with no eviction going on, are settled at once.
  await sessions.settled("p", "new");
  await Promise.resolve();
  equal(settled, false);
  release();
  await waiting;
  equal(settled, true);
});

Deno.test("session directory: sessions expire a TTL after their last use; forget drops one", () => {
  const clock = { now: 1_000_000 };
  const sessions = directory(fakeStore(), 10, { clock });
  sessions.touch("p", "a");
  clock.now += TTL / 2;
  sessions.touch("p", "b");
  sessions.touch("q", "c");
  equal(sessions.size, 3);
  clock.now += TTL / 2; // a's TTL is over, not b's
  equal(sessions.size, 2);
  deepEqual(sessions.sessionsOf("p"), ["b"]);
  sessions.forget("q", "c");
  deepEqual(sessions.sessionsOf("q"), []);
  equal(sessions.size, 1);
  clock.now += TTL;
  equal(sessions.size, 0);
});
