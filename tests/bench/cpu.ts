/**
 * The bridge's own cost, in CPU time: what the service process
 * spends (user + system time of all its threads, from `/proc/PID/stat`, read
 * before and after) per answered request and per streamed token, against a
 * zero-latency engine stand-in. CPU time, unlike throughput, does not depend
 * on who else gets the machine's cores. Per token, the streams come paced (a
 * frame a token, {@linkcode GAP_MS} ms apart, as an engine sends them while it
 * generates: the headline) and back to back (many frames a read); the same
 * streams are also consumed by the `openai` client alone (the baseline) and by
 * a plain `fetch` with a line-based SSE reader (the floor), each in a process
 * of its own, measured the same way. The service is measured with its default
 * pool of Web Workers and with `--workers=0` (turns on the MQTT thread, no hop
 * between threads); `BENCH_COMPARE=<other checkouts, comma-separated>` adds
 * each checkout's service, default configuration, for an A/B in one run. Each figure is the
 * median of {@linkcode REPEATS} runs; the runs of what is compared take turns
 * (A, B, A, B...), so that a change in the machine's load falls on all of
 * them.
 *
 * @module
 */

import { drive, round, run, type Simulator } from "./harness.ts";
import type { StandInOptions } from "./engine_stand_in.ts";
import { cpuMs, threadCpuMs } from "./cpu_time.ts";

/** `BENCH_THREADS=1`: log each thread's CPU time and sleeps in a measured run (to stderr). */
const SHOW_THREADS = Deno.env.get("BENCH_THREADS") === "1";

/** Calls `fn`, then logs the CPU time each thread of `pid` spent meanwhile, when asked to. */
async function byThread<T>(pid: number, what: string, fn: () => Promise<T>): Promise<T> {
  if (!SHOW_THREADS) return await fn();
  const before = threadCpuMs(pid);
  const result = await fn();
  const spent = [...threadCpuMs(pid)].map(([thread, [user, system, sleeps]]) => {
    const [user0, system0, sleeps0] = before.get(thread) ?? [0, 0, 0];
    return [thread, `${user - user0}+${system - system0} ms, ${sleeps - sleeps0} sleeps`];
  }).filter(([, ms]) => !ms.startsWith("0+0 "));
  console.error(what, JSON.stringify(Object.fromEntries(spent)));
  return result;
}

/** Runs of each measurement; the median is reported. */
export const REPEATS = 3;

const median = (values: number[]) => [...values].sort((a, b) => a - b)[values.length >> 1];

/** The engine stand-in, on a thread of its own. */
async function startStandIn(options: StandInOptions): Promise<Simulator> {
  const worker = new Worker(new URL("./engine_stand_in.ts", import.meta.url), { type: "module" });
  const url = await new Promise<string>((resolve) => {
    worker.onmessage = (event: MessageEvent<{ url: string }>) => resolve(event.data.url);
    worker.postMessage(options);
  });
  return { url, close: () => Promise.resolve(worker.terminate()) };
}

/** One CPU measurement: the median and every run. */
export interface CpuFigure {
  readonly median: number;
  readonly runs: number[];
}

/** The service's CPU per answered request, with one configuration. */
export interface RequestFigure extends CpuFigure {
  readonly rps: number;
  readonly failed: number;
}

/** The service's CPU per streamed token, with one configuration. */
export interface TokenFigure extends CpuFigure {
  readonly failed: number;
}

/** Per streamed token, one pacing of the streams. */
export interface TokenRows {
  /** Milliseconds between an answer's chunks (0: back to back). */
  readonly gap_ms: number;
  readonly service: TokenFigure;
  /** The same with `--workers=0`. */
  readonly service_workers_0: TokenFigure;
  /** The services of `BENCH_COMPARE`'s checkouts, default configuration, by checkout. */
  readonly compare?: Record<string, TokenFigure>;
  readonly openai_client: CpuFigure;
  readonly fetch_sse_reader: CpuFigure;
}

