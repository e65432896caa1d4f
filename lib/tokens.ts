/**
 * Token counts for text the engine has not counted yet. The engine's own
 * `usage` is exact for the served model (its own tokenizer and chat template)
 * and wins wherever it is known; gpt-tokenizer's estimate is the fallback, with
 * cl100k_base as a stand-in: its tables take half the memory of o200k_base's
 * (38 MB against 75 MB in every thread that loads them) for an estimate that
 * is only ever a guess.
 *
 * The tables load on first use. A cheap upper bound answers the common
 * question "does this still fit?" without them: a thread that never needs a
 * real estimate never pays for the tables.
 *
 * @module
 */

import { LruMap } from "./_util.ts";

/** Tokens a chat template adds around each message (role markers, separators). */
export const MESSAGE_OVERHEAD_TOKENS = 4;

// User text may contain strings that look like special tokens; count them as text.
const AS_TEXT = { disallowedSpecial: new Set<string>() };

let tokenizer: Promise<typeof import("gpt-tokenizer/encoding/cl100k_base")> | undefined;

/** Estimated tokens of one chat message holding `text`, template overhead included. */
export async function estimateMessageTokens(text: string): Promise<number> {
  const { countTokens } = await (tokenizer ??= import("gpt-tokenizer/encoding/cl100k_base"));
  return countTokens(text, AS_TEXT) + MESSAGE_OVERHEAD_TOKENS;
}

/**
 * Most tokens one chat message holding `text` can take: a byte-level BPE
 * token covers at least one UTF-8 byte. Exact enough to tell that a message
 * fits, never to tell that it does not.
 */
export function messageTokenBound(text: string): number {
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    // Each half of a surrogate pair counts 3: 6 for 4 bytes, still a bound.
    bytes += unit < 0x80 ? 1 : unit < 0x800 ? 2 : 3;
  }
  return bytes + MESSAGE_OVERHEAD_TOKENS;
}

const promptEstimates = new LruMap<string, number>(64);

/**
 * {@linkcode estimateMessageTokens} of a text that comes with every turn (a system prompt,
 * the tools and response format offered), remembered: the same few come again and again,
 * and a long one costs real time to count.
 */
export async function estimatePromptTokens(text: string): Promise<number> {
  let tokens = promptEstimates.get(text);
  if (tokens === undefined) {
    tokens = await estimateMessageTokens(text);
    promptEstimates.set(text, tokens);
  }
  return tokens;
}
