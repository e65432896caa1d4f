/**
 * Brings up the engine the configuration names and returns how to reach it:
 * the simulator in a worker (`sim`), an existing endpoint (`url`), or a
 * supervised `vllm serve` (`vllm`).
 *
 * @module
 */

import type { Config } from "../config/config.ts";
import { logger } from "../log.ts";
import type { RunningEngine } from "./running_engine.ts";
import { startVllm } from "./vllm_supervisor.ts";

const log = logger("engine");

/**
 * Starts or attaches to the engine of `config.engine`; `signal` stops a vLLM
 * that is still loading (its start rejects, and vLLM is stopped).
 */
export function startEngine(config: Config, signal?: AbortSignal): Promise<RunningEngine> {
  switch (config.engine) {
    case "sim":
      return startSimulatorWorker(config);
    case "url":
      return attach(config);
    case "vllm":
      return startVllm(config, signal);
  }
}

async function startSimulatorWorker(config: Config): Promise<RunningEngine> {
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
    });
  });
  log.info("Simulated engine serving {model} at {url}", { model: config.servedModelName, url });
  return {
    endpoint: { baseUrl: url, apiKey: "sim", model: config.servedModelName },
    probeUrl: `${url}/models`,
    restarts: {},
    failed: new Promise(() => {}),
    close: () => {
      worker.terminate();
      return Promise.resolve();
    },
    killNow: () => worker.terminate(),
  };
}

/** Attaches to an OpenAI-compatible endpoint; picks its model when it serves just one. */
async function attach(config: Config): Promise<RunningEngine> {
  const baseUrl = config.engineUrl!;
  const apiKey = config.engineApiKey ?? "none";
  let model = config.servedModelName;
  try {
    const response = await fetch(`${baseUrl}/models`, {
      headers: { authorization: `Bearer ${apiKey}` },
      signal: AbortSignal.timeout(10_000),
    });
    if (!response.ok) throw new Error(`GET /models answered ${response.status}`);
    const served = ((await response.json()).data ?? []).map((m: { id: string }) =>
      m.id
    ) as string[];
    if (!served.includes(model) && served.length === 1) {
      log.info("Engine serves one model, {served}; using it", { served: served[0] });
      model = served[0];
    } else if (!served.includes(model)) {
      log.warn("Engine does not list model {model}; it serves {served}", { model, served });
    }
  } catch (error) {
    log.warn(
      "Engine at {url} not reachable yet ({message}); requests get engine_unavailable until it is",
      {
        url: baseUrl,
        message: (error as Error).message,
      },
    );
  }
  return {
    endpoint: { baseUrl, apiKey, model },
    probeUrl: `${baseUrl}/models`,
    restarts: {},
    failed: new Promise(() => {}),
    close: () => Promise.resolve(),
    killNow: () => {},
  };
}
