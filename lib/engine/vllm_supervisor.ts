/**
 * Managed mode: runs `vllm serve` as a child in its own process group, waits
 * for `/health`, restarts it with backoff when it dies, gives up after too many
 * crashes, and on shutdown signals the whole group (vLLM's EngineCore and GPU
 * workers are separate processes that hold GPU memory if left behind).
 *
 * @module
 */

import { abortableSleep, backoffDelay } from "../_util.ts";
import type { Config } from "../config/config.ts";
import { logger } from "../log.ts";
import type { EngineEndpoint } from "./engine_client.ts";
import { probe } from "./engine_health.ts";
import { opensThinking, reasoningParserFor, toolParserFor } from "./model_family.ts";
import type { EngineNeeds, RunningEngine } from "./running_engine.ts";

/** Raised when vLLM cannot be started at all. */
export class EngineStartError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "EngineStartError";
  }
}

const log = logger("vllm");
const childLog = logger("vllm-child");

/** Milliseconds within which crashes count towards `--vllm-max-restarts`. */
const CRASH_WINDOW_MS = 10 * 60_000;

/**
 * The `vllm serve` arguments for a configuration (exported for the tests of
 * the command line). The API key is not among them: vLLM logs its non-default
 * arguments and `ps` shows them; it goes in the environment (`vllmEnv`).
 *
 * @throws {EngineStartError} when a project needs tool calls and no
 * tool-call parser is known for the model.
 */
export function vllmArgs(config: Config, port: number, needs: EngineNeeds = {}): string[] {
  const args = [
    "serve",
    config.model,
    "--served-model-name",
    config.servedModelName,
    "--host",
    "127.0.0.1",
    "--port",
    String(port),
    "--tensor-parallel-size",
    String(config.tensorParallelSize),
    "--pipeline-parallel-size",
    String(config.pipelineParallelSize),
    "--max-model-len",
    String(config.maxModelLen),
    "--gpu-memory-utilization",
    String(config.gpuMemoryUtilization),
    "--max-num-seqs",
    String(config.maxInFlight),
    "--dtype",
    config.dtype,
  ];
  if (config.quantization) args.push("--quantization", config.quantization);
  if (config.trustRemoteCode) args.push("--trust-remote-code");
  if (config.enforceEager) args.push("--enforce-eager");
  if (config.modelCacheDir) args.push("--download-dir", config.modelCacheDir);
  if (config.modelRevision) args.push("--revision", config.modelRevision);
  // One argument, no shell: vLLM takes the limit as JSON (the older `image=4` form is gone).
  const mmLimits = {
    ...(config.visionModel && { image: config.maxImages }),
    ...(config.audioModel && { audio: config.maxAudioClips }),
  };
  if (Object.keys(mmLimits).length > 0) {
    args.push("--limit-mm-per-prompt", JSON.stringify(mmLimits));
  }
  // Projects' own fine-tunes on the one base model: each is asked for by its name. vLLM
  // stops at start on an adapter of a rank above --max-lora-rank (its default 16).
  if (config.loraModules.length > 0) {
    args.push(
      "--enable-lora",
      "--max-lora-rank",
      String(config.maxLoraRank),
      "--max-loras",
      String(config.maxLoras),
      "--lora-modules",
      ...config.loraModules.map(({ name, path }) => `${name}=${path}`),
    );
  }
  // Without these vLLM refuses every request with tools ("auto" tool choice requires ...).
  if (needs.tools) {
    const parser = toolParserFor(config.model, config.toolCallParser);
    if (parser === undefined) throw noToolParser(config);
    args.push("--enable-auto-tool-choice", "--tool-call-parser", parser);
  }
  const reasoning = reasoningParserFor(config.model, config.reasoningParser);
  if (reasoning !== undefined) args.push("--reasoning-parser", reasoning);
  args.push(...config.vllmArgs);
  return args;
}

