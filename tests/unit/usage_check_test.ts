/** The bounds an engine's `usage` is checked against (lib/engine/usage_check.ts). */

import { deepEqual, equal } from "node:assert/strict";
import { checkUsage, usageBounds } from "../../lib/engine/usage_check.ts";

const MESSAGES = [{ content: "You are terse." }, { content: "hello" }];
const PARAMS = { max_tokens: 100 };

Deno.test("usageBounds: a prompt holds at most a token per byte plus markers and slack", () => {
  const bounds = usageBounds(MESSAGES, PARAMS, "hi there");
  // 256 slack + (14 + 4 + 4) + (5 + 4 + 4) for the messages.
  deepEqual(bounds.prompt, [1, 291]);
  // 8 bytes + 4 overhead + 16 hidden tokens, under max_tokens.
  deepEqual(bounds.completion, [1, 28]);
});

Deno.test("usageBounds: max_tokens caps the completion, a stop string widens it", () => {
  deepEqual(usageBounds(MESSAGES, { max_tokens: 5 }, "hi there").completion, [1, 5]);
  deepEqual(usageBounds(MESSAGES, { max_tokens: 100, stop: ["END"] }, "hi").completion, [1, 29]);
});

Deno.test("usageBounds: nothing generated may count no tokens; offered tools count in the prompt", () => {
  equal(usageBounds(MESSAGES, PARAMS, "").completion[0], 0);
  const offered = JSON.stringify([[{ type: "function" }], undefined]);
  equal(usageBounds(MESSAGES, PARAMS, "", offered).prompt[1], 291 + offered.length + 4);
});

Deno.test("checkUsage: possible figures are kept as they are", async () => {
  const usage = { prompt_tokens: 20, completion_tokens: 3, total_tokens: 23 };
  const checked = await checkUsage(usage, MESSAGES, PARAMS, "hi there");
  equal(checked.usage, usage);
  deepEqual(checked.wrong, []);
});

Deno.test("checkUsage: a wrong total is replaced by the sum, silently", async () => {
  const checked = await checkUsage(
    { prompt_tokens: 20, completion_tokens: 3, total_tokens: 99 },
    MESSAGES,
    PARAMS,
    "hi there",
  );
  deepEqual(checked.usage, { prompt_tokens: 20, completion_tokens: 3, total_tokens: 23 });
  deepEqual(checked.wrong, []);
});

Deno.test("checkUsage: figures out of bounds are replaced by estimates within the bounds", async () => {
  const checked = await checkUsage(
    { prompt_tokens: 1_000_000, completion_tokens: -1, total_tokens: 999_999 },
    MESSAGES,
    PARAMS,
    "hi there",
  );
  equal(checked.wrong.length, 2);
  const { prompt_tokens, completion_tokens, total_tokens } = checked.usage;
  equal(prompt_tokens > 0 && prompt_tokens <= 291, true, `prompt_tokens ${prompt_tokens}`);
  equal(completion_tokens >= 1 && completion_tokens <= 28, true, `completion ${completion_tokens}`);
  equal(total_tokens, prompt_tokens + completion_tokens);
});
