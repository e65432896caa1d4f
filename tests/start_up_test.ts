/**
 * What a new user meets when the start goes wrong: one line that says what
 * to do and an exit code, never a stack trace or a question of Deno's; and
 * what a client that sends what cannot be served leaves in the log.
 *
 * @module
 */

import assert, { equal, match } from "node:assert/strict";
import {
  freePort,
  mosquittoTest,
  removeTempDir,
  ROOT,
  spawnDeno,
  spawnService,
  startService,
  tempDir,
  waitFor,
  withService,
} from "./_helpers.ts";

/** No stack trace, no uncaught error, no permission prompt or `NotCapable`. */
function assertNoNoise(output: string): void {
  assert(!/Uncaught|NotCapable|^\s+at /m.test(output), output);
  assert(!/Deno requests/.test(output), output);
}

/** The lines the program logged at error level. */
function errors(output: string): string[] {
  return output.split("\n").filter((line) => line.includes("[ERR]"));
}

const SIM = ["--engine=sim", "--projects=maze"];

Deno.test("start-up: a data folder that is a file stops with one line and exit 1", async () => {
  const dir = await tempDir("vllm-mqtt-data-file-");
  const file = `${dir}/data`;
  await Deno.writeTextFile(file, "not a folder");
  try {
    // With the HTTP endpoint on, as by default: its closing once let the error go uncaught.
    const service = await startService(
      [...SIM, `--data-dir=${file}`, `--http-port=${freePort()}`],
      { expectExit: true },
    );
    equal(await service.stop(), 1, service.log());
    assertNoNoise(service.log());
    const [line, ...more] = errors(service.log());
    equal(more.length, 0, service.log());
    match(line, /the data folder .*\/data \(--data-dir\) is a file, not a folder: move the file/);
  } finally {
    await removeTempDir(dir);
  }
});

/** A read-only folder: a read-only tmpfs for root (who may write anywhere else), else mode 555. */
async function readOnlyDir(): Promise<{ dir: string; release: () => Promise<void> } | string> {
  const dir = await tempDir("vllm-mqtt-data-ro-");
  if (Deno.uid() !== 0) {
    await Deno.chmod(dir, 0o555);
    return { dir, release: () => removeTempDir(dir) };
  }
  const mount = await new Deno.Command("mount", {
    args: ["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", dir],
    stderr: "piped",
  }).output().catch((error) => ({ success: false, stderr: new TextEncoder().encode(error) }));
  if (!mount.success) {
    await removeTempDir(dir);
    return `cannot mount a read-only tmpfs: ${new TextDecoder().decode(mount.stderr)}`;
  }
  return {
    dir,
    release: async () => {
      await new Deno.Command("umount", { args: ["-l", dir] }).output();
      await removeTempDir(dir);
    },
  };
}

Deno.test("start-up: a read-only data folder stops with one line and exit 1", async (t) => {
  const readOnly = await readOnlyDir();
  if (typeof readOnly === "string") {
    console.warn(`ignored: ${readOnly}`);
    return;
  }
  try {
    for (const dataDir of [readOnly.dir, `${readOnly.dir}/sub`]) {
      await t.step(dataDir === readOnly.dir ? "the folder" : "a folder to make in it", async () => {
        const service = await startService(
          [...SIM, `--data-dir=${dataDir}`, `--http-port=${freePort()}`],
          { expectExit: true },
        );
        equal(await service.stop(), 1, service.log());
        assertNoNoise(service.log());
        const [line, ...more] = errors(service.log());
        equal(more.length, 0, service.log());
        match(line, /the data folder .* \(--data-dir\) cannot be (written|made) \(.+\): make/);
      });
    }
  } finally {
    await readOnly.release();
  }
});

Deno.test("start-up: a broker that cannot be reached is named, and Ctrl-C then stops (exit 0)", async () => {
  const dataDir = await tempDir("vllm-mqtt-data-");
  const port = freePort();
  const url = `mqtt://127.0.0.1:${port}`;
  const service = spawnService([...SIM, `--data-dir=${dataDir}`, `--mqtt-url=${url}`]);
  try {
    await waitFor(() => /Cannot reach the broker/.test(service.log()), 20_000, "the broker line");
    match(service.log(), new RegExp(`Cannot reach the broker at ${url}/?: .*ECONNREFUSED`));
    assert(!/Lost the connection/.test(service.log()), service.log());
    equal(await service.stop("SIGINT"), 0, service.log());
    match(service.log(), /SIGINT during start-up: stopping what was started/);
    match(service.log(), /Stopped before serving/);
    assertNoNoise(service.log());
  } finally {
    await service.stop("SIGKILL");
    await removeTempDir(dataDir);
  }
});

