/** What the simulated engine's model says (lib/engine/simulated_reply.ts). */

import { deepEqual, equal, match, ok } from "node:assert/strict";
import { sample, simulatedReply } from "../../lib/engine/simulated_reply.ts";

const CHAT = [
  { role: "system", content: "# Maze guide\nBe brief." },
  { role: "user", content: "hi" },
  { role: "assistant", content: "hello" },
  { role: "user", content: "where am I?" },
];
const PLAIN = { fillerTokens: 0, maxTokens: 100 };

Deno.test("simulated reply: names the system prompt, counts the turns, quotes the last", () => {
  const reply = simulatedReply({ messages: CHAT }, PLAIN);
  equal(reply.tokens.join(""), '[Maze guide] Turn 2: you said "where am I?".');
  equal(reply.finishReason, "stop");
  equal(reply.completionTokens, reply.tokens.length);
  deepEqual(reply.calls, []);
});

Deno.test("simulated reply: cut at max_tokens; an adapter's name first; thinking first", () => {
  const cut = simulatedReply({ messages: CHAT }, { ...PLAIN, maxTokens: 2 });
  deepEqual(cut.tokens, ["[Maze ", "guide] "]);
  equal(cut.finishReason, "length");
  match(simulatedReply({ messages: CHAT }, { ...PLAIN, adapter: "pirate" }).tokens[0], /^pirate: /);
  equal(
    simulatedReply({ messages: CHAT }, { ...PLAIN, thinking: "tagged" }).tokens[0],
    "<think>\n",
  );
});

Deno.test("simulated reply: a tool the user names is called, after the text", () => {
  const tools = [{
    type: "function",
    function: {
      name: "look",
      parameters: { type: "object", properties: { far: { type: "boolean", default: true } } },
    },
  }];
  const reply = simulatedReply(
    { messages: [{ role: "user", content: "look around" }], tools },
    PLAIN,
  );
  equal(reply.finishReason, "tool_calls");
  equal(reply.calls.length, 1);
  equal(reply.calls[0].name, "look");
  equal(reply.calls[0].arguments, '{"far":true}');
  match(reply.calls[0].id, /^chatcmpl-tool-/);
  equal(reply.completionTokens > reply.tokens.length, true);
  equal(simulatedReply({ messages: [], tools, tool_choice: "none" }, PLAIN).calls.length, 0);
});

Deno.test("simulated reply: json_schema answers with the text in the first string", () => {
  const schema = {
    type: "object",
    required: ["n"],
    properties: { answer: { type: "string" }, n: { type: "integer", exclusiveMinimum: 2 } },
  };
  const reply = simulatedReply({
    messages: [{ role: "user", content: "hi" }],
    response_format: { type: "json_schema", json_schema: { schema } },
  }, PLAIN);
  deepEqual(JSON.parse(reply.tokens.join("")), { answer: 'Turn 1: you said "hi".', n: 3 });
});

Deno.test("sample: the least value of each kind of schema", () => {
  equal(sample({ const: 7 }, {}), 7);
  equal(sample({ enum: ["b", "a"] }, {}), "b");
  equal(sample({ type: "string", minLength: 3 }, {}), "xxx");
  equal(sample({ type: "number", minimum: 1.5 }, {}), 1.5);
  equal(sample({ type: ["null", "boolean"] }, {}), false);
  deepEqual(sample({ type: "array", minItems: 2, items: { type: "integer" } }, {}), [0, 0]);
  deepEqual(sample({ anyOf: [{ type: "string", maxLength: 2 }] }, { text: "hello" }), "he");
  equal(sample(undefined, {}), null);
});

Deno.test("simulated reply: graded answers name the model and prompt; good as often as the quality", () => {
  const graded = (model: string, quality: number, messages = CHAT) =>
    simulatedReply({ messages }, { ...PLAIN, graded: { model, quality } }).tokens.join("");
  match(graded("m", 1), /^<sim model=m prompt=[0-9a-f]{8} quality=1 outcome=good> \[Maze guide\]/);
  const other = [{ role: "system", content: "# Other" }, ...CHAT.slice(1)];
  const hash = (text: string) => /prompt=([0-9a-f]{8})/.exec(text)![1];
  equal(hash(graded("m", 1)), hash(graded("x", 0)));
  equal(hash(graded("m", 1)) === hash(graded("m", 1, other)), false);
  match(graded("m", 0), /outcome=bad/);
  // 1,000 conversations at 0.8: good 800 times on average, standard deviation 12.6.
  let good = 0;
  for (let i = 0; i < 1000; i++) {
    const messages = [CHAT[0], { role: "user", content: `move ${i}` }];
    if (graded("m", 0.8, messages).includes("outcome=good")) good++;
  }
  ok(good > 750 && good < 850, `${good} of 1000 good`);
  // The same conversation, the same outcome.
  equal(graded("m", 0.5), graded("m", 0.5));
});

Deno.test("simulated reply: a bad graded answer to a JSON format is not valid JSON", () => {
  const format = {
    type: "json_schema",
    json_schema: { schema: { type: "object", properties: { hint: { type: "string" } } } },
  };
  const text = (quality: number) =>
    simulatedReply({ messages: CHAT, response_format: format }, {
      ...PLAIN,
      graded: { model: "m", quality },
    }).tokens.join("");
  match(JSON.parse(text(1)).hint, /outcome=good/);
  let parsed = true;
  try {
    JSON.parse(text(0));
  } catch {
    parsed = false;
  }
  equal(parsed, false);
});
