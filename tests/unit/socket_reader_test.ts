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

/**
 * A connection whose reads return `pieces` after waiting the given
 * milliseconds of the clock `clock`, logging each read and each tick waited
 * for in `log`.
 */
function trickle(pieces: [waitMs: number, text: string][], log: string[]) {
  const clock = { now: 0 };
  const queue = [...pieces];
  const conn: Readable = {
    read(buffer) {
      const next = queue.shift();
      if (next === undefined) return Promise.resolve(null);
      const [waitMs, piece] = next;
      clock.now += waitMs;
      log.push(`read ${piece.replace(/\r\n/g, " ").trim()}`);
      const bytes = ENCODER.encode(piece);
      buffer.set(bytes);
      return Promise.resolve(bytes.length);
    },
  };
  const pacing = {
    now: () => clock.now,
    tick: () => {
      log.push("tick");
      return Promise.resolve();
    },
  };
  return { conn, pacing };
}

const frame = (text: string) => `${text.length.toString(16)}\r\n${text}\r\n`;
const HEAD = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";

Deno.test("socket reader: a body whose frames trickle in is read once a tick, after its first reads", async () => {
  const log: string[] = [];
  const { conn, pacing } = trickle([
    [0, HEAD + frame("a")],
    [2, frame("b")],
    [2, frame("c")],
    [0, frame("d") + frame("e")],
    [0, frame("f") + "0\r\n\r\n"],
  ], log);
  const reader = new SocketReader(conn, pacing);
  await reader.head();
  deepEqual(await text(reader.chunked()), ["a", "b", "c", "de", "f"]);
  deepEqual(log, [
    "read HTTP/1.1 200 OK transfer-encoding: chunked  1 a",
    "read 1 b",
    "read 1 c",
    "tick",
    "read 1 d 1 e",
    "tick",
    "read 1 f 0",
  ]);
});

Deno.test("socket reader: a burst, and an engine slower than half a tick, are read as they come", async () => {
  for (const waitMs of [0, 10, 25]) {
    const log: string[] = [];
    const { conn, pacing } = trickle([
      [0, HEAD + frame("a")],
      [waitMs, frame("b")],
      [waitMs, frame("c")],
      [waitMs, frame("d")],
      [waitMs, "0\r\n\r\n"],
    ], log);
    const reader = new SocketReader(conn, { ...pacing, tickMs: 20 });
    await reader.head();
    deepEqual(await text(reader.chunked()), ["a", "b", "c", "d"]);
    equal(log.includes("tick"), false, `frames ${waitMs} ms apart`);
  }
});
