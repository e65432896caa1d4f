/**
 * Unit tests of the group commit of turns (`lib/sessions/group_commit.ts`),
 * in-process on an in-memory Deno KV whose atomic operations are counted.
 */

import { deepEqual, equal, ok, rejects } from "node:assert/strict";
import { GroupCommit, PendingWrite } from "../../lib/sessions/group_commit.ts";
import { SessionStore } from "../../lib/sessions/session_store.ts";

/** Runs `fn` on an in-memory store that counts the atomic operations made on it. */
async function withCountedKv(
  fn: (kv: Deno.Kv, atomics: () => number) => Promise<void>,
): Promise<void> {
  const kv = await Deno.openKv(":memory:");
  let atomics = 0;
  const counted = new Proxy(kv, {
    get(target, name) {
      if (name === "atomic") {
        return () => {
          atomics++;
          return target.atomic();
        };
      }
      const value = Reflect.get(target, name, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  try {
    await fn(counted, () => atomics);
  } finally {
    kv.close();
  }
}

/** Queues at once on `commits` writes creating sessions `s0` … `s<count - 1>`; all must commit. */
async function createAll(commits: GroupCommit, count: number): Promise<void> {
  const results = await Promise.all(
    Array.from({ length: count }, (_, i) => commits.commit(create(`s${i}`))),
  );
  ok(results.every((result) => result.ok));
}

/** A write that creates `["session", name]` (or fails its check with `versionstamp`). */
function create(name: string, value: unknown = name, versionstamp: string | null = null) {
  return new PendingWrite()
    .check({ key: ["session", name], versionstamp })
    .set(["session", name], value, 64);
}

Deno.test("writes queued while one is in flight go together in one atomic operation", async () => {
  await withCountedKv(async (kv, atomics) => {
    const commits = new GroupCommit(kv);
    await createAll(commits, 10);
    // The first goes at once, the nine queued behind it in one more.
    equal(atomics(), 2);
    for (let i = 0; i < 10; i++) equal((await kv.get(["session", `s${i}`])).value, `s${i}`);
  });
});

Deno.test("ungrouped (a remote store), each write is its own operation, none waiting for another", async () => {
  await withCountedKv(async (kv, atomics) => {
    const commits = new GroupCommit(kv, { grouped: false });
    const pending = Array.from({ length: 10 }, (_, i) => commits.commit(create(`s${i}`)));
    // All ten were sent before any finished: none sat in a queue behind another.
    equal(atomics(), 10);
    ok((await Promise.all(pending)).every((result) => result.ok));
  });
});

Deno.test("a batch stays within Deno KV's limits per atomic operation", async () => {
  await withCountedKv(async (kv, atomics) => {
    const commits = new GroupCommit(kv);
    // 1 + 150 writes: the 150 queued ones have one check each (100 a batch at most).
    await createAll(commits, 151);
    equal(atomics(), 3);
    // Values of 300 KiB (estimated): two a batch under 800 KiB.
    const big = "x".repeat(30_000);
    const before = atomics();
    const large = await Promise.all(
      Array.from({ length: 5 }, (_, i) =>
        commits.commit(
          new PendingWrite().check({ key: ["big", i], versionstamp: null })
            .set(["big", i], big, 300 * 1024),
        )),
    );
    ok(large.every((result) => result.ok));
    equal(atomics() - before, 3); // 1, then 2 + 2
  });
});

Deno.test("a failed check fails only its own write; the others of its batch commit", async () => {
  await withCountedKv(async (kv, atomics) => {
    await kv.set(["session", "taken"], "other writer's");
    const commits = new GroupCommit(kv);
    const [first, a, taken, b] = await Promise.all([
      commits.commit(create("first")),
      commits.commit(create("a")),
      commits.commit(create("taken", "mine")),
      commits.commit(create("b")),
    ]);
    deepEqual([first.ok, a.ok, taken.ok, b.ok], [true, true, false, true]);
    equal((await kv.get(["session", "taken"])).value, "other writer's");
    equal((await kv.get(["session", "a"])).value, "a");
    equal((await kv.get(["session", "b"])).value, "b");
    // first; the batch of three (check failed); then each of the three alone.
    equal(atomics(), 5);
  });
});

Deno.test("a write that throws fails alone; the others of its batch commit", async () => {
  await withCountedKv(async (kv) => {
    const commits = new GroupCommit(kv);
    const tooLarge = new PendingWrite().set(["session", "large"], "x".repeat(70_000), 1024);
    const outcomes = await Promise.allSettled([
      commits.commit(create("first")),
      commits.commit(create("a")),
      commits.commit(tooLarge),
      commits.commit(create("b")),
    ]);
    deepEqual(outcomes.map((outcome) => outcome.status), [
      "fulfilled",
      "fulfilled",
      "rejected",
      "fulfilled",
    ]);
    await rejects(Promise.reject((outcomes[2] as PromiseRejectedResult).reason), /too large/i);
    equal((await kv.get(["session", "b"])).value, "b");
    equal((await kv.get(["session", "large"])).value, null);
  });
});

Deno.test("two writes checking the same key never share a batch", async () => {
  await withCountedKv(async (kv) => {
    const commits = new GroupCommit(kv);
    // Both checked against "absent": only the first may win, as if they came one by one.
    const [first, one, two] = await Promise.all([
      commits.commit(create("first")),
      commits.commit(create("same", "one")),
      commits.commit(create("same", "two")),
    ]);
    deepEqual([first.ok, one.ok, two.ok], [true, true, false]);
    equal((await kv.get(["session", "same"])).value, "one");
  });
});

Deno.test("turns of many sessions committed together keep each session's order", async () => {
  await withCountedKv(async (kv, atomics) => {
    const store = new SessionStore(kv, 60_000);
    const sessions = Array.from({ length: 8 }, (_, i) => `s${i}`);
    const turns = 5;
    await Promise.all(sessions.map(async (sessionId) => {
      for (let turn = 0; turn < turns; turn++) {
        const session = await store.load("p", sessionId);
        await store.commitTurn("p", sessionId, session, 0, [
          { role: "user", content: `${sessionId} q${turn}`, tokens: 1 },
          { role: "assistant", content: `${sessionId} a${turn}`, tokens: 1 },
        ]);
      }
    }));
    const fresh = new SessionStore(kv, 60_000);
    for (const sessionId of sessions) {
      const { history } = await fresh.load("p", sessionId);
      deepEqual(
        history.map((message) => message.content),
        Array.from(
          { length: turns },
          (_, turn) => [`${sessionId} q${turn}`, `${sessionId} a${turn}`],
        ).flat(),
      );
    }
    // 40 turns; alone they would take 40 atomic operations (plus the first turns' renewals).
    ok(atomics() < 40, `${atomics()} atomic operations for 40 turns`);
  });
});
