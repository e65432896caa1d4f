/**
 * The session store against real Deno KV files: messages larger than one KV
 * value, a repeated request_id answered from history, records that cannot be
 * read, and a store locked by another connection (Deno KV's expiry sweep).
 * Raw SQLite access (to damage a record, to hold the lock) runs in a child
 * process, never next to this process's own KV connections.
 */

import assert, { deepEqual, equal } from "node:assert/strict";
import { EngineClient } from "../lib/engine/engine_client.ts";
import { startSimulator } from "../lib/engine/simulator.ts";
import { SessionStore, type StoredMessage } from "../lib/sessions/session_store.ts";
import type { WorkerTurn } from "../lib/workers/messages.ts";
import { runTurn } from "../lib/workers/run_turn.ts";
import type { TurnContext } from "../lib/workers/turn_context.ts";

const turn = (user: string, answer: string): StoredMessage[] => [
  { role: "user", content: user, tokens: 5 },
  { role: "assistant", content: answer, tokens: 5 },
];

async function withDir(fn: (path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vllm-mqtt-kv-" });
  try {
    await fn(`${dir}/s.kv`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Runs `script` (node:sqlite on the file `path`) in a child Deno process. */
function sqliteChild(path: string, script: string, stdin: "piped" | "null" = "null") {
  return new Deno.Command(Deno.execPath(), {
    args: ["eval", `import { DatabaseSync } from "node:sqlite";\n${script}`, path],
    stdin,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** Replaces the stored value of every key under `keyPrefix` (hex) with bytes Deno KV cannot read. */
async function damageValues(path: string, hexKeyPrefix: string): Promise<number> {
  const child = sqliteChild(
    path,
    `const db = new DatabaseSync(Deno.args[0]);
     const r = db.prepare("update kv set v = x'ff0f6f00' where hex(k) like ?").run(${
      JSON.stringify(hexKeyPrefix)
    } + "%");
     console.log(r.changes); db.close();`,
  );
  const { code, stdout, stderr } = await child.output();
  assert(code === 0, new TextDecoder().decode(stderr));
  return Number(new TextDecoder().decode(stdout).trim());
}

/** Deno KV's key encoding of a tuple of strings (as in its SQLite file), in hex. */
function hexKey(...parts: string[]): string {
  return parts.map((part) =>
    "02" +
    [...new TextEncoder().encode(part)].map((b) => b.toString(16).padStart(2, "0")).join("") +
    "00"
  ).join("").toUpperCase();
}

Deno.test("session store: messages over 64 KiB are stored in chunks and read back whole", async () => {
  await withDir(async (path) => {
    const store = await SessionStore.open(path, 60_000);
    const other = await SessionStore.open(path, 60_000);
    try {
      const answer = "a".repeat(70_000);
      const cjk = "迷".repeat(34_000);
      // 100 KB of user text; emoji (surrogate pairs) across every chunk boundary.
      const user = "u".repeat(29_999) + "🙂".repeat(35_000);
      await store.commitTurn("p", "s", await store.load("p", "s"), 0, turn(user, answer));
      await store.commitTurn("p", "s", await store.load("p", "s"), 0, turn(cjk, cjk));
      // A turn larger than one atomic operation allows (800 KiB): 900 KB of CJK text.
      const huge = "字".repeat(450_000);
      await store.commitTurn("p", "s", await store.load("p", "s"), 0, turn("short", huge));
      // Read by another connection, which remembers nothing of these turns.
      const { history, meta } = await other.load("p", "s");
      deepEqual(history.map((m) => m.content), [user, answer, cjk, cjk, "short", huge]);
      deepEqual([meta!.firstSeq, meta!.nextSeq], [0, 6]);
      // Trimming deletes the chunks with their messages.
      await store.commitTurn("p", "s", await store.load("p", "s"), 4, turn("next", "ok"));
      deepEqual((await other.load("p", "s")).history.map((m) => m.seq), [4, 5, 6, 7]);
      const kv = await Deno.openKv(path);
      try {
        let left = 0;
        for await (
          const _ of kv.list({ start: ["message", "p", "s", 0], end: ["message", "p", "s", 4] })
        ) left++;
        equal(left, 0, "no chunk of a trimmed message is left");
      } finally {
        kv.close();
      }
    } finally {
      store.close();
      other.close();
    }
  });
});

Deno.test("session store: chunked messages survive the kept-message rewrite and a lost race", async () => {
  await withDir(async (path) => {
    const ttl = 60_000;
    const [a, b] = await Promise.all([
      SessionStore.open(path, ttl),
      SessionStore.open(path, ttl),
    ]);
    try {
      const big = (c: string) => c.repeat(70_000);
      const t0 = Date.now();
      // Turns half a TTL apart: the third rewrites the kept (chunked) messages.
      for (let i = 0; i < 4; i++) {
        const now = t0 + i * (ttl / 2);
        await a.commitTurn(
          "p",
          "s",
          await a.load("p", "s", now),
          0,
          turn(`q${i}`, big(`${i}`)),
          now,
        );
      }
      // Two writers on one base: the loser rewrites its chunks under the next seqs; the
      // winner's chunks under the same seqs are not mixed with the loser's first try.
      const [seenByA, seenByB] = [await a.load("p", "s"), await b.load("p", "s")];
      await a.commitTurn("p", "s", seenByA, 0, turn("from a", big("A")));
      await b.commitTurn("p", "s", seenByB, 0, turn("from b", big("B")));
      const fresh = await SessionStore.open(path, ttl);
      try {
        deepEqual((await fresh.load("p", "s")).history.map((m) => m.content), [
          ...[0, 1, 2, 3].flatMap((i) => [`q${i}`, big(`${i}`)]),
          "from a",
          big("A"),
          "from b",
          big("B"),
        ]);
      } finally {
        fresh.close();
      }
    } finally {
      a.close();
      b.close();
    }
  });
});

Deno.test("run turn: a request_id already in the history is answered from it, also after a restart", async () => {
  const sim = await startSimulator({ ttftMs: 1, itlMs: 0, apiKey: "k" });
  try {
    await withDir(async (path) => {
      const context = async (): Promise<TurnContext> => ({
        store: await SessionStore.open(path, 60_000),
        engine: new EngineClient({ baseUrl: sim.url, apiKey: "k", model: "sim-model" }),
        maxHistoryTokens: 2000,
        trimLowWater: 0.6,
        maxModelLen: 4096,
        skipThinking: false,
      });
      const job = (id: number, requestId: string, reset = false): WorkerTurn => ({
        id,
        project: "p",
        sessionId: "s",
        message: `hello ${requestId}`,
        reset,
        systemPrompt: "You are a test.",
        systemTokens: undefined,
        systemPromptFromRequest: false,
        params: { max_tokens: 100, temperature: 0, top_p: 1 },
        stream: false,
        requestId,
      });
      const signal = new AbortController().signal;
      const before = await context();
      const first = await runTurn(job(1, "r1"), before, signal, () => {});
      equal(sim.received.length, 1);
      before.store.close();
      before.engine.close();
      // The service restarted: a new store, nothing remembered in memory.
      const after = await context();
      try {
        for (const repeat of [job(2, "r1"), job(3, "r1", true)]) {
          const again = await runTurn(repeat, after, signal, () => {});
          deepEqual(
            [again.response, again.finishReason, again.usage, again.repeated],
            [first.response, first.finishReason, first.usage, true],
          );
        }
        equal(sim.received.length, 1, "nothing generated again");
        const { history } = await after.store.load("p", "s");
        deepEqual(history.map((m) => [m.role, m.requestId]), [
          ["user", "r1"],
          ["assistant", undefined],
        ]);
        // Another request id is a new turn.
        const other = await runTurn(job(4, "r2"), after, signal, () => {});
        equal(other.repeated, undefined);
        equal(sim.received.length, 2);
      } finally {
        after.store.close();
        after.engine.close();
      }
    });
  } finally {
    await sim.close();
  }
});

Deno.test("session store: a session whose records cannot be read is dropped, and the others stay", async () => {
  await withDir(async (path) => {
    let store = await SessionStore.open(path, 60_000);
    for (const id of ["a", "b", "c", "d"]) {
      await store.commitTurn("p", id, await store.load("p", id), 0, turn(`hi ${id}`, `re ${id}`));
    }
    await store.setSystemPrompt("p", "c", "own prompt");
    store.close();
    // b: a message Deno KV cannot deserialize; c: its meta record.
    equal(await damageValues(path, hexKey("message", "p", "b")), 2);
    equal(await damageValues(path, hexKey("session", "p", "c")), 1);
    store = await SessionStore.open(path, 60_000);
    try {
      // The start-up check reads past both, and names them.
      const check = await store.check();
      deepEqual(check.unreadable.sort(), ["p/b", "p/c"]);
      deepEqual(check.sessions.map((s) => s.sessionId).sort(), ["a", "d"]);
      equal(check.error, undefined);
      deepEqual((await store.list("p")).map((s) => s.sessionId).sort(), ["a", "b", "d"]);
      // A turn on each: the damaged ones start afresh, once.
      for (const id of ["b", "c"]) {
        const session = await store.load("p", id);
        deepEqual([session.lost, session.history], [true, []]);
        await store.commitTurn("p", id, session, 0, turn(`again ${id}`, "ok"));
        const next = await store.load("p", id);
        deepEqual([next.lost, next.history.map((m) => m.content)], [undefined, [
          `again ${id}`,
          "ok",
        ]]);
      }
      deepEqual((await store.load("p", "a")).history.map((m) => m.content), ["hi a", "re a"]);
      deepEqual((await store.check()).unreadable, []);
    } finally {
      store.close();
    }
  });
});

Deno.test("session store: a reset of a session whose records cannot be read succeeds", async () => {
  await withDir(async (path) => {
    let store = await SessionStore.open(path, 60_000);
    await store.commitTurn("p", "s", await store.load("p", "s"), 0, turn("hi", "re"));
    await store.commitTurn("p", "t", await store.load("p", "t"), 0, turn("hi", "re"));
    store.close();
    equal(await damageValues(path, hexKey("message", "p", "s")), 2);
    equal(await damageValues(path, hexKey("session", "p", "t")), 1);
    store = await SessionStore.open(path, 60_000);
    try {
      await store.clear("p", "s");
      await store.clear("p", "t", true);
      for (const id of ["s", "t"]) {
        deepEqual((await store.load("p", id)).history, []);
        await store.commitTurn("p", id, await store.load("p", id), 0, turn("new", "ok"));
        deepEqual((await store.load("p", id)).history.map((m) => m.content), ["new", "ok"]);
      }
    } finally {
      store.close();
    }
  });
});

Deno.test("session store: a turn waits while another connection holds the store's lock", async () => {
  await withDir(async (path) => {
    const store = await SessionStore.open(path, 60_000);
    // Another process takes SQLite's write lock, as Deno KV's expiry sweep does while it
    // deletes expired keys, and holds it until told to let go.
    const holder = sqliteChild(
      path,
      `const db = new DatabaseSync(Deno.args[0]);
       db.exec("BEGIN IMMEDIATE"); console.log("locked");
       for await (const _ of Deno.stdin.readable) { /* until closed */ }
       db.exec("COMMIT"); db.close();`,
      "piped",
    );
    try {
      const reader = holder.stdout.pipeThrough(new TextDecoderStream()).getReader();
      equal((await reader.read()).value?.trim(), "locked");
      reader.releaseLock();
      const commit = store.commitTurn("p", "s", await store.load("p", "s"), 0, turn("hi", "re"));
      const outcome = await Promise.race([
        commit.then(() => "committed", (error) => `failed: ${error.message}`),
        new Promise((resolve) => setTimeout(resolve, 1500, "waiting")),
      ]);
      await holder.stdin.close();
      equal((await holder.status).code, 0);
      equal(outcome, "waiting");
      await commit;
      deepEqual((await store.load("p", "s")).history.map((m) => m.content), ["hi", "re"]);
    } finally {
      await holder.stdin.close().catch(() => {});
      await holder.status;
      await holder.stdout.cancel().catch(() => {});
      await holder.stderr.cancel();
      store.close();
    }
  });
});

Deno.test("session store: turns do not fail while Deno KV's expiry sweep deletes many expired keys", async () => {
  await withDir(async (path) => {
    // Opened first: these connections' own sweeps are a minute away.
    const store = await SessionStore.open(path, 60_000);
    const writer = await Deno.openKv(path);
    const expired = 30_000;
    for (let i = 0; i < expired; i += 500) {
      const op = writer.atomic();
      for (let j = i; j < i + 500; j++) {
        op.set(["message", "old", `s${j}`, 0], { role: "user", content: "x".repeat(200) }, {
          expireIn: 1,
        });
      }
      await op.commit();
    }
    writer.close();
    let stop = false;
    const failures: string[] = [];
    let turns = 0;
    const loops = Array.from({ length: 8 }, async (_, w) => {
      for (let i = 0; !stop; i++) {
        const id = `s${w}-${i}`;
        try {
          await store.commitTurn("p", id, await store.load("p", id), 0, turn("hi", "re"));
          turns++;
        } catch (error) {
          failures.push((error as Error).message);
        }
      }
    });
    // A new connection sweeps expired keys as it opens (then about once a minute); its first
    // read is answered after the sweep.
    const sweeper = await Deno.openKv(path);
    try {
      await sweeper.get(["none"]);
      let left = 0;
      for await (const _ of sweeper.list({ prefix: ["message", "old"] })) left++;
      equal(left, 0, "the sweep ran");
    } finally {
      stop = true;
      await Promise.all(loops);
      sweeper.close();
      store.close();
    }
    deepEqual(failures, []);
    assert(turns > 0);
  });
});
