/**
 * The engine's own token count of a text: vLLM's `/tokenize`, exact for the
 * served model (an estimate with another tokenizer is only a guess), and no
 * tokenizer tables in this process.
 * Engines without it (other OpenAI-compatible servers) answer undefined, and
 * the caller estimates instead.
 *
 * @module
 */

import type { EngineEndpoint } from "./engine_client.ts";

/** Milliseconds a count may take before the caller estimates instead. */
const TIMEOUT_MS = 5000;

/** Tokens `text` is made of for the engine at `endpoint`, or undefined where it cannot say. */
export async function engineTokenCount(
  endpoint: EngineEndpoint,
  text: string,
): Promise<number | undefined> {
  // vLLM serves /tokenize beside /v1, not under it.
  const url = `${endpoint.baseUrl.replace(/\/v1\/?$/, "")}/tokenize`;
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        ...(endpoint.apiKey && { authorization: `Bearer ${endpoint.apiKey}` }),
      },
      body: JSON.stringify({ model: endpoint.model, prompt: text, add_special_tokens: false }),
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
    if (!response.ok) {
      await response.body?.cancel();
      return undefined;
    }
    const { count } = await response.json() as { count?: unknown };
    return typeof count === "number" && Number.isInteger(count) && count >= 0 ? count : undefined;
  } catch {
    return undefined;
  }
}
