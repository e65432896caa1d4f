/**
 * The engine client's own HTTP/1.1 connections (lib/engine/http_stream.ts):
 * bodies unframed whatever their framing, kept-alive connections reused, and
 * one the server closed while it was idle replaced without an error.
 */

import { deepEqual, equal } from "node:assert/strict";
import { HttpStreamClient } from "../lib/engine/http_stream.ts";

const ENCODER = new TextEncoder();
const DECODER = new TextDecoder();

/**
 * A raw TCP server answering each request on a connection with the next of
 * `answers` (whole HTTP responses); `closeAfter` answers, it closes the connection.
 */
function server(answers: string[], closeAfter: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let connections = 0;
  let next = 0;
  const handling: Promise<void>[] = [];
  const accepting = (async () => {
    for await (const conn of listener) {
      connections++;
      handling.push((async () => {
        const buffer = new Uint8Array(65536);
        try {
          for (let served = 0; served < closeAfter; served++) {
            let head = "";
            while (!head.includes("\r\n\r\n")) {
              const n = await conn.read(buffer);
              if (n === null) return;
              head += DECODER.decode(buffer.subarray(0, n));
            }
            await conn.write(ENCODER.encode(answers[next++ % answers.length]));
          }
        } finally {
          conn.close();
        }
      })());
    }
  })();
  const { port } = listener.addr as Deno.NetAddr;
  return {
    url: new URL(`http://127.0.0.1:${port}/v1/chat/completions`),
    connections: () => connections,
    async close() {
      listener.close();
      await accepting.catch(() => {});
      await Promise.all(handling);
    },
  };
}

async function text(client: HttpStreamClient): Promise<[number, string]> {
  const response = await client.post(
    "/v1/chat/completions",
    {},
    "{}",
    new AbortController().signal,
  );
  let body = "";
  for await (const bytes of response.body) body += DECODER.decode(bytes);
  return [response.status, body];
}

const CHUNKED = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" +
  "5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n";
const LENGTH = "HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nbad";

Deno.test("http stream: chunked and content-length bodies, on one kept-alive connection", async () => {
  const engine = server([CHUNKED, LENGTH], 100);
  const client = new HttpStreamClient(engine.url);
  try {
    deepEqual(await text(client), [200, "hello world"]);
    deepEqual(await text(client), [400, "bad"]);
    deepEqual(await text(client), [200, "hello world"]);
    equal(engine.connections(), 1);
  } finally {
    client.close();
    await engine.close();
  }
});

Deno.test("http stream: a kept-alive connection the engine closed is replaced; a body ending at close is read whole", async () => {
  const engine = server([CHUNKED], 1);
  const client = new HttpStreamClient(engine.url);
  try {
    deepEqual(await text(client), [200, "hello world"]);
    // The server closed that connection after one answer: the next request opens another.
    await new Promise((resolve) => setTimeout(resolve, 50));
    deepEqual(await text(client), [200, "hello world"]);
    equal(engine.connections(), 2);
  } finally {
    client.close();
    await engine.close();
  }
  const closing = server(["HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"], 1);
  const other = new HttpStreamClient(closing.url);
  try {
    deepEqual(await text(other), [200, "until the end"]);
  } finally {
    other.close();
    await closing.close();
  }
});
