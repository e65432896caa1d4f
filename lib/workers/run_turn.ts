/**
 * One turn of a conversation, as a worker runs it: load the session, trim it,
 * call the engine with streaming, save the turn. Nothing is saved unless the
 * engine finished, so a failed or cancelled turn leaves the history as it was.
 * A request whose `request_id` is already in the session's history was
 * answered before (a client resending after a restart): its stored answer is
 * returned, and nothing is generated or saved.
 *
 * @module
 */

import type { ChatMessage } from "../engine/engine_client.ts";
import { userContent } from "../engine/multimodal.ts";
import { ThinkingFilter } from "../engine/thinking_filter.ts";
import { guidanceFromToolCalls, hintObject, jsonObjectOf } from "../games/hints.ts";
import { ServiceError } from "../protocol/errors.ts";
import { audioClipsTokens, withAudioMarker } from "../protocol/audio.ts";
import { imagesTokens, withImageMarker } from "../protocol/images.ts";
import type { HistoryEntry, Session } from "../sessions/session_store.ts";
import { historyBudget, messagesToDrop } from "../sessions/trim.ts";
import { estimateMessageTokens, estimatePromptTokens, messageTokenBound } from "../tokens.ts";
import { DeltaCoalescer } from "./delta_coalescer.ts";
import type { TurnResult, WorkerTurn } from "./messages.ts";
import type { TurnContext } from "./turn_context.ts";

/** Runs `job`; streamed text goes to `onDelta` coalesced, when the job streams. */
export async function runTurn(
  job: WorkerTurn,
  context: TurnContext,
  signal: AbortSignal,
  onDelta: (seq: number, text: string) => void,
): Promise<TurnResult> {
  const started = performance.now();
  const { store } = context;
  let historyLost = false;
  let loaded: Session | undefined;
  if (job.requestId !== undefined && job.message !== undefined) {
    // Before a reset too: a repeat of "reset and ask" must not clear the turn it made.
    const earlier = await store.load(job.project, job.sessionId);
    historyLost = earlier.lost === true;
    const answer = storedAnswer(earlier.history, job.requestId);
    if (answer) {
      return {
        response: answer.content,
        finishReason: answer.finishReason ?? "stop",
        usage: answer.usage ?? null,
        ttftMs: null,
        repeated: true,
      };
    }
    if (!job.reset) loaded = earlier;
  }
  if (job.reset) await store.clear(job.project, job.sessionId);
  if (job.message === undefined) {
    return { response: "", finishReason: "reset", usage: null, ttftMs: null };
  }
  const session = loaded ?? await store.load(job.project, job.sessionId);
  historyLost ||= session.lost === true;
  const systemPrompt = job.systemPromptFromRequest
    ? job.systemPrompt
    : session.meta?.systemPrompt ?? job.systemPrompt;
  // The gateway counted the project's prompt; a session's or a request's own is counted here.
  // Tool definitions and a schema sit in the prompt too: counted with the system prompt.
  const systemTokens =
    (systemPrompt === job.systemPrompt && job.systemTokens !== undefined
      ? job.systemTokens
      : await estimatePromptTokens(systemPrompt)) + await offeredTokens(job);
  const requested = job.params.max_tokens;
  const budget = historyBudget({
    maxHistoryTokens: context.maxHistoryTokens,
    maxModelLen: context.maxModelLen,
    maxTokens: Math.min(requested, context.defaultMaxTokens ?? requested),
    systemTokens,
  });
  const toDrop = (userTokens: number) =>
    messagesToDrop(session.history, userTokens, budget, Math.floor(budget * context.trimLowWater));
  // Most turns fit even at the message's largest possible size: no estimate needed.
  // Images count as the engine will roughly count them (the engine's usage is what is reported).
  const imageCost = imagesTokens(job.images) + audioClipsTokens(job.audio);
  let drop = toDrop(messageTokenBound(job.message) + imageCost);
  if (drop > 0) drop = toDrop(await estimateMessageTokens(job.message) + imageCost);

  const prompt = (dropped: number): ChatMessage[] => [
    { role: "system", content: systemPrompt },
    ...session.history.slice(dropped).map(({ role, content }) => ({ role, content })),
    {
      role: "user",
      content: userContent(job.message!, job.images?.map((image) => image.url), job.audio),
    },
  ];

  // The answer gets what was asked, or what the context leaves after the prompt: a bound first
  // (no tokenizer needed), an estimate only when the bound leaves too little.
  const margin = Math.max(16, Math.ceil(context.maxModelLen * 0.02));
  const room = (dropped: number, userTokens: number) => {
    let prompt = systemTokens + userTokens;
    for (const message of session.history.slice(dropped)) prompt += message.tokens;
    return context.maxModelLen - prompt - margin;
  };
  const answerTokens = async (dropped: number) => {
    if (requested <= room(dropped, messageTokenBound(job.message!) + imageCost)) return requested;
    return Math.max(
      1,
      Math.min(requested, room(dropped, await estimateMessageTokens(job.message!) + imageCost)),
    );
  };

  // A schema the engine refuses (one without structured output) is dropped, not fatal: the
  // answer is still made a JSON object below when it must be one.
  let responseFormat = job.responseFormat;
  const attempt = async () => {
    const params = { ...job.params, max_tokens: await answerTokens(drop) };
    const filter = context.skipThinking
      ? new ThinkingFilter({ opened: context.thinkingOpened })
      : undefined;
    // Offered tools, the answer is only whole once their calls are in: no deltas.
    const coalescer = job.stream && !job.tools ? new DeltaCoalescer(onDelta) : undefined;
    let visible = "";
    let firstVisibleAt: number | undefined;
    const show = (text: string) => {
      if (text === "") return;
      firstVisibleAt ??= performance.now();
      visible += text;
      coalescer?.push(text);
    };
    try {
      const completion = await engineOf(context, job).complete(
        prompt(drop),
        params,
        signal,
        (text) => {
          show(filter ? filter.push(text) : text);
        },
        {
          model: job.model,
          responseFormat,
          tools: job.tools?.map((tool) => tool.definition),
          toolChoice: job.toolChoice,
        },
      );
      if (filter) show(filter.end());
      coalescer?.flush();
      return { completion, visible, firstVisibleAt };
    } catch (error) {
      coalescer?.discard();
      throw error;
    }
  };

  let outcome;
  for (let tries = 0;; tries++) {
    try {
      outcome = await attempt();
      break;
    } catch (error) {
      if (tries > 1 || !(error instanceof ServiceError)) throw error;
      if (error.code === "internal" && responseFormat && UNSUPPORTED_FORMAT.test(error.message)) {
        responseFormat = undefined;
        continue;
      }
      // The engine counts tokens its own way: trim to nothing but this message and try once more.
      const overflow = error.code === "context_overflow";
      if (!overflow || drop === session.history.length) throw error;
      drop = session.history.length;
    }
  }
  const { completion, firstVisibleAt } = outcome;
  const { answer: visible, parseFailed } = answerOf(job, outcome.visible, completion.toolCalls);

  await saveTurn(context, job, session, drop, systemTokens, completion, visible);
  return {
    response: visible,
    finishReason: completion.finishReason,
    usage: completion.usage ?? null,
    ttftMs: firstVisibleAt === undefined ? null : Math.round(firstVisibleAt - started),
    ...(historyLost && { historyLost }),
    ...(parseFailed && { parseFailed }),
  };
}