/** Why a project's tools cannot be served by vLLM for `config.model`. */
function noToolParser(config: Config): EngineStartError {
  return new EngineStartError(
    config.toolCallParser === "none"
      ? "a project declares tools, but --tool-call-parser is none: vLLM refuses every request " +
        "with tools without one"
      : `a project declares tools, and no tool-call parser is known for ${config.model}: give ` +
        "--tool-call-parser (hermes, llama3_json, mistral, ...: the one vLLM documents for " +
        "the model)",
  );
}

/**
 * The child's environment: ours without the service's own settings
 * (`VLLM_MQTT_*`: the broker password, the page token, the session secret,
 * which model code run with --trust-remote-code could read, and which vLLM
 * warns about as unknown `VLLM_*` variables), plus the API key
 * (`VLLM_API_KEY`, read by `vllm serve` as `--api-key`), the GPU and
 * model-source settings.
 */
export function vllmEnv(
  config: Config,
  base: Record<string, string>,
  apiKey: string,
): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(base)) {
    if (!name.startsWith("VLLM_MQTT_")) env[name] = value;
  }
  env.VLLM_API_KEY = apiKey;
  if (config.visibleDevices !== undefined) env.CUDA_VISIBLE_DEVICES = config.visibleDevices;
  if (config.modelProvider === "modelscope") env.VLLM_USE_MODELSCOPE = "True";
  // Only what is cached: the original's `--auto_download False`.
  if (!config.autoDownload) env.HF_HUB_OFFLINE = "1";
  return env;
}

/**
 * Refuses an adapter whose rank (`r` of its `adapter_config.json`, for a
 * local folder) is above `--max-lora-rank`: vLLM would stop at start, after
 * minutes of loading the model, with a message that names neither option.
 */
export async function checkLoraRanks(config: Config): Promise<void> {
  for (const { name, path } of config.loraModules) {
    let rank: unknown;
    try {
      rank = JSON.parse(await Deno.readTextFile(`${path}/adapter_config.json`)).r;
    } catch {
      continue; // A hub id, or a folder vLLM will judge itself.
    }
    if (typeof rank === "number" && rank > config.maxLoraRank) {
      throw new EngineStartError(
        `LoRA adapter ${name} (${path}) has rank ${rank}, above --max-lora-rank ` +
          `${config.maxLoraRank}: vLLM would stop at start; give --max-lora-rank ` +
          `${[8, 16, 32, 64, 128, 256, 320, 512].find((allowed) => allowed >= rank) ?? rank}`,
      );
    }
  }
}

/** Starts vLLM and supervises it until `close()`; `signal` stops a start that is under way. */
export async function startVllm(
  config: Config,
  needs: EngineNeeds = {},
  signal?: AbortSignal,
): Promise<RunningEngine> {
  // The command line and the adapters are checked before anything starts.
  vllmArgs(config, 0, needs);
  await checkLoraRanks(config);
  const supervisor = new VllmSupervisor(config, await freePort(), needs);
  const onAbort = () => supervisor.close();
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    await supervisor.start();
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
  return supervisor;
}

class VllmSupervisor implements RunningEngine {
  readonly #config: Config;
  readonly #port: number;
  readonly #needs: EngineNeeds;
  readonly #crashes: number[] = [];
  readonly #stopping = new AbortController();
  /** One key for the program's life: a restarted vLLM is reached exactly as before. */
  readonly #apiKey = crypto.randomUUID();
  readonly restarts: Record<string, number> = {};
  #child: Deno.ChildProcess | undefined;
  #endpoint!: EngineEndpoint;
  readonly #failed = Promise.withResolvers<Error>();
  readonly failed: Promise<Error> = this.#failed.promise;

  constructor(config: Config, port: number, needs: EngineNeeds) {
    this.#config = config;
    this.#port = port;
    this.#needs = needs;
  }

  get endpoint(): EngineEndpoint {
    return this.#endpoint;
  }

  get thinkingOpened(): boolean {
    const config = this.#config;
    return reasoningParserFor(config.model, config.reasoningParser) === undefined &&
      opensThinking(config.model);
  }