/** What {@linkcode cpuBench} measured. */
export interface CpuResults {
  readonly per_request: {
    readonly unit: "ms";
    readonly sessions: number;
    readonly turns: number;
    readonly service: RequestFigure;
    /** The same with `--workers=0`. */
    readonly service_workers_0: RequestFigure;
    /** The services of `BENCH_COMPARE`'s checkouts, default configuration, by checkout. */
    readonly compare?: Record<string, RequestFigure>;
    /** The service over several engine stand-ins, by their number. */
    readonly engines?: Record<string, RequestFigure>;
    /** The service with its own simulated engines, by their number ({@linkcode SIM_ENGINES}). */
    readonly sim_engines?: Record<string, RequestFigure>;
  };
  readonly per_token: {
    readonly unit: "µs";
    readonly answers: number;
    readonly concurrency: number;
    readonly chunks_per_answer: number;
    readonly chars_per_chunk: number;
    /** A frame a token, {@linkcode GAP_MS} ms apart: the headline. */
    readonly paced: TokenRows;
    readonly back_to_back: TokenRows;
  };
}

const SESSIONS = 64;
const TURNS = 20;
const ANSWERS = 20;
const STREAMS = 10;
const CHUNKS = 1000;
const CHUNK_TEXT = "lorem ipsum"; // 11 characters
/** Milliseconds between the chunks of a paced stream. */
export const GAP_MS = 2;
const TOKENS = ANSWERS * CHUNKS;

/** A configuration of the service to measure. */
interface Variant {
  readonly name: string;
  readonly args: string[];
  /** Another checkout to run the service from. */
  readonly root?: string;
  /** Engine stand-ins, each on a thread of the benchmark's process (`--engine-url` lists them). */
  readonly engines?: number;
  /** Simulated engines the service runs itself (`--engine sim`), in place of the stand-ins. */
  readonly simEngines?: number;
}

/** `BENCH_COMPARE`'s checkouts, as paths ending in `/`. */
export const COMPARE_ROOTS = (Deno.env.get("BENCH_COMPARE") ?? "").split(",").filter(Boolean)
  .map((root) => root.replace(/\/?$/, "/"));

const VARIANTS: readonly Variant[] = [
  { name: "service", args: [] },
  { name: "service_workers_0", args: ["--workers=0"] },
  ...COMPARE_ROOTS.map((root) => ({ name: root, args: [], root })),
];

/** Simulated engines per answered request: the service's CPU must not grow with their number. */
export const SIM_ENGINES = [1, 4] as const;

/**
 * Per answered request only: the service over several engines, routed by the default policy:
 * {@linkcode SIM_ENGINES}'s last number of stand-ins (the service's own CPU alone), and its
 * own zero-latency simulated engines, each number of them. The simulators run in the service's
 * process (Web Workers), so their CPU counts too.
 */
const ENGINE_VARIANTS: readonly Variant[] = [
  {
    name: `service_engines_${SIM_ENGINES.at(-1)}`,
    args: [],
    engines: SIM_ENGINES.at(-1),
  },
  ...SIM_ENGINES.map((engines) => ({
    name: `service_sim_${engines}`,
    args: ["--engine=sim", `--sim-engines=${engines}`, "--sim-ttft=0", "--sim-itl=0"],
    simEngines: engines,
  })),
];

/** Something measured: warmed up once, then measured {@linkcode REPEATS} times. */
interface Subject<T> {
  warm(): Promise<void>;
  measure(run: number): Promise<T>;
  stop(): Promise<void>;
}

/**
 * Starts every subject and warms each up, then measures them in turns, run
 * by run, so that what the machine's load does to a run it does to all.
 */
async function interleaved<T>(
  subjects: Record<string, () => Promise<Subject<T>>>,
): Promise<Record<string, T[]>> {
  const started: [string, Subject<T>][] = [];
  try {
    for (const [name, start] of Object.entries(subjects)) started.push([name, await start()]);
    for (const [, subject] of started) await subject.warm();
    const runs: Record<string, T[]> = {};
    for (let r = 0; r < REPEATS; r++) {
      for (const [name, subject] of started) (runs[name] ??= []).push(await subject.measure(r));
    }
    return runs;
  } finally {
    for (const [, subject] of started) await subject.stop();
  }
}

