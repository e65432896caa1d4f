/**
 * The quick start as a person runs it: `deno task start` in a terminal (a
 * pseudo-terminal made by util-linux's `script`, as in any Debian), stopped
 * with one Ctrl-C; and under `deno task` stopped by a signal to its process
 * group and by `timeout`. In each, an answer is being generated when the
 * signal comes: one signal lets it finish and the program exits 0.
 *
 * @module
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { collectOutput, freePort, removeTempDir, ROOT, TestClient, waitFor } from "./_helpers.ts";

/** Whether util-linux's `script` is installed (Debian's essential `bsdutils` has it). */
const HAS_SCRIPT = (() => {
  try {
    return new Deno.Command("script", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
})();

/** A child whose output is collected. */
interface Running {
  readonly child: Deno.ChildProcess;
  readonly output: () => string;
  /** Its exit status, once all it wrote has been read. */
  readonly exited: () => Promise<Deno.CommandStatus>;
  /** Its stdin, held open for as long as it runs (`script` ends at the end of its input). */
  readonly stdin: WritableStreamDefaultWriter<Uint8Array>;
}

function spawn(program: string, args: string[]): Running {
  const child = new Deno.Command(program, {
    args,
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const { output, pumped } = collectOutput(child);
  return {
    child,
    output,
    // The exit comes before the last of the output has been read.
    exited: async () => {
      const status = await child.status;
      await pumped;
      return status;
    },
    stdin: child.stdin.getWriter(),
  };
}

/** The quick start's command, on ports of its own and a data folder of its own under `data/`. */
function quickStart(httpPort: number, brokerPort: number, dataDir: string): string[] {
  return [
    Deno.execPath(),
    "task",
    "start",
    "--engine",
    "sim",
    "--projects",
    "maze,general",
    "--embedded-broker-port",
    String(brokerPort),
    "--http-port",
    String(httpPort),
    // Under `data/`, which the task's permissions grant.
    "--data-dir",
    dataDir,
    // Slow enough that an answer is still being generated when the signal comes.
    "--sim-itl",
    "150ms",
  ];
}

async function ready(httpPort: number): Promise<boolean> {
  try {
    const response = await fetch(`http://127.0.0.1:${httpPort}/readyz`);
    await response.body?.cancel();
    return response.status === 200;
  } catch {
    return false;
  }
}

/**
 * Starts the quick start with `launch` (which wraps its command), waits for
 * `/readyz` with no input given, starts an answer, calls `stop`, and checks
 * that the answer finished and the program exited 0 after one stop.
 */
async function startAndStop(
  launch: (command: string[]) => Running,
  stop: (running: Running) => void | Promise<void>,
): Promise<void> {
  const httpPort = freePort();
  const brokerPort = freePort();
  const dataDir = `data/terminal-test-${crypto.randomUUID()}`;
  const running = launch(quickStart(httpPort, brokerPort, dataDir));
  let client: TestClient | undefined;
  try {
    await waitFor(
      () => ready(httpPort),
      30_000,
      () => `/readyz, with no input given; its terminal shows:\n${running.output()}`,
    );
    // The broker it chose, as /status and the live page name it.
    const described = await (await fetch(`http://127.0.0.1:${httpPort}/status`)).json();
    deepEqual(described.broker, {
      url: `mqtt://127.0.0.1:${brokerPort}`,
      embedded: true,
      connected: true,
    });
    client = await TestClient.connect(`mqtt://127.0.0.1:${brokerPort}`);
    await client.subscribe("maze/assistant_response/#");
    await client.send("maze/user_input", { session_id: "t1", message: "hi", request_id: "r1" });
    await client.next((m) => m.json?.type === "delta");
    await stop(running);
    const done = await client.final("t1", "r1", 20_000);
    equal(done.json?.type, "done", done.text);
    const status = await running.exited();
    const output = running.output();
    equal(status.code, 0, output);
    match(output, /Stopped/);
    assert(!/stopping now/.test(output), output);
  } catch (error) {
    throw new Error(`${(error as Error).message}\n--- its output ---\n${running.output()}`);
  } finally {
    await client?.close();
    try {
      running.child.kill("SIGKILL");
    } catch { /* gone */ }
    await running.exited();
    await running.stdin.close().catch(() => {});
    await removeTempDir(`${ROOT}${dataDir}`);
  }
}

Deno.test({
  name:
    "in a terminal: the quick start serves with no input, and one Ctrl-C drains and exits 0 (10 of 10)",
  ignore: !HAS_SCRIPT,
  async fn() {
    for (let i = 0; i < 10; i++) {
      await startAndStop(
        // `script -e` runs the command in a new pseudo-terminal and exits with its code. It runs
        // it with `$SHELL -c`: `exec` makes `deno task` the terminal's foreground process, as an
        // interactive shell's job is. Without it, a shell that stays as the command's parent
        // (dash, when SHELL is unset or /bin/sh) is in the foreground group too, gets the
        // Ctrl-C itself and exits 130 whatever the program did.
        (command) => spawn("script", ["-qfec", `exec ${command.join(" ")}`, "/dev/null"]),
        // Ctrl-C typed at the terminal: the terminal signals the whole foreground group.
        async (running) => await running.stdin.write(new Uint8Array([0x03])),
      );
    }
  },
});

Deno.test("under deno task: SIGINT to its process group drains and exits 0 (3 of 3)", async () => {
  for (let i = 0; i < 3; i++) {
    await startAndStop(
      // `setsid` makes `deno task` lead a process group of its own (the test's is left alone).
      (command) => spawn("setsid", command),
      (running) => Deno.kill(-running.child.pid, "SIGINT"),
    );
  }
});

Deno.test("under deno task: timeout's SIGTERM drains and exits 0 (3 of 3)", async () => {
  for (let i = 0; i < 3; i++) {
    await startAndStop(
      (command) => spawn("timeout", ["600", ...command]),
      // What `timeout` does when it is stopped, or its time is up: SIGTERM to its child, then
      // to its process group.
      (running) => running.child.kill("SIGTERM"),
    );
  }
});