  get probeUrl(): string {
    return `http://127.0.0.1:${this.#port}/health`;
  }

  get metricsUrl(): string {
    return `http://127.0.0.1:${this.#port}/metrics`;
  }

  get serves(): readonly string[] {
    return [this.#config.servedModelName, ...this.#config.loraModules.map(({ name }) => name)];
  }

  /** Spawns vLLM and waits until it is healthy. */
  async start(): Promise<void> {
    const apiKey = this.#apiKey;
    const child = this.#spawn(apiKey);
    this.#child = child;
    const baseUrl = `http://127.0.0.1:${this.#port}`;
    const exited = child.status.then((status) => status);
    const deadline = Date.now() + this.#config.vllmStartupTimeoutMs;
    log.info("Started vllm (pid {pid}) on port {port}; waiting for /health", {
      pid: child.pid,
      port: this.#port,
    });
    while (true) {
      const outcome = await Promise.race([
        exited.then((status) => ({ status })),
        abortableSleep(500, this.#stopping.signal).then(() => undefined, () => undefined),
      ]);
      if (outcome) {
        throw new EngineStartError(
          `vllm exited during start-up with code ${outcome.status.code}${
            outcome.status.signal ? ` (${outcome.status.signal})` : ""
          }; see the vllm lines above`,
        );
      }
      if (this.#stopping.signal.aborted) throw new EngineStartError("stopped during start-up");
      if (await probe(`${baseUrl}/health`, { signal: AbortSignal.timeout(2000) })) break;
      if (Date.now() > deadline) {
        await this.#stopChild(child);
        throw new EngineStartError(
          `vllm did not become healthy within ${this.#config.vllmStartupTimeoutMs / 1000} s ` +
            "(raise --vllm-startup-timeout for large models)",
        );
      }
    }
    this.#endpoint = { baseUrl: `${baseUrl}/v1`, apiKey, model: this.#config.servedModelName };
    log.info("vllm is ready at {url}", { url: this.#endpoint.baseUrl });
    exited.then((status) => this.#onExit(status));
  }

  /** Stops vLLM: SIGTERM to its process group, then SIGKILL after a grace period. */
  async close(): Promise<void> {
    this.#stopping.abort();
    if (this.#child) await this.#stopChild(this.#child);
  }

  /** Kills the whole group at once, for a program that is dying. */
  killNow(): void {
    if (this.#child) signalGroup(this.#child.pid, "SIGKILL");
  }

  async #onExit(status: Deno.CommandStatus): Promise<void> {
    if (this.#stopping.signal.aborted) return;
    // The API server is gone; make sure its engine processes are too.
    signalGroup(this.#child!.pid, "SIGKILL");
    let cause = status.signal ? `signal_${status.signal}` : `exit_${status.code}`;
    // A restart that fails to come up is one more crash, not the end.
    while (true) {
      const now = Date.now();
      this.#crashes.push(now);
      while (this.#crashes[0] < now - CRASH_WINDOW_MS) this.#crashes.shift();
      log.error("vllm stopped unexpectedly ({cause}); crash {n} in 10 min", {
        cause,
        n: this.#crashes.length,
      });
      if (this.#crashes.length > this.#config.vllmMaxRestarts) {
        this.#failed.resolve(
          new Error(`vllm crashed ${this.#crashes.length} times within 10 minutes; giving up`),
        );
        return;
      }
      this.restarts[cause] = (this.restarts[cause] ?? 0) + 1;
      // One child to restart, no crowd of clients to spread out: no jitter, exactly 1 s, 2 s,
      // 4 s, ... up to a minute.
      const delay = backoffDelay(this.#crashes.length - 1, {
        firstMs: 1000,
        maxMs: 60_000,
        jitter: "none",
      });
      try {
        await abortableSleep(delay, this.#stopping.signal);
        await this.start();
        return;
      } catch (error) {
        if (this.#stopping.signal.aborted) return;
        cause = "restart_failed";
        log.error("vllm restart failed: {message}", { message: (error as Error).message });
      }
    }
  }

  #spawn(apiKey: string): Deno.ChildProcess {
    const args = vllmArgs(this.#config, this.#port, this.#needs);
    const env = vllmEnv(this.#config, Deno.env.toObject(), apiKey);
    const command = (environment: Record<string, string>) =>
      // By name, so that PATH is searched as a scoped `--allow-run=vllm` expects.
      new Deno.Command("vllm", {
        args,
        env: environment,
        clearEnv: true,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        // Its own process group, so that one signal reaches vLLM's engine and worker processes.
        detached: true,
      });
    let child: Deno.ChildProcess;
    try {
      child = command(env).spawn();
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) throw notOnPath();
      if (!(error instanceof Deno.errors.NotCapable)) throw error;
      // A scoped --allow-run refuses children whose environment sets LD_* variables.
      const dropped = Object.keys(env).filter((name) => name.startsWith("LD_"));
      log.warn(
        "Starting vllm without {dropped}: a scoped --allow-run refuses LD_* variables. " +
          "Grant --allow-run without a list if vLLM needs them.",
        { dropped },
      );
      for (const name of dropped) delete env[name];
      child = command(env).spawn();
    }
    forwardLines(child.stdout, "stdout");
    forwardLines(child.stderr, "stderr");
    return child;
  }

  async #stopChild(child: Deno.ChildProcess): Promise<void> {
    signalGroup(child.pid, "SIGTERM");
    const exited = await Promise.race([
      child.status.then(() => true),
      abortableSleep(this.#config.vllmStopGraceMs).then(() => false),
    ]);
    if (!exited) {
      log.warn("vllm did not stop within {s} s of SIGTERM; sending SIGKILL", {
        s: this.#config.vllmStopGraceMs / 1000,
      });
    }
    // Whatever is left of the group (engine cores, workers) goes now.
    signalGroup(child.pid, "SIGKILL");
    try {
      child.kill("SIGKILL"); // In case the group could not be signalled at all.
    } catch {
      // Already gone.
    }
    await child.status;
  }
}

function notOnPath(): EngineStartError {
  return new EngineStartError(
    "`vllm` is not on PATH. Install vLLM on a GPU machine (pip install vllm), or attach to a " +
      "running engine with --engine url --engine-url http://HOST:8000/v1, or try the program " +
      "without a GPU with --engine sim.",
  );
}

/**
 * Signals the whole process group led by `pid`. `Deno.kill` needs an
 * unscoped `--allow-run`; under `--allow-run=vllm,kill` the `kill` command
 * does it instead.
 */
function signalGroup(pid: number, signal: Deno.Signal): void {
  try {
    Deno.kill(-pid, signal);
    return;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotCapable)) return; // The group is already gone.
  }
  try {
    new Deno.Command("kill", {
      args: ["-s", signal.replace(/^SIG/, ""), "--", `-${pid}`],
      clearEnv: true,
      stdout: "null",
      stderr: "null",
    }).outputSync();
  } catch (error) {
    log.error("Cannot signal vllm's process group ({message}); grant --allow-run=vllm,kill", {
      message: (error as Error).message,
    });
  }
}

async function forwardLines(stream: ReadableStream<Uint8Array>, name: string): Promise<void> {
  let rest = "";
  const decoder = new TextDecoder();
  try {
    for await (const chunk of stream) {
      const lines = (rest + decoder.decode(chunk, { stream: true })).split("\n");
      rest = lines.pop()!;
      for (const line of lines) {
        if (line.trim() !== "") childLog.info("vllm {stream} | {line}", { stream: name, line });
      }
    }
  } catch {
    // The child is gone.
  }
  if (rest.trim() !== "") childLog.info("vllm {stream} | {line}", { stream: name, line: rest });
}

async function freePort(): Promise<number> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  await Promise.resolve();
  return port;
}
