import { deepEqual } from "node:assert/strict";
import type { LogRecord } from "@logtape/logtape";
import { jsonLine, LogThrottle } from "../../lib/log.ts";

Deno.test("log throttle: one line per kind a minute, the next one counts what was left out", () => {
  let now = 0;
  const throttle = new LogThrottle({ now: () => now });
  const taken: (number | undefined)[] = [];
  taken.push(throttle.take("a"));
  for (let i = 0; i < 5; i++) {
    now += 1000;
    taken.push(throttle.take("a"));
  }
  // Another kind is not held back by the first.
  taken.push(throttle.take("b"));
  now = 60_000;
  taken.push(throttle.take("a"), throttle.take("a"));
  deepEqual(taken, [0, undefined, undefined, undefined, undefined, undefined, 0, 5, undefined]);
});

Deno.test("log throttle: the interval is the caller's", () => {
  let now = 0;
  const throttle = new LogThrottle({ everyMs: 10, now: () => now });
  deepEqual([throttle.take("a"), throttle.take("a")], [0, undefined]);
  now = 10;
  deepEqual(throttle.take("a"), 1);
});

Deno.test("JSON log lines: values inside the message as the text format has them", () => {
  const record: LogRecord = {
    category: ["vllm-mqtt", "http"],
    level: "warning",
    message: ["HTTP endpoint on http://", "127.0.0.1", ":", 18081, " serving ", ["a", "b"]],
    rawMessage: "HTTP endpoint on http://{host}:{port} serving {paths}",
    timestamp: Date.UTC(2026, 11, 6, 12, 0, 0),
    properties: { host: "127.0.0.1", port: 18081, paths: ["a", "b"] },
  };
  deepEqual(JSON.parse(jsonLine(record)), {
    "@timestamp": "2026-12-06T12:00:00.000Z",
    level: "WARN",
    message: 'HTTP endpoint on http://127.0.0.1:18081 serving ["a","b"]',
    logger: "vllm-mqtt.http",
    properties: { host: "127.0.0.1", port: 18081, paths: ["a", "b"] },
  });
});
