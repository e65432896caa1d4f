/**
 * The messages between the gateway thread and the request workers. Both sides
 * import these types, so a change to one side that the other does not follow
 * fails `deno check`.
 *
 * @module
 */

import type { WireError } from "../protocol/errors.ts";
import type { SamplingParams, Usage } from "../protocol/mod.ts";
import type { EngineEndpoint } from "../engine/engine_client.ts";
import type { AudioInput } from "../protocol/audio.ts";
import type { ImageInput } from "../protocol/images.ts";
import type { LogOptions } from "../log.ts";
import type { ProjectTool, ResponseFormat, ToolChoice } from "../projects/project_file.ts";

/** What a worker needs to know, sent once before any job. */
export interface WorkerSettings {
  /** The first engine (the only one, unless several are configured). */
  readonly endpoint: EngineEndpoint;
  /**
   * Every engine, in the fleet's order (`WorkerTurn.engine` indexes it);
   * without it, `endpoint` alone.
   * @default {[endpoint]}
   */
  readonly endpoints?: readonly EngineEndpoint[];
  readonly kvPath: string;
  /** The process's session write counters, when it is the sessions' only writer. */
  readonly writeGenerations: SharedArrayBuffer | undefined;
  readonly sessionTtlMs: number;
  readonly maxHistoryTokens: number;
  readonly trimLowWater: number;
  readonly maxModelLen: number;
  /** `--max-tokens`: the answer length a session's history is budgeted for. */
  readonly maxTokens?: number;
  readonly requestTimeoutMs: number;
  readonly engineRetries: number;
  readonly skipThinking: boolean;
  /** Answers start inside a thinking block the engine leaves in them (see `RunningEngine`). */
  readonly thinkingOpened?: boolean;
  /** How the worker logs (a dropped damaged session is a warning); default info, text. */
  readonly log?: LogOptions;
}

/** One turn of one session, as the gateway hands it to a worker. */
export interface WorkerTurn {
  readonly id: number;
  readonly project: string;
  readonly sessionId: string;
  readonly message: string | undefined;
  /** Images shown with the message: sent to the engine, kept in history only as a marker. */
  readonly images?: readonly ImageInput[];
  /** Audio clips spoken with the message: sent to the engine, kept in history only as a marker. */
  readonly audio?: readonly AudioInput[];
  readonly reset: boolean;
  /** The project's system prompt (or the request's own); a per-session one in KV wins. */
  readonly systemPrompt: string;
  /** Estimated tokens of `systemPrompt`, when the gateway has counted it (the project's). */
  readonly systemTokens: number | undefined;
  /** Whether the request asked for its own system prompt, which then beats the session's. */
  readonly systemPromptFromRequest: boolean;
  readonly params: SamplingParams;
  readonly stream: boolean;
  /**
   * The request's `request_id`: kept with the stored turn, and a request whose
   * id is already in the session's history is answered from there, not
   * generated again (a repeat after a restart, which the gateway's memory of
   * answers does not outlive).
   */
  readonly requestId?: string;
  /** Structured output the answer must satisfy (OpenAI `response_format`, json_schema). */
  readonly responseFormat?: ResponseFormat;
  /** Tools offered to the model; their calls are mapped into a JSON answer object. */
  readonly tools?: readonly ProjectTool[];
  readonly toolChoice?: ToolChoice;
  /** The served model or LoRA adapter to ask instead of the endpoint's model. */
  readonly model?: string;
  /** The answer is a hint object: a JSON object with a string `hint`, whatever the model said. */
  readonly hint?: true;
  /**
   * The engine the router chose, as its index in `WorkerSettings.endpoints`.
   * @default {0}
   */
  readonly engine?: number;
}

/** The outcome of a turn that produced an answer. */
export interface TurnResult {
  readonly response: string;
  readonly finishReason: string;
  readonly usage: Usage | null;
  /** Milliseconds from the job reaching the worker to the first token. */
  readonly ttftMs: number | null;
  /**
   * The session's history could not be read (a damaged store): it was dropped,
   * and this turn started a fresh conversation.
   */
  readonly historyLost?: boolean;
  /** The answer was not generated but repeated from history (its request_id was there). */
  readonly repeated?: boolean;
  /** A JSON object was asked for or begun, and the answer is none (see `run_turn.ts`). */
  readonly parseFailed?: boolean;
}

/** Gateway → worker. */
export type ToWorker =
  | { readonly type: "init"; readonly settings: WorkerSettings }
  | { readonly type: "run"; readonly job: WorkerTurn }
  /** Aborts a running turn, which then fails with `reason` (a shutdown's carries a retry hint). */
  | { readonly type: "cancel"; readonly id: number; readonly reason: WireError }
  | { readonly type: "close" };

/** Worker → gateway. */
export type FromWorker =
  | { readonly type: "ready" }
  | { readonly type: "delta"; readonly id: number; readonly seq: number; readonly text: string }
  | { readonly type: "done"; readonly id: number; readonly result: TurnResult }
  | { readonly type: "error"; readonly id: number; readonly error: WireError }
  | { readonly type: "closed" };
