/**
 * What every way of running the engine (the simulator, an existing endpoint,
 * a supervised `vllm serve`) hands to the rest of the service.
 *
 * @module
 */

import type { EngineEndpoint } from "./engine_client.ts";

/** A running engine. */
export interface RunningEngine {
  readonly endpoint: EngineEndpoint;
  /** Polled by the health probe: vLLM's `/health`, else `{base}/models`. */
  readonly probeUrl: string;
  /**
   * vLLM's Prometheus metrics (queue, KV cache use, prefix cache hits), read
   * for routing; undefined when the engine has none known.
   * @default {undefined}
   */
  readonly metricsUrl?: string;
  /**
   * The models and adapters it lists (`/v1/models`); undefined when unknown
   * (an attached engine not reachable at start), then taken to serve all.
   * @default {undefined}
   */
  readonly serves?: readonly string[];
  /** Restarts of a managed engine, by cause (`exit_1`, `signal_SIGKILL`, ...). */
  readonly restarts: Readonly<Record<string, number>>;
  /** Resolves (with a reason) if the engine gives up for good. */
  readonly failed: Promise<Error>;
  close(): Promise<void>;
  /** Kills child processes at once, without waiting (the program is dying). */
  killNow(): void;
  /**
   * The model's answers start inside a thinking block that the engine leaves
   * in the content (a QwQ-like model with no reasoning parser): everything
   * up to `</think>` is reasoning.
   * @default {false}
   */
  readonly thinkingOpened?: boolean;
}

/** What the served projects need of the engine, known once their files are read. */
export interface EngineNeeds {
  /**
   * A project offers tools: vLLM must parse tool calls
   * (`--enable-auto-tool-choice --tool-call-parser`).
   * @default {false}
   */
  readonly tools?: boolean;
  /**
   * The models and adapters the projects ask for by name (their `model:`),
   * checked against what an attached engine serves.
   * @default {[]}
   */
  readonly models?: readonly string[];
}
