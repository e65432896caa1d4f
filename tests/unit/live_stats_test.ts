/**
 * The live page's per-second statistics, on an injected clock: which seconds
 * a point's percentiles and the summary cover, what is listed while idle,
 * and that closing stops the counting.
 */

import { deepEqual, equal } from "node:assert/strict";
import { LiveStats } from "../../lib/observability/live_stats.ts";
import { type RequestDurations, Stats } from "../../lib/observability/stats.ts";

const GAUGES = {
  queued: 0,
  inFlight: 0,
  liveSessions: 0,
  engineReady: true,
  engineRestarts: {},
};

/** A `Stats` feeding a `LiveStats` whose clock is `clock.now` (milliseconds). */
function setup(options: { historyS?: number; smoothS?: number; summaryS?: number } = {}) {
  const clock = { now: 1_000_000 };
  const stats = new Stats(() => GAUGES);
  const live = new LiveStats(stats, ["maze", "general"], { ...options, now: () => clock.now });
  return { clock, stats, live };
}

const took = (totalMs: number, ttftMs: number | null = null): RequestDurations => ({
  queueMs: 0,
  ttftMs,
  totalMs,
});

Deno.test("live stats: a point's percentiles cover the last smoothS seconds up to it", () => {
  const { clock, stats, live } = setup({ smoothS: 3 });
  const start = live.second;
  stats.answered("maze", took(10, 4), null);
  clock.now += 2000;
  stats.answered("maze", took(30, 8), null);
  clock.now += 5000;
  const at = (t: number) => {
    const p = live.point(t);
    return [p.requests.maze, p.p50_ms, p.ttft_p50_ms];
  };
  deepEqual(at(start), [1, 10, 4]);
  deepEqual(at(start + 1), [0, 10, 4]);
  deepEqual(at(start + 2), [1, 30, 8]);
  deepEqual(at(start + 3), [0, 30, 8]);
  deepEqual(at(start + 4), [0, 30, 8]);
  deepEqual(at(start + 5), [0, null, null]);
  live.close();
});

Deno.test("live stats: the summary covers the last summaryS full seconds, totals all time", () => {
  const { clock, stats, live } = setup({ summaryS: 5 });
  stats.answered("maze", took(20), null);
  // The second still running is not in the summary.
  equal(live.summary().projects.maze.requests, 0);
  clock.now += 1000;
  equal(live.summary().projects.maze.requests, 1);
  equal(live.summary().projects.maze.rps, 0.2);
  clock.now += 4000;
  equal(live.summary().projects.maze.requests, 1);
  clock.now += 1000;
  const later = live.summary();
  equal(later.projects.maze.requests, 0);
  equal(later.projects.maze.p50_ms, null);
  equal(later.totals.answered, 1);
  equal(later.window_s, 5);
  live.close();
});

Deno.test("live stats: idle projects are listed; an error of no project counts as an error only", () => {
  const { clock, stats, live } = setup();
  stats.unaddressable("invalid_request");
  stats.error("other", "timeout");
  clock.now += 1000;
  const point = live.point(live.second - 1);
  deepEqual(point.requests, { maze: 0, general: 0, other: 1 });
  equal(point.errors, 1);
  const summary = live.summary();
  deepEqual(Object.keys(summary.projects).sort(), ["general", "maze", "other"]);
  deepEqual(summary.errors, { invalid_request: 1, timeout: 1 });
  deepEqual(summary.totals.errors, { invalid_request: 1, timeout: 1 });
  live.close();
});

Deno.test("live stats: history is historyS points, oldest first, up to the last full second", () => {
  const { clock, stats, live } = setup({ historyS: 4, smoothS: 1 });
  const start = live.second;
  stats.answered("maze", took(5), null);
  clock.now += 2000;
  const history = live.history();
  deepEqual(history.map((p) => p.t), [start - 2, start - 1, start, start + 1]);
  deepEqual(history.map((p) => p.requests.maze), [0, 0, 1, 0]);
  live.close();
});

Deno.test("live stats: old seconds are forgotten; after close nothing more is counted", () => {
  const { clock, stats, live } = setup({ historyS: 2, smoothS: 1, summaryS: 2 });
  const start = live.second;
  stats.answered("maze", took(5), null);
  clock.now += 10_000;
  // A new second's first event prunes what no view can reach any more.
  stats.answered("maze", took(5), null);
  equal(live.point(start).requests.maze, 0);
  live.close();
  stats.answered("maze", took(5), null);
  stats.brokerReconnected();
  clock.now += 1000;
  equal(live.point(live.second - 1).requests.maze, 1);
  equal(live.summary().totals.answered, 2);
  equal(live.summary().broker_reconnects, 0);
});
