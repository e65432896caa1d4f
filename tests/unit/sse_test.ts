/** The server-sent events reader of the engine's streams (lib/engine/sse.ts). */

import { deepEqual } from "node:assert/strict";
import { sseData } from "../../lib/engine/sse.ts";

const ENCODER = new TextEncoder();

/** The `data` of each event of a body arriving in `pieces`. */
async function events(...pieces: (string | Uint8Array)[]): Promise<string[]> {
  async function* body() {
    for (const piece of pieces) yield typeof piece === "string" ? ENCODER.encode(piece) : piece;
  }
  const out: string[] = [];
  for await (const data of sseData(body())) out.push(data);
  return out;
}

Deno.test("sse: events end at a blank line, with LF or CRLF", async () => {
  deepEqual(await events("data: a\n\ndata: b\r\n\r\ndata: [DONE]\n\n"), ["a", "b", "[DONE]"]);
});

Deno.test("sse: events and lines split across reads, a character split across reads", async () => {
  const euro = ENCODER.encode("data: €\n\n");
  deepEqual(
    await events(
      "da",
      "ta: one\n",
      "\ndata: t",
      "wo\r",
      "\n\r\n",
      euro.subarray(0, 7),
      euro.subarray(7),
    ),
    ["one", "two", "€"],
  );
});

Deno.test("sse: other fields and comments are skipped; multi-line data is joined", async () => {
  deepEqual(
    await events(": keep-alive\n\nevent: x\nid: 1\ndata: first\ndata:second\n\n"),
    ["first\nsecond"],
  );
});

Deno.test("sse: a last event without its blank line still counts", async () => {
  deepEqual(await events("data: a\n\ndata: last"), ["a", "last"]);
});

Deno.test("sse: no body, no events", async () => {
  const out: string[] = [];
  for await (const data of sseData(null)) out.push(data);
  deepEqual(out, []);
});
