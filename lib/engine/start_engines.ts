/**
 * Brings up the engines the configuration names and returns how to reach
 * each: simulators in workers (`sim`, `--sim-engines` of them), existing
 * endpoints (`url`, each URL of `--engine-url`), or supervised `vllm serve`
 * processes (`vllm`, one per GPU group of `--visible-devices`). Each is set up
 * for what the projects need (tool parsing, the reasoning parser of the
 * model's family), and attached engines are checked against it at start.
 *
 * @module
 */

import type { Config } from "../config/config.ts";
import { logger } from "../log.ts";
import { opensThinking, reasoningParserFor, toolParserFor } from "./model_family.ts";
import type { EngineNeeds, RunningEngine } from "./running_engine.ts";
import { EngineStartError, startVllm } from "./vllm_supervisor.ts";

const log = logger("engine");

/**
 * Starts or attaches to the engines of `config.engine`, for projects that
 * need `needs`, all at once; `signal` stops a vLLM that is still loading (its
 * start rejects, and vLLM is stopped). When one fails to start, those started
 * are closed and the start rejects.
 */
export async function startEngines(
  config: Config,
  needs: EngineNeeds = {},
  signal?: AbortSignal,
): Promise<RunningEngine[]> {
  const starts: Promise<RunningEngine>[] = [];
  switch (config.engine) {
    case "sim":
      for (let i = 0; i < config.simEngines; i++) starts.push(startSimulatorWorker(config, needs));
      break;
    case "url":
      for (const url of config.engineUrls) starts.push(attach(config, needs, url));
      break;
    case "vllm":
      // One vLLM per GPU group, each on its own GPUs with tensor parallelism over them.
      if (config.gpuGroups.length <= 1) starts.push(startVllm(config, needs, signal));
      for (const group of config.gpuGroups.length > 1 ? config.gpuGroups : []) {
        const gpus = group.split(",").length;
        starts.push(startVllm(
          {
            ...config,
            visibleDevices: group,
            tensorParallelSize: gpus / config.pipelineParallelSize,
          },
          needs,
          signal,
        ));
      }
      break;
  }
  const outcomes = await Promise.allSettled(starts);
  const failure = outcomes.find((outcome) => outcome.status === "rejected");
  const started = outcomes.flatMap((outcome) =>
    outcome.status === "fulfilled" ? [outcome.value] : []
  );
  if (failure !== undefined) {
    await Promise.all(started.map((engine) => engine.close()));
    throw failure.reason;
  }
  if (config.engine === "url") checkServedModels(started, needs);
  return started;
}

/**
 * Stops the start-up when a project's `model:` is served by none of the
 * attached engines (every turn of that project would be a 404); one that some
 * serve goes only to those.
 */
function checkServedModels(engines: readonly RunningEngine[], needs: EngineNeeds): void {
  const listed = engines.filter((engine) => engine.serves !== undefined);
  if (listed.length === 0) return;
  const served = [...new Set(listed.flatMap((engine) => engine.serves!))];
  const missing = (needs.models ?? []).filter((name) => !served.includes(name));
  if (missing.length === 0) return;
  const where = engines.length === 1
    ? `the engine at ${engines[0].endpoint.baseUrl} does not serve`
    : `none of the engines (${engines.map((e) => e.endpoint.baseUrl).join(", ")}) serves`;
  throw new EngineStartError(
    `a project file asks for ${missing.join(", ")}, which ${where} ` +
      `(it serves ${served.join(", ") || "nothing"}): every turn of that project ` +
      "would be refused with 404; serve it there (vLLM: --lora-modules) or change the file",
  );
}

/** Whether answers start inside a thinking block no parser takes out (see `model_family.ts`). */
function thinkingOpened(model: string, parser: string | undefined): boolean {
  return parser === undefined && opensThinking(model);
}

async function startSimulatorWorker(config: Config, needs: EngineNeeds): Promise<RunningEngine> {
  // Started as managed vLLM would be: tool parsing only when a project needs it.
  const toolParser = needs.tools ? toolParserFor(config.model, config.toolCallParser) : undefined;
  if (needs.tools && toolParser === undefined) {
    throw new EngineStartError(
      `a project declares tools, and no tool-call parser is known for ${config.model}: ` +
        "give --tool-call-parser (vLLM refuses every request with tools without one)",
    );
  }
  const reasoningParser = reasoningParserFor(config.model, config.reasoningParser);
  const worker = new Worker(new URL("./simulator_worker.ts", import.meta.url), { type: "module" });
  const url = await new Promise<string>((resolve, reject) => {
    worker.onmessage = (event: MessageEvent<{ url: string }>) => resolve(event.data.url);
    worker.onerror = (event) => {
      event.preventDefault();
      reject(new Error(`simulated engine failed to start: ${event.message}`));
    };
    worker.postMessage({
      model: config.servedModelName,
      maxModelLen: config.maxModelLen,
      ttftMs: config.simTtftMs,
      itlMs: config.simItlMs,
      adapters: config.loraModules.map(({ name }) => name),
      ...(Object.keys(config.simQuality).length > 0 && { quality: config.simQuality }),
      toolParser,
      reasoningParser,
    });
  });
  log.info("Simulated engine serving {model} at {url}", { model: config.servedModelName, url });
  return {
    endpoint: { baseUrl: url, apiKey: "sim", model: config.servedModelName },
    probeUrl: `${url}/models`,
    metricsUrl: metricsUrlOf(url),
    serves: [config.servedModelName, ...config.loraModules.map(({ name }) => name)],
    restarts: {},
    failed: new Promise(() => {}),
    close: () => {
      worker.terminate();
      return Promise.resolve();
    },
    killNow: () => worker.terminate(),
    thinkingOpened: thinkingOpened(config.model, reasoningParser),
  };
}

