/**
 * Whether an engine's `usage` figures are possible for what was sent and
 * received. A broken or foreign engine may report anything, and the figures
 * are billed and shown to clients: figures out of bounds are replaced by
 * estimates.
 *
 * @module
 */

import type { SamplingParams, Usage } from "../protocol/mod.ts";
import { estimateMessageTokens, MESSAGE_OVERHEAD_TOKENS, messageTokenBound } from "../tokens.ts";
import { audioTokenBoundOf, audioTokensOf } from "./audio_content.ts";
import { imageTokenBoundOf, imageTokensOf, type MessageContent, textOf } from "./multimodal.ts";

/** Tokens a chat template may add beyond its per-message markers (a default date line, BOS). */
const TEMPLATE_SLACK_TOKENS = 256;
/** Tokens a template's markers of one message may take beyond `MESSAGE_OVERHEAD_TOKENS`. */
const EXTRA_MARKER_TOKENS = 4;
/** Tokens a completion may hold that never show as text (EOS, reasoning markers). */
const HIDDEN_COMPLETION_TOKENS = 16;

/** The least and the most tokens possible, both included. */
export type TokenRange = readonly [low: number, high: number];

/**
 * The range of `usage` figures possible for a completion of `messages` that
 * generated `generated` (answer and reasoning), with `offered` (tool
 * definitions and a schema, as JSON; `""` for none) in the prompt: a prompt
 * holds at most a token per UTF-8 byte plus template markers; a completion at
 * most `max_tokens`, and at most a token per byte generated plus a stop string
 * and hidden tokens.
 */
export function usageBounds(
  messages: readonly { readonly content: MessageContent }[],
  params: Pick<SamplingParams, "max_tokens" | "stop">,
  generated: string,
  offered = "",
): { prompt: TokenRange; completion: TokenRange } {
  let prompt = TEMPLATE_SLACK_TOKENS + (offered === "" ? 0 : messageTokenBound(offered));
  for (const { content } of messages) {
    // An image counts for as many tokens as the model makes of it: bounded by its size.
    prompt += messageTokenBound(textOf(content)) + imageTokenBoundOf(content) +
      audioTokenBoundOf(content) + EXTRA_MARKER_TOKENS;
  }
  let stop = 0;
  for (const string of params.stop ?? []) stop = Math.max(stop, messageTokenBound(string));
  const fromText = messageTokenBound(generated) + stop + HIDDEN_COMPLETION_TOKENS;
  return {
    prompt: [1, prompt],
    completion: [generated === "" ? 0 : 1, Math.min(params.max_tokens, fromText)],
  };
}

/** What {@linkcode checkUsage} made of an engine's `usage`. */
export interface CheckedUsage {
  /** The figures to use: the engine's, or estimates where those were out of bounds. */
  readonly usage: Usage;
  /** The figures found out of bounds, described; empty when all were possible. */
  readonly wrong: readonly string[];
}

/**
 * `usage` as reported when it is possible for what was sent and received
 * (see {@linkcode usageBounds}); figures out of bounds are replaced by
 * estimates, and a total that is not the sum of its parts by the sum.
 */
export async function checkUsage(
  usage: Usage,
  messages: readonly { readonly content: MessageContent }[],
  params: Pick<SamplingParams, "max_tokens" | "stop">,
  generated: string,
  offered = "",
): Promise<CheckedUsage> {
  const bounds = usageBounds(messages, params, generated, offered);
  const within = (value: number, [low, high]: TokenRange) =>
    Number.isSafeInteger(value) && value >= low && value <= high;
  let { prompt_tokens, completion_tokens } = usage;
  const wrong: string[] = [];
  if (!within(prompt_tokens, bounds.prompt)) {
    wrong.push(`prompt_tokens ${prompt_tokens} (possible: ${bounds.prompt.join("..")})`);
    prompt_tokens = 0;
    for (const { content } of messages) {
      prompt_tokens += await estimateMessageTokens(textOf(content)) + imageTokensOf(content) +
        audioTokensOf(content);
    }
  }
  if (!within(completion_tokens, bounds.completion)) {
    wrong.push(
      `completion_tokens ${completion_tokens} (possible: ${bounds.completion.join("..")})`,
    );
    const estimate = await estimateMessageTokens(generated) - MESSAGE_OVERHEAD_TOKENS;
    completion_tokens = Math.min(bounds.completion[1], Math.max(bounds.completion[0], estimate));
  }
  const total_tokens = prompt_tokens + completion_tokens;
  if (wrong.length === 0 && usage.total_tokens === total_tokens) return { usage, wrong };
  return { usage: { prompt_tokens, completion_tokens, total_tokens }, wrong };
}
