/**
 * One turn of a conversation, as a worker runs it: load the session, trim it,
 * call the engine with streaming, save the turn. Nothing is saved unless the
 * engine finished, so a failed or cancelled turn leaves the history as it was.
 *
 * @module
 */

import type { ChatMessage, EngineClient } from "../engine/engine_client.ts";
import { ThinkingFilter } from "../engine/thinking_filter.ts";
import { ServiceError } from "../protocol/errors.ts";
import type { Session, SessionStore } from "../sessions/session_store.ts";
import { historyBudget, messagesToDrop } from "../sessions/trim.ts";
import { estimateMessageTokens, estimatePromptTokens, messageTokenBound } from "../tokens.ts";
import { DeltaCoalescer } from "./delta_coalescer.ts";
import type { TurnJob, TurnResult } from "./messages.ts";

/** What a turn runs against. */
export interface TurnContext {
  readonly store: SessionStore;
  readonly engine: EngineClient;
  readonly maxHistoryTokens: number;
  /** Share of the budget trimming drops down to. */
  readonly trimLowWater: number;
  readonly maxModelLen: number;
  readonly skipThinking: boolean;
}

/** Runs `job`; streamed text goes to `onDelta` coalesced, when the job streams. */
export async function runTurn(
  job: TurnJob,
  context: TurnContext,
  signal: AbortSignal,
  onDelta: (seq: number, text: string) => void,
): Promise<TurnResult> {
  const started = performance.now();
  const { store } = context;
  if (job.reset) await store.clear(job.project, job.sessionId);
  if (job.message === undefined) {
    return { response: "", finishReason: "reset", usage: null, ttftMs: null };
  }
  const session = await store.load(job.project, job.sessionId);
  const systemPrompt = job.systemPromptFromRequest
    ? job.systemPrompt
    : session.meta?.systemPrompt ?? job.systemPrompt;
  // The gateway counted the project's prompt; a session's or a request's own is counted here.
  const systemTokens = systemPrompt === job.systemPrompt && job.systemTokens !== undefined
    ? job.systemTokens
    : await estimatePromptTokens(systemPrompt);
  const budget = historyBudget({
    maxHistoryTokens: context.maxHistoryTokens,
    maxModelLen: context.maxModelLen,
    maxTokens: job.params.max_tokens,
    systemTokens,
  });
  const toDrop = (userTokens: number) =>
    messagesToDrop(session.history, userTokens, budget, Math.floor(budget * context.trimLowWater));
  // Most turns fit even at the message's largest possible size: no estimate needed.
  let drop = toDrop(messageTokenBound(job.message));
  if (drop > 0) drop = toDrop(await estimateMessageTokens(job.message));

  const prompt = (dropped: number): ChatMessage[] => [
    { role: "system", content: systemPrompt },
    ...session.history.slice(dropped).map(({ role, content }) => ({ role, content })),
    { role: "user", content: job.message! },
  ];

  const attempt = async () => {
    const filter = context.skipThinking ? new ThinkingFilter() : undefined;
    const coalescer = job.stream ? new DeltaCoalescer(onDelta) : undefined;
    let visible = "";
    let firstVisibleAt: number | undefined;
    const show = (text: string) => {
      if (text === "") return;
      firstVisibleAt ??= performance.now();
      visible += text;
      coalescer?.push(text);
    };
    try {
      const completion = await context.engine.complete(prompt(drop), job.params, signal, (text) => {
        show(filter ? filter.push(text) : text);
      });
      if (filter) show(filter.end());
      coalescer?.flush();
      return { completion, visible, firstVisibleAt };
    } catch (error) {
      coalescer?.discard();
      throw error;
    }
  };

  let outcome;
  try {
    outcome = await attempt();
  } catch (error) {
    // The engine counts tokens its own way: trim to nothing but this message and try once more.
    const overflow = error instanceof ServiceError && error.code === "context_overflow";
    if (!overflow || drop === session.history.length) throw error;
    drop = session.history.length;
    outcome = await attempt();
  }
  const { completion, visible, firstVisibleAt } = outcome;

  await saveTurn(context, job, session, drop, systemTokens, completion, visible);
  return {
    response: visible,
    finishReason: completion.finishReason,
    usage: completion.usage ?? null,
    ttftMs: firstVisibleAt === undefined ? null : Math.round(firstVisibleAt - started),
  };
}

/** Stores the turn with token counts from the engine's usage where it gave them. */
async function saveTurn(
  context: TurnContext,
  job: TurnJob,
  session: Session,
  drop: number,
  systemTokens: number,
  completion: { text: string; usage: TurnResult["usage"] | undefined },
  visible: string,
): Promise<void> {
  const usage = completion.usage;
  let historyTokens = 0;
  for (const message of session.history.slice(drop)) historyTokens += message.tokens;
  // The prompt's exact size, less what is already accounted for, is this message's share.
  const userTokens = usage
    ? Math.max(1, usage.prompt_tokens - systemTokens - historyTokens)
    : await estimateMessageTokens(job.message!);
  // Reasoning counts in completion_tokens but is not stored: estimate when it was removed.
  const assistantTokens = usage && visible === completion.text
    ? usage.completion_tokens
    : await estimateMessageTokens(visible);
  await context.store.commitTurn(job.project, job.sessionId, session, drop, [
    { role: "user", content: job.message!, tokens: userTokens },
    { role: "assistant", content: visible, tokens: assistantTokens },
  ]);
}
