/**
 * (d) of `deno task bench`: 10,000 new sessions, 256 at a time, and the
 * service's memory before, at the end of the burst (its peak) and after 30
 * idle seconds. `BENCH_BURST_LOG=<folder>` writes the service's log there, as
 * `service.log` or `<compared checkout's folder name>.log` (with
 * `BENCH_DENO_FLAGS=--v8-flags=--trace-gc`, each thread's heap at each
 * collection) and its `/proc/PID/smaps_rollup` at the end of the burst, to say
 * what the peak is made of.
 */

import { drive, memoryMb, round, run, startSimulator } from "./harness.ts";

/** One burst's figures. */
export interface BurstRow {
  readonly sessions: number;
  readonly live_sessions: number;
  readonly rps: number;
  readonly service_rss_before_mb: number;
  readonly service_rss_after_load_mb: number;
  readonly service_rss_settled_mb: number;
  readonly service_peak_rss_mb: number;
}

/** Runs the burst against the service of checkout `root` (this one by default). */
export async function burstBench(brokerUrl: string, root?: string): Promise<BurstRow> {
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0, maxModelLen: 32768 });
  const bench = await run(brokerUrl, sim, ["--max-sessions=20000"], 32, root);
  const before = memoryMb(bench.service.child.pid);
  const sessions = 10_000;
  const tag = crypto.randomUUID().slice(0, 8);
  await bench.load.prepare(
    Array.from({ length: sessions }, (_, i) => [i, `d${i}-${tag}`] as const),
  );
  const summary = await drive(sessions, 256, async (i) => {
    await bench.load.ask(i, `d${i}-${tag}`, `d${i}-${tag}`, `hello ${i}`);
    return undefined;
  });
  const status = await (await fetch(`http://127.0.0.1:${bench.httpPort}/status`)).json();
  const memory = memoryMb(bench.service.child.pid);
  const log = Deno.env.get("BENCH_BURST_LOG");
  // What the process's memory is made of at the peak: anonymous (heaps) or file-backed (code).
  const rollup = log ? Deno.readTextFileSync(`/proc/${bench.service.child.pid}/smaps_rollup`) : "";
  // Then the sessions only: V8 gives back the heap the burst grew after some idle seconds.
  let settled = memory.now;
  for (let waited = 0; waited < 30; waited += 2) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    settled = memoryMb(bench.service.child.pid).now;
  }
  if (log) {
    const name = root?.split("/").filter(Boolean).at(-1) ?? "service";
    await Deno.writeTextFile(`${log}/${name}.log`, `${bench.service.log()}\n${rollup}`);
  }
  await bench.stop();
  return {
    sessions,
    live_sessions: status.live_sessions,
    rps: round(summary.rps),
    service_rss_before_mb: before.now,
    service_rss_after_load_mb: memory.now,
    service_rss_settled_mb: settled,
    service_peak_rss_mb: memory.peak,
  };
}