Deno.test("start-up: a program that is no MQTT broker on the embedded broker's port is named", async () => {
  // Accepts connections and says nothing, as an HTTP server does to an MQTT client.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const connections: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const connection of listener) connections.push(connection);
  })();
  const dataDir = await tempDir("vllm-mqtt-data-");
  const service = spawnService([...SIM, `--data-dir=${dataDir}`, `--embedded-broker-port=${port}`]);
  try {
    // mqtt.js gives up on a connection after 10 s without a CONNACK.
    await waitFor(() => /Cannot reach the broker/.test(service.log()), 30_000, "the broker line");
    match(
      service.log(),
      new RegExp(`Something listens on localhost:${port}: using it as the broker`),
    );
    match(service.log(), /did not answer as an MQTT broker within 10 s \(connack timeout\)/);
    assert(!/Lost the connection/.test(service.log()), service.log());
    equal(await service.stop("SIGTERM"), 0, service.log());
  } finally {
    await service.stop("SIGKILL");
    listener.close();
    await accepting.catch(() => {});
    for (const connection of connections) {
      try {
        connection.close();
      } catch { /* closed */ }
    }
    await removeTempDir(dataDir);
  }
});

Deno.test("start-up: 'deno run main.ts' without permissions says how to run it", async () => {
  const run = spawnDeno(["run", "--no-prompt", `${ROOT}main.ts`, "--engine=sim"]);
  await run.child.status;
  equal(await run.stop(), 2, run.log());
  assertNoNoise(run.log());
  match(run.log(), /run it with 'deno task start \[options\]' in its folder/);
});

Deno.test("start-up: run from another folder, it says so rather than naming permissions", async () => {
  const elsewhere = await tempDir("vllm-mqtt-elsewhere-");
  try {
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-q", "--no-prompt", "-P=service", `${ROOT}main.ts`, "--engine=sim"],
      cwd: elsewhere,
      stderr: "piped",
      stdout: "piped",
    }).output();
    const text = new TextDecoder().decode(output.stderr);
    equal(output.code, 2, text);
    match(text, new RegExp(`run it in its own folder \\(cd ${ROOT.replace(/\/$/, "")}\\)`));
    match(text, /prompts and \.\/data are looked for in the working folder/);
    assert(!/--allow-/.test(text), text);
  } finally {
    await removeTempDir(elsewhere);
  }
});

Deno.test("start-up: a project name a letter from a prompt file's is refused as a typo", async () => {
  const dataDir = await tempDir("vllm-mqtt-data-");
  try {
    const service = await startService(
      ["--engine=sim", "--projects=mazee,general", `--data-dir=${dataDir}`],
      { expectExit: true },
    );
    equal(await service.stop(), 2, service.log());
    assertNoNoise(service.log());
    match(
      service.log(),
      /project 'mazee' has no prompt file \(prompts\/mazee\.md\): did you mean 'maze'\?/,
    );
  } finally {
    await removeTempDir(dataDir);
  }
});

mosquittoTest(
  "unknown projects and payloads that are not JSON are logged, a flood once",
  async () => {
    await withService({ args: ["--answer-unknown-projects"] }, async ({ client, service }) => {
      await client.subscribe("mazee/assistant_response/#");
      for (let i = 0; i < 5; i++) {
        await client.send("mazee/user_input", { session_id: `u${i}`, message: "hi" });
        await client.send("maze/user_input", "not json at all");
      }
      // Each request for the unknown project is answered, and each is seen in order.
      await client.next((m) => m.json?.session_id === "u4" && m.json.type === "error");
      await waitFor(() => /not valid JSON/.test(service.log()), 10_000, "the JSON line");
      const log = service.log();
      const unknown = log.split("\n").filter((line) => /for project mazee/.test(line));
      equal(unknown.length, 1, log);
      match(
        unknown[0],
        /\[WRN\].*Request on mazee\/user_input for project mazee, which is not served here \(answered unknown_project; served: \["maze","general"\]\)/,
      );
      equal(log.split("\n").filter((line) => /not valid JSON/.test(line)).length, 1, log);
    });
  },
);
