/**
 * The operator endpoint's first check, in process: Host names it knows (DNS
 * rebinding sends another), the request's own origin, and its own site.
 */

import { equal } from "node:assert/strict";
import { RequestOrigin, sameOrigin } from "../../lib/observability/request_origin.ts";

const request = (host: string | undefined, headers: Record<string, string> = {}, method = "GET") =>
  new Request(`http://127.0.0.1:8081/status`, {
    method,
    headers: { ...(host !== undefined && { host }), ...headers },
  });

const status = (check: RequestOrigin, r: Request) => check.refusal(r)?.status ?? 200;

Deno.test("request origin: known Host names only (loopback, IP addresses, configured)", () => {
  const check = new RequestOrigin({
    listenHost: "127.0.0.1",
    allowedHosts: ["vllm-mqtt", ".ops.example"],
  });
  for (
    const host of [
      "127.0.0.1:8081",
      "localhost:8081",
      "LOCALHOST",
      "app.localhost:8081",
      "[::1]:8081",
      "10.1.2.3:8081",
      "vllm-mqtt:8081",
      "a.ops.example",
    ]
  ) equal(status(check, request(host)), 200, host);
  for (
    const host of [
      "rebind.evil.example:8081",
      "localhost.evil.example",
      "ops.example",
      "vllm-mqtt.evil",
      "",
    ]
  ) equal(status(check, request(host)), 403, host);
  equal(status(check, request(undefined)), 403);
  // The name it listens on is known.
  equal(status(new RequestOrigin({ listenHost: "gpu-box" }), request("gpu-box:8081")), 200);
});

Deno.test("request origin: another, null or malformed Origin, or another site, is a 403", () => {
  const check = new RequestOrigin({ listenHost: "127.0.0.1" });
  const host = "127.0.0.1:8081";
  equal(status(check, request(host, { origin: "http://127.0.0.1:8081" }, "POST")), 200);
  for (const origin of ["null", "http://evil.example", "http://127.0.0.1:9999", "::", "file://x"]) {
    equal(status(check, request(host, { origin }, "POST")), 403, origin);
    equal(sameOrigin(request(host, { origin })), false, origin);
  }
  // A fetch from another site; a link followed to the page is fine.
  equal(
    status(check, request(host, { "sec-fetch-site": "cross-site", "sec-fetch-mode": "cors" })),
    403,
  );
  equal(
    status(
      check,
      request(host, { "sec-fetch-site": "same-site", "sec-fetch-mode": "no-cors" }, "POST"),
    ),
    403,
  );
  equal(
    status(check, request(host, { "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate" })),
    200,
  );
  equal(status(check, request(host, { "sec-fetch-site": "same-origin" }, "POST")), 200);
});