/** The client of the engine the turn was routed to. */
function engineOf(context: TurnContext, job: WorkerTurn) {
  return context.engines?.[job.engine ?? 0] ?? context.engine;
}

/** Estimated tokens of the tools and schema a turn offers, by their JSON (a worker's few, kept). */
async function offeredTokens(job: WorkerTurn): Promise<number> {
  if (!job.tools && !job.responseFormat) return 0;
  return await estimatePromptTokens(
    JSON.stringify([job.tools?.map((tool) => tool.definition), job.responseFormat]),
  );
}

/** An engine's refusal of `response_format` (one without structured output). */
const UNSUPPORTED_FORMAT = /response_format|json_schema|structured|guided/i;

/**
 * The answer of a turn: the visible text, with tool calls mapped into a JSON
 * object, made a hint object when the turn answers a game state; and whether
 * it failed to parse: a JSON object was asked for (a response format) or
 * begun (`{` or a code fence), and the answer is none (the game then gets the
 * text as its `hint`, without an action).
 */
function answerOf(
  job: WorkerTurn,
  visible: string,
  toolCalls: readonly { name: string; arguments: string }[] | undefined,
): { answer: string; parseFailed: boolean } {
  let answer = visible;
  if (job.tools && toolCalls && toolCalls.length > 0) {
    answer = JSON.stringify(guidanceFromToolCalls(job.tools, toolCalls, visible));
  }
  const begun = /^\s*(\{|```)/.test(answer);
  const parseFailed = (job.responseFormat !== undefined || begun) &&
    jsonObjectOf(answer) === undefined;
  return { answer: job.hint ? JSON.stringify(hintObject(answer)) : answer, parseFailed };
}

/** The answer stored after the user message that came with `requestId`, if any. */
function storedAnswer(
  history: readonly HistoryEntry[],
  requestId: string,
): HistoryEntry | undefined {
  for (let i = history.length - 2; i >= 0; i--) {
    if (history[i].role === "user" && history[i].requestId === requestId) {
      return history[i + 1].role === "assistant" ? history[i + 1] : undefined;
    }
  }
  return undefined;
}

/** Stores the turn with token counts from the engine's usage where it gave them. */
async function saveTurn(
  context: TurnContext,
  job: WorkerTurn,
  session: Session,
  drop: number,
  systemTokens: number,
  completion: { text: string; usage: TurnResult["usage"] | undefined; finishReason: string },
  visible: string,
): Promise<void> {
  const usage = completion.usage;
  let historyTokens = 0;
  for (const message of session.history.slice(drop)) historyTokens += message.tokens;
  // The prompt's exact size, less what is already accounted for, is this message's share.
  // Images and audio are not kept (a KV value holds 64 KiB; replaying them costs every turn): the turn is
  // stored as its text and their marker, and counted as that.
  const stored = withAudioMarker(withImageMarker(job.message!, job.images), job.audio);
  const userTokens = usage && stored === job.message
    ? Math.max(1, usage.prompt_tokens - systemTokens - historyTokens)
    : await estimateMessageTokens(stored);
  // Reasoning counts in completion_tokens but is not stored: estimate when it was removed.
  const assistantTokens = usage && visible === completion.text
    ? usage.completion_tokens
    : await estimateMessageTokens(visible);
  await context.store.commitTurn(job.project, job.sessionId, session, drop, [
    {
      role: "user",
      content: stored,
      tokens: userTokens,
      ...(job.requestId !== undefined && { requestId: job.requestId }),
    },
    {
      role: "assistant",
      content: visible,
      tokens: assistantTokens,
      finishReason: completion.finishReason,
      ...(usage && { usage }),
    },
  ]);
}