/**
 * Asks an attached engine whether it takes tools with `tool_choice: auto`
 * (a one-token completion): a vLLM started without `--enable-auto-tool-choice
 * --tool-call-parser` refuses it with 400 before generating anything, and
 * would refuse every turn of a project with tools the same way.
 */
async function checkToolParsing(baseUrl: string, apiKey: string, model: string): Promise<void> {
  let response: Response;
  try {
    response = await fetch(`${baseUrl}/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({
        model,
        messages: [{ role: "user", content: "ping" }],
        max_tokens: 1,
        tools: [{ type: "function", function: { name: "ping", parameters: { type: "object" } } }],
        tool_choice: "auto",
      }),
      signal: AbortSignal.timeout(30_000),
    });
  } catch (error) {
    log.warn("Could not ask the engine whether it takes tools ({message})", {
      message: (error as Error).message,
    });
    return;
  }
  const text = await response.text();
  if (response.status === 400 && /tool-call-parser|auto-tool-choice|tool choice/i.test(text)) {
    const message = (() => {
      try {
        return String(JSON.parse(text).error?.message ?? text);
      } catch {
        return text;
      }
    })();
    throw new EngineStartError(
      `a project file offers tools, and the engine at ${baseUrl} refuses them: ` +
        `${message.slice(0, 200)}; start it with --enable-auto-tool-choice --tool-call-parser ` +
        "(the parser for its model: see docs/engines.md), or drop the project's tools",
    );
  }
  if (!response.ok) {
    log.warn("The engine answered {status} when asked whether it takes tools", {
      status: response.status,
    });
  }
}

/** vLLM's Prometheus `/metrics`, beside the API's `/v1` (an endpoint not under /v1: none). */
function metricsUrlOf(baseUrl: string): string | undefined {
  return /\/v1$/.test(baseUrl) ? `${baseUrl.slice(0, -3)}/metrics` : undefined;
}

/** A model as `/v1/models` lists it (vLLM adds `root`, `parent` and `max_model_len`). */
interface ListedModel {
  readonly id: string;
  readonly root?: string;
  readonly parent?: string | null;
  readonly max_model_len?: number;
}

/**
 * Attaches to an OpenAI-compatible endpoint; picks its model when it serves
 * just one. What it lists is checked against the projects: a `model:` it does
 * not serve stops the start-up (every turn of that project would be a 404),
 * and so does an engine that refuses tools when a project offers them; a
 * context shorter than `--max-model-len` is warned about (turns that do not
 * fit are trimmed and tried again, at a cost).
 */
async function attach(
  config: Config,
  needs: EngineNeeds,
  baseUrl: string,
): Promise<RunningEngine> {
  const apiKey = config.engineApiKey ?? "none";
  let model = config.servedModelName;
  let listed: ListedModel[] | undefined;
  try {
    const response = await fetch(`${baseUrl}/models`, {
      headers: { authorization: `Bearer ${apiKey}` },
      signal: AbortSignal.timeout(10_000),
    });
    if (!response.ok) throw new Error(`GET /models answered ${response.status}`);
    listed = ((await response.json()).data ?? []).filter((m: unknown) =>
      typeof (m as ListedModel)?.id === "string"
    ) as ListedModel[];
  } catch (error) {
    log.warn(
      "Engine at {url} not reachable yet ({message}); requests get engine_unavailable until it is",
      { url: baseUrl, message: (error as Error).message },
    );
  }
  let family = config.model;
  if (listed !== undefined) {
    const served = listed.map((m) => m.id);
    // vLLM lists its LoRA adapters beside the model, each with the model as `parent`.
    const bases = listed.filter((m) => m.parent === undefined || m.parent === null);
    if (!served.includes(model) && bases.length === 1) {
      log.info("Engine serves one model, {served}; using it", { served: bases[0].id });
      model = bases[0].id;
    } else if (!served.includes(model)) {
      log.warn("Engine does not list model {model}; it serves {served}", { model, served });
    }
    const chosen = listed.find((m) => m.id === model);
    family = chosen?.root ?? chosen?.id ?? family;
    const context = chosen?.max_model_len;
    if (typeof context === "number" && context < config.maxModelLen) {
      log.warn(
        "The engine's context is {context} tokens, less than --max-model-len {configured}: " +
          "histories are budgeted for more than fits, and long turns are trimmed only after the " +
          "engine refuses them; give --max-model-len {context}",
        { context, configured: config.maxModelLen },
      );
    }
  }
  if (needs.tools && listed !== undefined) await checkToolParsing(baseUrl, apiKey, model);
  // Whether the engine runs a reasoning parser cannot be read from it: `--reasoning-parser`
  // says so; without it, a model whose template opens the thinking block is filtered here.
  const parser = ["auto", "none"].includes(config.reasoningParser)
    ? undefined
    : config.reasoningParser;
  return {
    endpoint: { baseUrl, apiKey, model },
    probeUrl: `${baseUrl}/models`,
    metricsUrl: metricsUrlOf(baseUrl),
    ...(listed !== undefined && { serves: listed.map((m) => m.id) }),
    restarts: {},
    failed: new Promise(() => {}),
    close: () => Promise.resolve(),
    killNow: () => {},
    thinkingOpened: thinkingOpened(family, parser),
  };
}
