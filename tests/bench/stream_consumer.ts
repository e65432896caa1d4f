/**
 * The CPU benchmark's baselines, each in a process of its own: the same
 * streams the service reads, consumed by the `openai` client alone
 * (`openai`), or by a plain `fetch` with a line-based SSE reader that parses
 * each event's JSON (`fetch`, the floor). After a warm-up it runs `answers`
 * completions, `concurrency` at a time, and prints its own CPU time (from
 * `/proc/self/stat`, as the service's is read) and the content chunks it read.
 *
 * `deno run -A tests/bench/stream_consumer.ts '{"url": ..., "mode": "openai", ...}'`
 *
 * @module
 */

import OpenAI from "openai";
import { cpuMs } from "./cpu_time.ts";

interface ConsumerOptions {
  readonly url: string;
  readonly mode: "openai" | "fetch";
  readonly answers: number;
  readonly concurrency: number;
  readonly maxTokens: number;
  readonly systemPrompt: string;
}

const options: ConsumerOptions = JSON.parse(Deno.args[0]);
const messages = (i: number) => [
  { role: "system" as const, content: options.systemPrompt },
  { role: "user" as const, content: `tell me a long story ${i}` },
];

const client = new OpenAI({ baseURL: options.url, apiKey: "bench", maxRetries: 0 });

async function viaOpenai(i: number): Promise<number> {
  const stream = await client.chat.completions.create({
    model: "bench-model",
    messages: messages(i),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: options.maxTokens,
  });
  let text = "";
  let chunks = 0;
  for await (const chunk of stream) {
    const piece = chunk.choices[0]?.delta?.content;
    if (piece) {
      text += piece;
      chunks++;
    }
  }
  return text.length > 0 ? chunks : 0;
}

async function viaFetch(i: number): Promise<number> {
  const response = await fetch(`${options.url}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer bench" },
    body: JSON.stringify({
      model: "bench-model",
      messages: messages(i),
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: options.maxTokens,
    }),
  });
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  let chunks = 0;
  for await (const bytes of response.body!) {
    buffer += decoder.decode(bytes, { stream: true });
    let start = 0;
    for (let end; (end = buffer.indexOf("\n", start)) !== -1; start = end + 1) {
      if (!buffer.startsWith("data: ", start)) continue;
      const data = buffer.slice(start + 6, end);
      if (data === "[DONE]") continue;
      const piece = JSON.parse(data).choices[0]?.delta?.content;
      if (piece) {
        text += piece;
        chunks++;
      }
    }
    buffer = buffer.slice(start);
  }
  return text.length > 0 ? chunks : 0;
}

const one = options.mode === "openai" ? viaOpenai : viaFetch;

async function drive(answers: number): Promise<number> {
  let next = 0;
  let chunks = 0;
  await Promise.all(Array.from({ length: options.concurrency }, async () => {
    while (next < answers) {
      const read = await one(next++);
      chunks += read;
    }
  }));
  return chunks;
}

// Warm-up as long as a measured run, as the service gets: compiled code, connections.
await drive(options.answers);
const before = cpuMs(Deno.pid);
const tokens = await drive(options.answers);
const cpu = cpuMs(Deno.pid) - before;
console.log(JSON.stringify({ cpu_ms: cpu, tokens }));
