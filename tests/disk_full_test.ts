/**
 * End to end: the service's data directory on a small tmpfs that fills up.
 * Needs root (mount) and mosquitto; reported as ignored otherwise.
 */

import assert, { equal, match } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  HAS_MOSQUITTO,
  type Received,
  type ServiceProcess,
  startMosquitto,
  startService,
  TestClient,
  waitFor,
  withService,
} from "./_helpers.ts";

/** Whether a tmpfs can be mounted here (root, and a kernel and container that allow it). */
const CAN_MOUNT = (() => {
  if (Deno.build.os !== "linux") return "not Linux";
  let dir: string | undefined;
  try {
    dir = Deno.makeTempDirSync({ prefix: "vllm-mqtt-mount-check-" });
    const mounted = run("mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir]);
    if (!mounted.ok) return `cannot mount a tmpfs (${mounted.text || "not root?"})`;
    run("umount", [dir]);
    return true;
  } catch (error) {
    return `cannot run mount (${(error as Error).message})`;
  } finally {
    if (dir) Deno.removeSync(dir, { recursive: true });
  }
})();
if (CAN_MOUNT !== true) console.warn(`disk_full_test: ignored: ${CAN_MOUNT}`);

function run(command: string, args: string[]): { ok: boolean; text: string } {
  const output = new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .outputSync();
  const text = new TextDecoder().decode(output.stderr).trim();
  return { ok: output.success, text };
}

/** Writes a file in `dir` until the disk has no room left; returns its path. */
async function fillDisk(dir: string): Promise<string> {
  const path = `${dir}/filler`;
  using file = await Deno.open(path, { write: true, create: true });
  for (const size of [64 * 1024, 4096, 512]) {
    const block = new Uint8Array(size).fill(7);
    try {
      for (;;) await file.write(block);
    } catch (error) {
      if (!/no space left|os error 28/i.test((error as Error).message)) throw error;
    }
  }
  return path;
}

const errorCode = (reply: Received) => (reply.json?.error as { code?: string })?.code;

Deno.test({
  name:
    "disk full: a turn is answered storage_unavailable, /readyz names the store, later turns are refused before the engine; with room again answers resume with the history intact",
  ignore: !HAS_MOSQUITTO || CAN_MOUNT !== true,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vllm-mqtt-full-" });
    const mount = run("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", dir]);
    assert(mount.ok, `mount: ${mount.text}`);
    const httpPort = freePort();
    try {
      await withService({
        args: [`--data-dir=${dir}`, `--http-port=${httpPort}`, "--rate-limit=0"],
      }, async ({ client, sim }) => {
        let asked = 0;
        const ask = async (tc: TestClient, sessionId: string, message: string) => {
          const requestId = `r${++asked}`;
          await tc.send("maze/user_input", {
            session_id: sessionId,
            request_id: requestId,
            message,
          });
          return await tc.final(sessionId, requestId, 30_000);
        };
        const readyz = async () => {
          const response = await fetch(`http://127.0.0.1:${httpPort}/readyz`);
          return { status: response.status, body: await response.json() };
        };
        equal((await readyz()).body.storage, true);
        // Two turns saved before the disk fills.
        match(String((await ask(client, "keep", "one")).json?.response), /Turn 1/);
        match(String((await ask(client, "keep", "two")).json?.response), /Turn 2/);

        const filler = await fillDisk(dir);
        // Turns go on until the store cannot take one: it is answered storage_unavailable,
        // never `internal`. (SQLite may still have room in its write-ahead log for a few.)
        let answered = 0;
        let refused: Received | undefined;
        for (let i = 0; i < 50 && !refused; i++) {
          const reply = await ask(client, "keep", `while full ${i} ${"x".repeat(2000)}`);
          if (reply.json?.type === "done") answered++;
          else if (errorCode(reply) === "storage_unavailable") refused = reply;
          else assert.fail(`unexpected reply on a full disk: ${reply.text}`);
        }
        assert(refused, "no turn was refused on a full disk");
        console.log(`  disk full: ${answered} turn(s) still saved, then: ${refused.text}`);
        const error = refused.json!.error as { message: string; retry_after_ms?: number };
        match(error.message, /disk is full/);
        assert(typeof error.retry_after_ms === "number" && error.retry_after_ms > 0);

        // Known unavailable now: /readyz says why, and a turn is refused before the engine.
        const notReady = await readyz();
        equal(notReady.status, 503);
        equal(notReady.body.storage, false);
        equal(notReady.body.engine, true);
        match(String(notReady.body.reason), /session store.*disk is full/);
        const calls = sim.received.length;
        equal(errorCode(await ask(client, "keep", "refused")), "storage_unavailable");
        equal(errorCode(await ask(client, "other", "refused too")), "storage_unavailable");
        equal(sim.received.length, calls, "the engine was called for a turn that cannot be saved");

        // Room again: the probe finds it and turns are answered, with the history intact
        // (the turns saved before, none of those refused or failed).
        await Deno.remove(filler);
        const freed = performance.now();
        await waitFor(async () => (await readyz()).status === 200, 60_000, "/readyz 200 again");
        console.log(`  room again: ready after ${Math.round(performance.now() - freed)} ms`);
        const after = await ask(client, "keep", "back");
        equal(after.json?.type, "done", after.text);
        match(String(after.json?.response), new RegExp(`Turn ${3 + answered}: you said "back"`));
        equal((await readyz()).body.storage, true);
      });
    } finally {
      if (!run("umount", [dir]).ok) run("umount", ["-l", dir]);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name:
    "disk full at start-up: the service stops with the reason (no stack trace); started again with room, it has its sessions",
  ignore: !HAS_MOSQUITTO || CAN_MOUNT !== true,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vllm-mqtt-full-" });
    const mount = run("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", dir]);
    assert(mount.ok, `mount: ${mount.text}`);
    const broker = await startMosquitto();
    const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
    const args = [
      "--engine=url",
      `--engine-url=${sim.url}`,
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dir}`,
      "--projects=maze",
      "--workers=1",
      `--mqtt-client-id=svc-${crypto.randomUUID()}`,
    ];
    let client: TestClient | undefined;
    let service: ServiceProcess | undefined;
    try {
      client = await TestClient.connect(broker.url);
      await client.subscribe("maze/assistant_response/#");
      const ask = async (requestId: string, message: string) => {
        await client!.send("maze/user_input", { session_id: "s", request_id: requestId, message });
        return await client!.final("s", requestId, 30_000);
      };
      service = await startService(args);
      match(String((await ask("1", "one")).json?.response), /Turn 1/);
      equal(await service.stop(), 0);

      const filler = await fillDisk(dir);
      service = await startService(args, { expectExit: true });
      equal(await service.stop(), 1);
      const log = service.log();
      match(log, /Start-up failed: the session store .* cannot be opened \(the disk is full\)/);
      assert(!/^\s+at /m.test(log), `a stack trace in the log:\n${log}`);
      console.log(`  ${log.split("\n").find((line) => line.includes("Start-up failed"))}`);

      // What the failed start left behind does not keep the store from opening with room.
      await Deno.remove(filler);
      service = await startService(args);
      match(String((await ask("2", "two")).json?.response), /Turn 2: you said "two"/);
    } finally {
      await client?.close();
      await service?.stop();
      await sim.close();
      await broker.stop();
      await Deno.remove(broker.dir, { recursive: true }).catch(() => {});
      if (!run("umount", [dir]).ok) run("umount", ["-l", dir]);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
