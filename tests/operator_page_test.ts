/**
 * The operator's HTTP endpoint against a web page that attacks it from the
 * operator's own browser: DNS rebinding (a name of the attacker's pointed at
 * 127.0.0.1, so the browser sends `Host: rebind.evil.example:PORT` and a
 * matching Origin), a `null` Origin, and a guessing loop on the page's token.
 * The service as a child process, raw HTTP requests (a browser's headers,
 * which `fetch` would not let a test set).
 */

import assert, { equal, match } from "node:assert/strict";
import { freePort, mosquittoTest as test, withService } from "./_helpers.ts";

/** One HTTP/1.1 request, written as a browser would send it; the status and body. */
async function raw(
  port: number,
  request: { method?: string; path: string; headers: Record<string, string>; body?: string },
): Promise<{ status: number; text: string }> {
  const body = request.body ?? "";
  const head = [
    `${request.method ?? "GET"} ${request.path} HTTP/1.1`,
    ...Object.entries(request.headers).map(([name, value]) => `${name}: ${value}`),
    `content-length: ${new TextEncoder().encode(body).length}`,
    "connection: close",
    "",
    "",
  ].join("\r\n");
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(new TextEncoder().encode(head + body));
  let text = "";
  const decoder = new TextDecoder();
  for await (const chunk of conn.readable) text += decoder.decode(chunk, { stream: true });
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1]);
  return { status, text: text.slice(text.indexOf("\r\n\r\n") + 4) };
}

const tryIt = (message: string) =>
  JSON.stringify({ project: "maze", session_id: "dashboard-abcdefgh", message });

test("operator page: DNS rebinding and a null Origin are refused (403, nothing logged but a line); its own origin is served", async () => {
  const port = freePort();
  await withService({ args: [`--http-port=${port}`] }, async ({ sim, service }) => {
    const evil = `rebind.evil.example:${port}`;
    for (const path of ["/status", "/metrics", "/", "/dashboard/events"]) {
      const read = await raw(port, { path, headers: { host: evil } });
      equal(read.status, 403, path);
      match(read.text, /unknown Host/);
    }
    const driven = await raw(port, {
      method: "POST",
      path: "/dashboard/try",
      headers: {
        host: evil,
        origin: `http://${evil}`,
        "content-type": "application/json",
      },
      body: tryIt("prompt the GPU"),
    });
    equal(driven.status, 403);
    const nullOrigin = await raw(port, {
      method: "POST",
      path: "/dashboard/try",
      headers: { host: `127.0.0.1:${port}`, origin: "null", "content-type": "application/json" },
      body: tryIt("from a sandboxed frame"),
    });
    equal(nullOrigin.status, 403);
    equal(sim.received.length, 0, "the engine was prompted");
    // The page's own origin is served: the answer streams back.
    const own = await raw(port, {
      method: "POST",
      path: "/dashboard/try",
      headers: {
        host: `127.0.0.1:${port}`,
        origin: `http://127.0.0.1:${port}`,
        "content-type": "application/json",
      },
      body: tryIt("hello"),
    });
    equal(own.status, 200);
    match(own.text, /"type":"done"/);
    const log = service.log();
    assert(!/Uncaught|\n\s+at /.test(log), `a stack trace in the log:\n${log.slice(-2000)}`);
  });
});

test("operator page: --http-allowed-hosts names the hosts it is reached by", async () => {
  const port = freePort();
  await withService(
    { args: [`--http-port=${port}`, "--http-allowed-hosts=vllm-mqtt,.ops.example"] },
    async () => {
      for (const host of ["vllm-mqtt", "grafana.ops.example", "localhost", "127.0.0.1"]) {
        equal(
          (await raw(port, { path: "/status", headers: { host: `${host}:${port}` } })).status,
          200,
          host,
        );
      }
      equal((await raw(port, { path: "/status", headers: { host: "ops.evil" } })).status, 403);
    },
  );
});

test("operator page: wrong tokens are throttled: ten answered, then 429 unchecked", async () => {
  const port = freePort();
  const token = "dashboard-Token-0123456789";
  await withService(
    { args: [`--http-port=${port}`], env: { VLLM_MQTT_DASHBOARD_TOKEN: token } },
    async () => {
      const host = `127.0.0.1:${port}`;
      const statuses: number[] = [];
      for (let i = 0; i < 30; i++) {
        const guess = await raw(port, {
          path: "/dashboard/events",
          headers: { host, authorization: `Bearer guess-${i}-0123456789` },
        });
        statuses.push(guess.status);
      }
      equal(statuses.filter((s) => s === 401).length, 10, statuses.join(" "));
      equal(statuses.filter((s) => s === 429).length, 20, statuses.join(" "));
      // Even the right token waits now: a guess that happened to be right would tell nothing.
      const right = await raw(port, {
        path: "/status",
        headers: { host, authorization: `Bearer ${token}` },
      });
      equal(right.status, 200, "/status needs no token");
      const page = await raw(port, {
        path: "/",
        headers: { host, authorization: `Bearer ${token}` },
      });
      equal(page.status, 429);
    },
  );
});