/** Service CPU per answered request: non-streamed answers, history kept and saved. */
async function requestSubject(
  brokerUrl: string,
  variant: Variant,
): Promise<Subject<{ cpu: number; rps: number; failed: number }>> {
  // With `--engine=sim` the service's own simulators answer (the URL given is not used).
  const standIns = await Promise.all(
    Array.from(
      { length: variant.simEngines === undefined ? variant.engines ?? 1 : 0 },
      () => startStandIn({ chunks: 1, chunkText: "Noted; here is a short answer.", gapMs: 0 }),
    ),
  );
  const standIn = {
    url: standIns.map((engine) => engine.url).join(",") || "http://127.0.0.1:9/v1",
    close: async () => void await Promise.all(standIns.map((engine) => engine.close())),
  };
  const bench = await run(brokerUrl, standIn, variant.args, 32, variant.root);
  const pid = bench.service.child.pid;
  const tag = crypto.randomUUID().slice(0, 8);
  let failed = 0;
  const session = async (name: string, turns: number, loop: number) => {
    for (let turn = 0; turn < turns; turn++) {
      const { outcome } = await bench.load.ask(
        loop,
        name,
        `${name}-${turn}`,
        `Turn ${turn} of ${name}: what comes next?`,
        { stream: false },
      );
      if (outcome !== "done") failed++;
    }
  };
  return {
    async warm() {
      // Compiled code, connections, the store's files.
      await Promise.all(
        Array.from({ length: SESSIONS }, (_, s) => session(`w${s}-${tag}`, 3, s)),
      );
    },
    async measure(r) {
      const names = Array.from({ length: SESSIONS }, (_, s) => `r${r}s${s}-${tag}`);
      await bench.load.prepare(names.map((name, s) => [s, name] as const));
      failed = 0;
      const before = cpuMs(pid);
      const started = performance.now();
      await byThread(
        pid,
        `per request, ${variant.name}`,
        () => Promise.all(names.map((name, s) => session(name, TURNS, s))),
      );
      const seconds = (performance.now() - started) / 1000;
      return {
        cpu: round((cpuMs(pid) - before) / (SESSIONS * TURNS), 3),
        rps: round(SESSIONS * TURNS / seconds),
        failed,
      };
    },
    stop: () => bench.stop(),
  };
}

/** Service CPU per answered request, each variant. */
async function perRequest(brokerUrl: string): Promise<CpuResults["per_request"]> {
  const runs = await interleaved(
    Object.fromEntries([...VARIANTS, ...ENGINE_VARIANTS].map((variant) => [
      variant.name,
      () => requestSubject(brokerUrl, variant),
    ])),
  );
  const figure = (name: string): RequestFigure => {
    const of = runs[name];
    return {
      median: median(of.map((run) => run.cpu)),
      runs: of.map((run) => run.cpu),
      rps: median(of.map((run) => run.rps)),
      failed: of.reduce((sum, run) => sum + run.failed, 0),
    };
  };
  return {
    unit: "ms",
    sessions: SESSIONS,
    turns: TURNS,
    service: figure("service"),
    service_workers_0: figure("service_workers_0"),
    ...(COMPARE_ROOTS.length > 0 &&
      { compare: Object.fromEntries(COMPARE_ROOTS.map((root) => [root, figure(root)])) }),
    engines: {
      [SIM_ENGINES.at(-1)!]: figure(ENGINE_VARIANTS[0].name),
    },
    sim_engines: Object.fromEntries(
      SIM_ENGINES.map((engines) => [engines, figure(`service_sim_${engines}`)]),
    ),
  };
}

