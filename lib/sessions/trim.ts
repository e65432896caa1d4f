/**
 * Prefix-cache-friendly trimming. vLLM reuses the KV cache
 * of a prompt prefix it has seen; dropping the oldest turn on every request
 * changes the prefix every time. So when history outgrows its budget, whole
 * turns are dropped down to a low-water mark in one go, and the turns that
 * follow share one prefix until the budget is reached again.
 *
 * @module
 */

/** Fraction of the budget that history is trimmed down to. */
export const LOW_WATER_RATIO = 0.6;

/** The part of a stored message trimming looks at. */
export interface Sized {
  readonly role: "user" | "assistant";
  readonly tokens: number;
}

/**
 * How many leading messages to drop so that history plus the incoming message
 * fits `budget`. Returns 0 while it fits; otherwise drops whole turns (a user
 * message and the answers after it) until the total is at most
 * `lowWater` (default {@linkcode LOW_WATER_RATIO} of the budget).
 */
export function messagesToDrop(
  history: readonly Sized[],
  incomingTokens: number,
  budget: number,
  lowWater: number = Math.floor(budget * LOW_WATER_RATIO),
): number {
  let total = incomingTokens;
  for (const message of history) total += message.tokens;
  if (total <= budget) return 0;
  let drop = 0;
  while (drop < history.length && total > lowWater) {
    // One whole turn: the message at `drop`, then everything up to the next user message.
    do {
      total -= history[drop].tokens;
      drop++;
    } while (drop < history.length && history[drop].role !== "user");
  }
  return drop;
}

/**
 * The token budget of a session's history: the configured cap, or what the
 * context leaves after the answer, the system prompt and a safety margin.
 */
export function historyBudget(options: {
  maxHistoryTokens: number;
  maxModelLen: number;
  maxTokens: number;
  systemTokens: number;
}): number {
  const margin = Math.max(16, Math.ceil(options.maxModelLen * 0.02));
  const room = options.maxModelLen - options.maxTokens - options.systemTokens - margin;
  return Math.max(0, Math.min(options.maxHistoryTokens, room));
}
