/**
 * A stand-in for `vllm serve`, for tests on machines without a GPU. It takes
 * vLLM's command line, records it, starts a child process (as vLLM starts its
 * EngineCore) and serves the simulated engine on the given port.
 *
 * Behaviour is set by environment variables:
 * - STAND_IN_RECORD: file to write `{"args": [...], "env": {...}, "pid": n, "childPid": n}` to
 *   (`{port}` in it is replaced by the port: one file per stand-in when several run);
 * - STAND_IN_HANG=1: never become healthy;
 * - STAND_IN_CRASH_AFTER=N: exit with code 3 after N chat completions;
 * - STAND_IN_EXIT_AFTER_MS=N: exit with code 4 N ms after becoming healthy (with
 *   STAND_IN_EXIT_GPUS=G, only the stand-in whose CUDA_VISIBLE_DEVICES is G);
 * - STAND_IN_IGNORE_SIGTERM=1: ignore SIGTERM (then only SIGKILL stops it);
 * - STAND_IN_TTFT_MS, STAND_IN_ITL_MS: the simulated engine's timing (5 ms and 1 ms).
 */

import { startSimulator } from "../../lib/engine/simulator.ts";

const args = Deno.args;
const flag = (name: string) => {
  const i = args.indexOf(name);
  return i === -1 ? undefined : args[i + 1];
};
const env = (name: string) => Deno.env.get(name);

if (args[0] !== "serve" || !args[1]) {
  console.error("usage: vllm serve MODEL [options]");
  Deno.exit(2);
}
// vLLM's engine core runs as another process of the same group.
const engineCore = new Deno.Command("sleep", { args: ["3600"], stdout: "null", stderr: "null" })
  .spawn();
const record = env("STAND_IN_RECORD")?.replace("{port}", flag("--port") ?? "");
if (record) {
  Deno.writeTextFileSync(
    record,
    JSON.stringify({ args, env: Deno.env.toObject(), pid: Deno.pid, childPid: engineCore.pid }),
  );
}
if (env("STAND_IN_IGNORE_SIGTERM")) {
  Deno.addSignalListener("SIGTERM", () => console.log("ignoring SIGTERM"));
}
console.log(`INFO stand-in vllm serving ${args[1]}`);
if (env("STAND_IN_HANG")) {
  await new Promise(() => {});
}
const sim = await startSimulator({
  port: Number(flag("--port")),
  model: flag("--served-model-name") ?? args[1],
  maxModelLen: Number(flag("--max-model-len") ?? 4096),
  // As `vllm serve` does: --api-key, else the VLLM_API_KEY variable.
  apiKey: flag("--api-key") ?? env("VLLM_API_KEY"),
  toolParser: args.includes("--enable-auto-tool-choice") ? flag("--tool-call-parser") : undefined,
  reasoningParser: flag("--reasoning-parser"),
  ttftMs: Number(env("STAND_IN_TTFT_MS") ?? 5),
  itlMs: Number(env("STAND_IN_ITL_MS") ?? 1),
});
console.log("INFO Application startup complete.");
const crashAfter = Number(env("STAND_IN_CRASH_AFTER") ?? 0);
if (crashAfter > 0) {
  const timer = setInterval(() => {
    if (sim.received.length >= crashAfter && sim.running === 0) {
      clearInterval(timer);
      // The last answer's closing chunks ([DONE]) are queued, not yet written: exiting at once
      // cut that answer about one run in ten (a cut stream is engine_unavailable, not an
      // answer). A few event-loop turns later they are on the wire, and the crash comes after
      // the answer, as the test means it to.
      setTimeout(() => {
        console.error("ERROR EngineCore died");
        Deno.exit(3);
      }, 300);
    }
  }, 20);
}
const exitAfter = Number(env("STAND_IN_EXIT_AFTER_MS") ?? 0);
// Several stand-ins share the environment: STAND_IN_EXIT_GPUS picks the one that exits by its GPUs.
const exits = env("STAND_IN_EXIT_GPUS") === undefined ||
  env("STAND_IN_EXIT_GPUS") === env("CUDA_VISIBLE_DEVICES");
if (exitAfter > 0 && exits) setTimeout(() => Deno.exit(4), exitAfter);