/** Service CPU per streamed token, one variant, the stand-in pacing its chunks `gapMs` apart. */
async function tokenSubject(
  brokerUrl: string,
  variant: Variant,
  gapMs: number,
): Promise<Subject<{ cpu: number; failed: number }>> {
  const standIn = await startStandIn({ chunks: CHUNKS, chunkText: CHUNK_TEXT, gapMs });
  const bench = await run(
    brokerUrl,
    standIn,
    ["--max-tokens=2048", ...variant.args],
    STREAMS,
    variant.root,
  );
  const pid = bench.service.child.pid;
  const tag = crypto.randomUUID().slice(0, 8);
  let failed = 0;
  const answers = async (prefix: string) =>
    await drive(ANSWERS, STREAMS, async (i) => {
      const { outcome, firstDelta } = await bench.load.ask(
        i,
        `${prefix}${i}-${tag}`,
        `${prefix}${i}-${tag}`,
        `tell me a long story ${i}`,
        { stream: true },
      );
      if (outcome !== "done") failed++;
      return firstDelta;
    });
  return {
    // As long as a measured run (a shorter one left the first run the highest).
    warm: async () => void await answers("w"),
    async measure(r) {
      failed = 0;
      const before = cpuMs(pid);
      await byThread(pid, `per token, gap ${gapMs} ms, ${variant.name}`, () => answers(`r${r}-`));
      return { cpu: round((cpuMs(pid) - before) * 1000 / TOKENS, 2), failed };
    },
    stop: () => bench.stop(),
  };
}

/** A baseline reading the stand-in's streams in a process of its own, one per run. */
function baselineSubject(
  url: string,
  mode: "openai" | "fetch",
  systemPrompt: string,
): Promise<Subject<{ cpu: number; failed: number }>> {
  return Promise.resolve({
    // Each process warms itself up before it measures.
    warm: () => Promise.resolve(),
    async measure() {
      const output = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          new URL("./stream_consumer.ts", import.meta.url).pathname,
          JSON.stringify({
            url,
            mode,
            answers: ANSWERS,
            concurrency: STREAMS,
            maxTokens: 2048,
            systemPrompt,
          }),
        ],
        stderr: "inherit",
      }).output();
      const { cpu_ms, tokens: read } = JSON.parse(new TextDecoder().decode(output.stdout));
      if (read !== TOKENS) throw new Error(`${mode} read ${read} chunks, not ${TOKENS}`);
      return { cpu: round(cpu_ms * 1000 / TOKENS, 2), failed: 0 };
    },
    stop: () => Promise.resolve(),
  });
}

/** Service CPU per streamed token, and the baselines' on the same streams, paced `gapMs` apart. */
async function perToken(
  brokerUrl: string,
  systemPrompt: string,
  gapMs: number,
): Promise<TokenRows> {
  const standIn = await startStandIn({ chunks: CHUNKS, chunkText: CHUNK_TEXT, gapMs });
  try {
    const runs = await interleaved({
      ...Object.fromEntries(VARIANTS.map((variant) => [
        variant.name,
        () => tokenSubject(brokerUrl, variant, gapMs),
      ])),
      openai_client: () => baselineSubject(standIn.url, "openai", systemPrompt),
      fetch_sse_reader: () => baselineSubject(standIn.url, "fetch", systemPrompt),
    });
    const figure = (name: string): TokenFigure => ({
      median: median(runs[name].map((run) => run.cpu)),
      runs: runs[name].map((run) => run.cpu),
      failed: runs[name].reduce((sum, run) => sum + run.failed, 0),
    });
    return {
      gap_ms: gapMs,
      service: figure("service"),
      service_workers_0: figure("service_workers_0"),
      ...(COMPARE_ROOTS.length > 0 &&
        { compare: Object.fromEntries(COMPARE_ROOTS.map((root) => [root, figure(root)])) }),
      openai_client: figure("openai_client"),
      fetch_sse_reader: figure("fetch_sse_reader"),
    };
  } finally {
    await standIn.close();
  }
}

/**
 * Measures the CPU figures (the service as a child process, the broker at
 * `brokerUrl`); `only` limits them to per request, per token, or per token on paced streams.
 */
