/** Buffered reads of an HTTP/1.1 answer (lib/engine/socket_reader.ts), from a stand-in connection. */

import { deepEqual, equal, rejects } from "node:assert/strict";
import { type Readable, SocketReader } from "../../lib/engine/socket_reader.ts";

const ENCODER = new TextEncoder();
const DECODER = new TextDecoder();

/** A connection whose reads return `pieces`, one each, then the end. */
function connection(...pieces: string[]): Readable {
  const queue = pieces.map((piece) => ENCODER.encode(piece));
  return {
    read(buffer) {
      const next = queue.shift();
      if (next === undefined) return Promise.resolve(null);
      buffer.set(next);
      return Promise.resolve(next.length);
    },
  };
}

async function text(frames: AsyncIterable<Uint8Array>): Promise<string[]> {
  const out: string[] = [];
  for await (const frame of frames) out.push(DECODER.decode(frame));
  return out;
}

Deno.test("socket reader: the head, then a chunked body, as many chunks at once as have arrived", async () => {
  const reader = new SocketReader(connection(
    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1;x=y\r\n \r\n",
    "5\r\nwor",
    "ld\r\n0\r\n\r\n",
  ));
  equal(DECODER.decode(await reader.head()), "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked");
  deepEqual(await text(reader.chunked()), ["hello ", "wor", "ld"]);
  equal(reader.pending, false);
});

Deno.test("socket reader: a head split anywhere, and bytes beyond the answer are pending", async () => {
  const reader = new SocketReader(connection("HTTP/1.1 204 No", " Content\r\n\r", "\nextra"));
  equal(DECODER.decode(await reader.head()), "HTTP/1.1 204 No Content");
  equal(reader.pending, true);
});

Deno.test("socket reader: content-length bodies; fewer bytes is an error", async () => {
  const whole = new SocketReader(connection("abc", "defg"));
  deepEqual(await text(whole.exactly(6)), ["abc", "def"]);
  equal(whole.pending, true);
  const short = new SocketReader(connection("abc"));
  await rejects(text(short.exactly(6)), /ended before its content-length/);
});

Deno.test("socket reader: a body up to the end of the connection", async () => {
  deepEqual(await text(new SocketReader(connection("a", "b")).untilClose()), ["a", "b"]);
});

Deno.test("socket reader: malformed or cut chunked bodies are errors", async () => {
  await rejects(text(new SocketReader(connection("zz\r\nab\r\n")).chunked()), /malformed/);
  await rejects(text(new SocketReader(connection("2\r\nabX\r\n")).chunked()), /malformed/);
  await rejects(text(new SocketReader(connection("5\r\nab")).chunked()), /in the middle/);
});

Deno.test("socket reader: a connection closed before the head is an error", async () => {
  await rejects(new SocketReader(connection("HTTP/1.1 200")).head(), /closed the connection/);
});
