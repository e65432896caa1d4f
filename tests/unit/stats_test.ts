/**
 * Request statistics on an injected clock: what a report counts over its
 * interval and since start, and what `/metrics` shows.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { type Gauges, Stats } from "../../lib/observability/stats.ts";

const gauges: Gauges = {
  queued: 2,
  inFlight: 1,
  liveSessions: 5,
  engineReady: true,
  engineRestarts: { crash: 1 },
};

const took = (totalMs: number) => ({ queueMs: 1, ttftMs: null, totalMs });

Deno.test("stats: a report covers its interval; totals run on; the next starts afresh", () => {
  let now = 50_000;
  const stats = new Stats(() => gauges, { now: () => now });
  for (let i = 1; i <= 20; i++) {
    stats.request();
    stats.answered("maze", took(i * 10), null);
  }
  stats.request();
  stats.error("maze", "timeout");
  stats.unaddressable("invalid_request");
  stats.ignored("retained");
  stats.brokerReconnected();
  now += 12_340;
  const first = stats.report();
  deepEqual(first, {
    interval_s: 12.3,
    requests: 21,
    answered: 20,
    errors: { timeout: 1, invalid_request: 1 },
    error_rate: 0.0952,
    latency_ms: { avg: 105, p50: 110, p95: 200 },
    rejected_unaddressable: 1,
    ignored: { retained: 1 },
    queued: 2,
    in_flight: 1,
    live_sessions: 5,
    engine: { ready: true, restarts: { crash: 1 } },
    broker_reconnects: 1,
    totals: { requests: 21, answered: 20, errors: 2 },
  });
  now += 1_000;
  stats.request();
  const second = stats.report();
  equal(second.interval_s, 1);
  deepEqual([second.requests, second.answered, second.error_rate], [1, 0, 0]);
  deepEqual([second.errors, second.ignored, second.latency_ms], [{}, {}, null]);
  // Reconnections are counted since start, like the totals.
  equal(second.broker_reconnects, 1);
  deepEqual(second.totals, { requests: 22, answered: 20, errors: 2 });
});

Deno.test("stats: /metrics holds outcomes by project, histograms, tokens and the gauges", () => {
  const stats = new Stats(() => gauges);
  stats.answered("maze", { queueMs: 2, ttftMs: 30, totalMs: 400 }, {
    prompt_tokens: 11,
    completion_tokens: 7,
    total_tokens: 18,
  });
  stats.error('ma"ze', "queue_full");
  stats.unaddressable("payload_too_large");
  stats.ignored("duplicate");
  const text = stats.prometheus();
  const has = (line: string) => assert(text.split("\n").includes(line), line);
  has('vllm_mqtt_requests_total{project="maze",outcome="answered"} 1');
  has('vllm_mqtt_requests_total{project="ma\\"ze",outcome="queue_full"} 1');
  has('vllm_mqtt_unaddressable_total{code="payload_too_large"} 1');
  has('vllm_mqtt_ignored_total{reason="duplicate"} 1');
  has('vllm_mqtt_request_duration_seconds_bucket{le="0.25"} 0');
  has('vllm_mqtt_request_duration_seconds_bucket{le="0.5"} 1');
  has('vllm_mqtt_request_duration_seconds_bucket{le="+Inf"} 1');
  has("vllm_mqtt_request_duration_seconds_sum 0.4");
  has('vllm_mqtt_time_to_first_token_seconds_bucket{le="0.05"} 1');
  has('vllm_mqtt_prompt_tokens_total{project="maze"} 11');
  has('vllm_mqtt_generation_tokens_total{project="maze"} 7');
  has("vllm_mqtt_queue_depth 2");
  has("vllm_mqtt_in_flight 1");
  has("vllm_mqtt_live_sessions 5");
  has("vllm_mqtt_engine_up 1");
  has('vllm_mqtt_engine_restarts_total{cause="crash"} 1');
  match(text, /\n$/);
});

Deno.test("stats: watchers see each event until they stop watching", () => {
  const stats = new Stats(() => gauges);
  const seen: string[] = [];
  const stop = stats.watch((event) => seen.push(event.kind));
  stats.answered("maze", took(1), null);
  stats.error("maze", "timeout");
  stats.ignored("superseded");
  stats.brokerReconnected();
  stop();
  stats.answered("maze", took(1), null);
  deepEqual(seen, ["answered", "error", "ignored", "reconnected"]);
});

Deno.test("stats: /metrics has a broker reconnect count from the start, 0 until one", () => {
  const stats = new Stats(() => gauges);
  const lines = () => stats.prometheus().split("\n");
  assert(lines().includes("vllm_mqtt_broker_reconnects_total 0"), stats.prometheus());
  stats.brokerReconnected();
  assert(lines().includes("vllm_mqtt_broker_reconnects_total 1"), stats.prometheus());
});
