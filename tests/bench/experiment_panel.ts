/**
 * The live page's experiment panel and the guardrail, one refresh each, with
 * a project's experiment holding N outcomes and N ratings over a tenth as many
 * sessions (two variants, 90/10) in memory: the gateway's thread does this work
 * every 2 s while the page is open, and every `--guardrail-interval`.
 *
 * `deno run -A tests/bench/experiment_panel.ts [N...]` (default 5000 50000):
 * prints, per N, the median milliseconds of 20 refreshes of each.
 */

import { ExperimentMonitor } from "../../lib/observability/experiment_monitor.ts";

const REFRESHES = 20;

async function measure(records: number): Promise<{ panel: number; guardrail: number }> {
  const kv = await Deno.openKv(":memory:");
  let now = 1_000_000_000;
  const monitor = await ExperimentMonitor.open({
    kv,
    ownsStore: true,
    experiments: new Map([["maze", { salt: "x1", variants: ["a", "b"] }]]),
    // Margins no variant breaches: the check's work is measured, nothing is stopped.
    guardrail: { intervalMs: 3_600_000, errorRate: 1, ttfd: 1e9, minSessions: 2 },
    panelCacheMs: 0,
    now: () => now,
  });
  const sessions = Math.max(2, Math.floor(records / 5));
  // A deterministic spread of latencies and errors (a linear congruential generator).
  let seed = 42;
  const random = () => (seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31) / 2 ** 31;
  for (let i = 0; i < records; i++) {
    const session = i % sessions;
    const variant = session % 10 === 0 ? "b" : "a";
    const ok = random() > 0.03;
    const ttfdMs = 50 + Math.floor(random() * 400);
    monitor.turnEnded("maze", `s${session}`, `r${i}`, variant, {
      ok,
      ...(ok ? { ttfdMs } : { errorCode: "engine_error" }),
      totalMs: ttfdMs + Math.floor(random() * 3000),
      tokensIn: 100,
      tokensOut: 200,
    });
    now++;
  }
  for (let i = 0; i < records; i++) {
    monitor.feedbackStored("maze", {
      sessionId: `s${i % sessions}`,
      requestId: `r${i}`,
      score: random() > 0.4 ? 1 : 0,
      at: now++,
    });
  }
  await monitor.flushed();
  const median = async (work: () => Promise<unknown>) => {
    const times: number[] = [];
    for (let i = 0; i < REFRESHES; i++) {
      now += 1; // a new refresh each time: nothing cached
      const start = performance.now();
      await work();
      times.push(performance.now() - start);
    }
    times.sort((a, b) => a - b);
    return Math.round(times[Math.floor(times.length / 2)] * 100) / 100;
  };
  const panel = await median(() => monitor.panels());
  const guardrail = await median(() => monitor.checkGuardrail());
  await monitor.close();
  return { panel, guardrail };
}

const sizes = Deno.args.length > 0 ? Deno.args.map(Number) : [5_000, 50_000];
for (const records of sizes) {
  const { panel, guardrail } = await measure(records);
  console.log(
    `${records} outcomes, ${records} ratings, ${Math.floor(records / 5)} sessions: ` +
      `panel refresh ${panel} ms, guardrail check ${guardrail} ms (median of ${REFRESHES})`,
  );
}
