/**
 * Runs one accepted turn: waits for its session's directory entry, the
 * session store and the engine, hands it to a request worker, publishes its
 * deltas and its final answer with the timing, and counts it.
 *
 * @module
 */

import { ServiceError } from "../protocol/errors.ts";
import { logger } from "../log.ts";
import type { ReplyBody } from "../protocol/mod.ts";
import { messageTokenBound } from "../tokens.ts";
import { audioClipsTokens } from "../protocol/audio.ts";
import { imagesTokens } from "../protocol/images.ts";
import type { StorageHealth } from "../sessions/storage_health.ts";
import type { SessionDirectory } from "../sessions/session_directory.ts";
import type { ExperimentMonitor } from "../observability/experiment_monitor.ts";
import type { Stats } from "../observability/stats.ts";
import { type Project, turnShape, type Variant } from "../projects/project_file.ts";
import type { SamplingParams } from "../protocol/request.ts";
import type { TurnResult } from "../workers/messages.ts";
import type { TurnPool } from "../workers/turn_pool.ts";
import type { Prompts } from "./prompts.ts";
import type { RecentRequests } from "./recent_requests.ts";
import type { ReplyPublisher } from "./reply_publisher.ts";
import type { TurnJob } from "./jobs.ts";
import type { Experiments } from "./experiments.ts";
import type { EngineLease, TurnEngines, TurnFacts } from "./turn_engines.ts";

const log = logger("gateway");

/**
 * Bytes of text a token covers, about (cl100k on English): the new message's share of the
 * prompt, for choosing its engine (the engine's usage gives the exact count after).
 */
const BYTES_PER_TOKEN = 4;

/** What a turn is run with. */
export interface TurnRunnerOptions {
  /** Runs the turn on a request worker (or the gateway's own thread). */
  readonly pool: TurnPool;
  readonly prompts: Prompts;
  readonly replies: ReplyPublisher;
  readonly recent: RecentRequests;
  readonly directory: SessionDirectory;
  readonly stats: Stats;
  /** Gives each turn its engine (the router, with several). */
  readonly engines: TurnEngines;
  readonly storageHealth: StorageHealth | undefined;
  /** Milliseconds a turn waits for an engine serving its model to take turns. */
  readonly engineWaitMs: number;
  readonly projectFiles: ReadonlyMap<string, Project> | undefined;
  /** The sessions' experiment variants; undefined when no project runs an experiment. */
  readonly experiments: Pick<Experiments, "assign"> | undefined;
  /**
   * Where a turn of a session in an experiment is counted for its variant.
   * @default {undefined}
   */
  readonly experimentMonitor?: ExperimentMonitor;
  /** The gateway's clock. */
  readonly now: () => number;
}

