/** The thinking filter (lib/engine/thinking_filter.ts): reasoning removed however it streams. */

import { equal } from "node:assert/strict";
import { stripThinking, ThinkingFilter } from "../../lib/engine/thinking_filter.ts";

Deno.test("thinking: reasoning is removed however the stream splits it", () => {
  const text = "<think>\nsecret plan\n</think>\n\nThe answer is 42.";
  for (let size = 1; size <= text.length; size++) {
    const filter = new ThinkingFilter();
    let out = "";
    for (let i = 0; i < text.length; i += size) out += filter.push(text.slice(i, i + size));
    out += filter.end();
    equal(out, "The answer is 42.", `chunk size ${size}`);
  }
  equal(stripThinking("Before <think>x</think>after"), "Before after");
  equal(stripThinking("Answer <think>never closed"), "Answer ");
  equal(stripThinking("a < b and <thin ice"), "a < b and <thin ice");
});

Deno.test("thinking: a QwQ answer (no opening tag) loses its reasoning however the stream splits it", () => {
  const text = "secret plan\n</think>\n\nThe answer is 42.";
  for (let size = 1; size <= text.length; size++) {
    const filter = new ThinkingFilter({ opened: true });
    let out = "";
    for (let i = 0; i < text.length; i += size) out += filter.push(text.slice(i, i + size));
    out += filter.end();
    equal(out, "The answer is 42.", `chunk size ${size}`);
  }
  // The engine split the reasoning off (or the model did not think): all of it is the answer.
  equal(stripThinking("The answer is 42.", { opened: true }), "The answer is 42.");
  equal(stripThinking("<think>plan</think>Answer", { opened: true }), "Answer");
  // Without `opened`, such an answer keeps its reasoning: the filter cannot know.
  equal(stripThinking("plan</think>Answer"), "plan</think>Answer");
});