export async function cpuBench(
  brokerUrl: string,
  systemPrompt: string,
  only?: "requests" | "tokens" | "paced",
): Promise<CpuResults> {
  const skipped: RequestFigure = { median: NaN, runs: [], rps: NaN, failed: 0 };
  const per_request = only === "tokens" || only === "paced"
    ? {
      unit: "ms" as const,
      sessions: SESSIONS,
      turns: TURNS,
      service: skipped,
      service_workers_0: skipped,
    }
    : await perRequest(brokerUrl);
  const skippedTokens = (gap_ms: number): TokenRows => ({
    gap_ms,
    service: { median: NaN, runs: [], failed: 0 },
    service_workers_0: { median: NaN, runs: [], failed: 0 },
    openai_client: { median: NaN, runs: [] },
    fetch_sse_reader: { median: NaN, runs: [] },
  });
  const per_token = {
    unit: "µs" as const,
    answers: ANSWERS,
    concurrency: STREAMS,
    chunks_per_answer: CHUNKS,
    chars_per_chunk: CHUNK_TEXT.length,
    paced: only === "requests"
      ? skippedTokens(GAP_MS)
      : await perToken(brokerUrl, systemPrompt, GAP_MS),
    back_to_back: only === "requests" || only === "paced"
      ? skippedTokens(0)
      : await perToken(brokerUrl, systemPrompt, 0),
  };
  return { per_request, per_token };
}

/** The CPU table's rows, for `console.table`. */
export function cpuTable(results: CpuResults): Record<string, unknown>[] {
  const { per_request: request, per_token: token } = results;
  const runs = (figure: CpuFigure) => figure.runs.join(" / ");
  const rows: Record<string, unknown>[] = [];
  const row = (what: string, figure: CpuFigure, unit: string, goal: string, rps = "") => {
    if (figure.runs.length === 0) return;
    rows.push({ what, CPU: `${figure.median} ${unit}`, runs: runs(figure), goal, "req/s": rps });
  };
  const compared = (root: string) => `the same, ${root} (BENCH_COMPARE)`;
  row(
    `service, per answered request (${request.sessions} sessions × ${request.turns} turns, ` +
      "history saved, not streamed)",
    request.service,
    "ms",
    "≤ 0.3 ms",
    String(request.service.rps),
  );
  row(
    "the same, with --workers=0 (turns on the MQTT thread)",
    request.service_workers_0,
    "ms",
    "≤ 0.3 ms",
    String(request.service_workers_0.rps),
  );
  for (const [root, figure] of Object.entries(request.compare ?? {})) {
    row(compared(root), figure, "ms", "", String(figure.rps));
  }
  for (const [engines, figure] of Object.entries(request.engines ?? {})) {
    row(
      `the same, ${engines} engines (${engines} stand-ins, --engine-url listing them)`,
      figure,
      "ms",
      `≤ ${request.service.median} ms (1 engine)`,
      String(figure.rps),
    );
  }
  const one = request.sim_engines?.[SIM_ENGINES[0]];
  for (const [engines, figure] of Object.entries(request.sim_engines ?? {})) {
    row(
      `the same, --engine sim --sim-engines ${engines} (zero latency, simulators in the process)`,
      figure,
      "ms",
      Number(engines) === SIM_ENGINES[0] ? "" : `≤ ${one?.median} ms (1 engine)`,
      String(figure.rps),
    );
  }
  for (const rowsOf of [token.paced, token.back_to_back]) {
    const pacing = rowsOf.gap_ms > 0 ? `paced: a chunk every ${rowsOf.gap_ms} ms` : "back to back";
    const floor = rowsOf.fetch_sse_reader.median;
    const half = rowsOf.openai_client.median / 2;
    row(
      `service, per streamed token, ${pacing} (${token.answers} answers × ` +
        `${token.chunks_per_answer} chunks, ${token.concurrency} at a time, deltas to MQTT)`,
      rowsOf.service,
      "µs",
      rowsOf.gap_ms > 0 ? `≤ ${Math.min(floor, half)} µs (fetch, openai / 2)` : "",
    );
    row("the same, with --workers=0", rowsOf.service_workers_0, "µs", "");
    for (const [root, figure] of Object.entries(rowsOf.compare ?? {})) {
      row(compared(root), figure, "µs", "");
    }
    row(`openai client alone, same streams (${pacing})`, rowsOf.openai_client, "µs", "baseline");
    row(
      `fetch + line-based SSE reader, same streams (${pacing})`,
      rowsOf.fetch_sse_reader,
      "µs",
      "floor",
    );
  }
  return rows;
}