/** Runs `job` to its answer; throws what failed it (the caller answers the error). */
export async function runTurnJob(
  options: TurnRunnerOptions,
  job: TurnJob,
  signal: AbortSignal,
): Promise<void> {
  const { request } = job;
  const { replies, now } = options;
  const startedAt = now();
  await options.directory.settled(request.project, request.sessionId);
  // A turn that cannot be saved is not generated: refused at once, the client retries.
  options.storageHealth?.check();
  // The session's variant, given it on its first turn (stored: every instance agrees).
  const variant = await options.experiments?.assign(
    request.project,
    request.sessionId,
    request.variant,
  );
  if (variant) {
    job.variant = variant.name;
    job.target = { ...job.target, variant: variant.name };
  }
  const target = job.target;
  const prompt = request.systemPrompt ?? variant?.prompt ?? options.prompts.get(request.project);
  const shape = turnShape(
    options.projectFiles?.get(request.project),
    job.settled !== undefined,
    variant,
  );
  const systemTokens = options.prompts.tokens(prompt);
  const route: TurnFacts = {
    session: job.sessionKey,
    model: shape.model,
    systemTokens,
    messageTokens: request.message === undefined
      ? 0
      : Math.ceil(messageTokenBound(request.message) / BYTES_PER_TOKEN) +
        imagesTokens(request.images) + audioClipsTokens(request.audio),
    reset: request.reset,
  };
  // A turn waits for an engine up to --engine-wait in all, whether the circuits are open
  // already or its engine fails it now (loading: 503; busy: 429 with a Retry-After).
  const engineDeadline = now() + options.engineWaitMs;
  // Engines that failed this turn while down: it goes to another one if any serves it.
  const tried = new Set<number>();
  let lease: EngineLease = await options.engines.acquire(
    route,
    tried,
    options.engineWaitMs,
    signal,
  );
  // Cancelled while it waited for its turn (in a share group, for another instance): no
  // failure of the engine's.
  if (signal.aborted) {
    lease.finished({ ok: true });
    signal.throwIfAborted();
  }
  log.debug("Request {request} of {session}: started after {ms} ms", {
    request: request.requestId ?? "-",
    session: job.sessionKey,
    ms: Math.round(now() - job.receivedAt),
  });
  let delivered = false;
  // When the try that answers began: the worker's time to first token counts from there, and
  // what came before it (waiting for an engine, a try an engine failed) counts too.
  let triedAt = startedAt;
  const run = (engine: number) =>
    options.pool.run(
      {
        id: job.id,
        project: request.project,
        sessionId: request.sessionId,
        requestId: request.requestId,
        message: request.message,
        ...(request.images && { images: request.images }),
        ...(request.audio && { audio: request.audio }),
        reset: request.reset,
        systemPrompt: prompt,
        systemTokens,
        systemPromptFromRequest: request.systemPrompt !== undefined,
        params: variant ? variantParams(request.params, variant) : request.params,
        stream: request.stream,
        ...shape,
        ...(engine !== 0 && { engine }),
      },
      (seq, delta) => {
        if (!delivered) lease.prefilled();
        delivered = true;
        replies.reply(target, { type: "delta", seq, delta });
      },
      signal,
    );
  let result: TurnResult;
  for (;;) {
    try {
      triedAt = now();
      result = await run(lease.index);
      break;
    } catch (error) {
      // An engine that is down (loading, restarting, dead) holds the turn until one serving it
      // takes turns, within --engine-wait: another engine at once when there is one, else this
      // one when it is back; tried again only if nothing of it reached the client. An engine
      // that answers its probe failed this turn alone (a broken stream, a 429 with its
      // Retry-After): the client gets the error, with the engine's pause as retry_after_ms.
      const unavailable = error instanceof ServiceError && error.code === "engine_unavailable";
      const left = engineDeadline - now();
      if (!unavailable || delivered || left <= 0 || !await lease.health.confirmDown()) {
        if (unavailable) lease.health.failed();
        // A cancel, a refused request or a full disk is no failure of the engine's.
        lease.finished({ ok: !engineFailed(error) });
        throw error;
      }
      lease.finished({ ok: false });
      tried.add(lease.index);
      lease = await options.engines.acquire(route, tried, left, signal);
    }
  }
  const { health } = lease;
  lease.finished({
    ok: true,
    ...(result.ttftMs !== null && { ttftMs: result.ttftMs }),
    ...(result.usage && !result.repeated && {
      promptTokens: result.usage.prompt_tokens,
      completionTokens: result.usage.completion_tokens,
    }),
  });
  health.succeeded();
  const queueMs = startedAt - job.receivedAt;
  const timing = {
    queueMs,
    ttftMs: result.ttftMs === null ? null : triedAt - job.receivedAt + result.ttftMs,
    totalMs: now() - job.receivedAt,
  };
  const done: ReplyBody = {
    type: "done",
    response: result.response,
    finish_reason: result.finishReason,
    usage: result.usage,
    timing: {
      queue_ms: Math.round(timing.queueMs),
      ttft_ms: timing.ttftMs === null ? null : Math.round(timing.ttftMs),
      total_ms: Math.round(timing.totalMs),
    },
    ...(result.repeated && { repeated: true }),
    ...(result.historyLost && { history_lost: true }),
  };
  replies.reply(target, done);
  log.debug("Request {request} of {session}: answered in {ms} ms ({finish})", {
    request: request.requestId ?? "-",
    session: job.sessionKey,
    ms: Math.round(timing.totalMs),
    finish: result.finishReason,
  });
  // Kept for a client's retry under the same id; a copy without one is only ever dropped.
  if (request.requestId !== undefined) options.recent.answered(job.dedupKey, done);
  options.directory.touch(request.project, request.sessionId);
  // A repeat sent from history generated nothing: no engine figures to count.
  if (result.repeated) options.stats.ignored("duplicate");
  else options.stats.answered(request.project, timing, result.usage);
  if (job.variant !== undefined && !result.repeated && !job.tryIt) {
    options.experimentMonitor?.turnEnded(
      request.project,
      request.sessionId,
      request.requestId,
      job.variant,
      {
        ok: true,
        ...(timing.ttftMs !== null && { ttfdMs: timing.ttftMs }),
        totalMs: timing.totalMs,
        tokensIn: result.usage?.prompt_tokens ?? 0,
        tokensOut: result.usage?.completion_tokens ?? 0,
        ...(result.parseFailed && { parseFailed: true }),
      },
    );
  }
}

/**
 * The sampling parameters of a turn answered by `variant`: its own win over
 * the request's, so that what is compared is the variants.
 */
function variantParams(params: SamplingParams, variant: Variant): SamplingParams {
  return {
    ...params,
    ...(variant.temperature !== undefined && { temperature: variant.temperature }),
    ...(variant.topP !== undefined && { top_p: variant.topP }),
    ...(variant.maxTokens !== undefined && { max_tokens: variant.maxTokens }),
  };
}

/** Whether a turn's error was the engine's doing (unreachable, too slow, broken answer). */
function engineFailed(error: unknown): boolean {
  return !(error instanceof ServiceError) ||
    ["engine_unavailable", "timeout", "internal"].includes(error.code);
}
