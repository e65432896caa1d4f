/**
 * The bridge's own cost, in CPU time: what the service process
 * spends (user + system time of all its threads, from `/proc/PID/stat`, read
 * before and after) per answered request and per streamed token, against a
 * zero-latency engine stand-in. CPU time, unlike throughput, does not depend
 * on who else gets the machine's cores. Per token, the same streams are also
 * consumed by the `openai` client alone (the baseline) and by a plain `fetch`
 * with a line-based SSE reader (the floor), each in a process of its own,
 * measured the same way. The service is measured twice in the same run: with
 * its default pool of Web Workers and with `--workers=0` (turns on the MQTT
 * thread, no hop between threads). Each figure is the median of
 * {@linkcode REPEATS} runs.
 *
 * @module
 */

import { drive, round, run, type Simulator } from "./harness.ts";
import type { StandInOptions } from "./engine_stand_in.ts";
import { cpuMs, threadCpuMs } from "./cpu_time.ts";

/** `BENCH_THREADS=1`: log each thread's share of a measured run (to stderr). */
const SHOW_THREADS = Deno.env.get("BENCH_THREADS") === "1";

/** Calls `fn`, then logs the CPU time each thread of `pid` spent meanwhile, when asked to. */
async function byThread<T>(pid: number, what: string, fn: () => Promise<T>): Promise<T> {
  if (!SHOW_THREADS) return await fn();
  const before = threadCpuMs(pid);
  const result = await fn();
  const spent = [...threadCpuMs(pid)].map(([thread, [user, system]]) => {
    const [user0, system0] = before.get(thread) ?? [0, 0];
    return [thread, `${user - user0}+${system - system0}`];
  }).filter(([, ms]) => ms !== "0+0");
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

/** The service's CPU per answered request, with one `--workers` setting. */
export interface RequestFigure extends CpuFigure {
  readonly rps: number;
  readonly failed: number;
}

/** What {@linkcode cpuBench} measured. */
export interface CpuResults {
  readonly per_request: RequestFigure & {
    readonly unit: "ms";
    readonly sessions: number;
    readonly turns: number;
    /** The same with `--workers=0`. */
    readonly workers_0: RequestFigure;
  };
  readonly per_token: {
    readonly unit: "µs";
    readonly answers: number;
    readonly concurrency: number;
    readonly chunks_per_answer: number;
    readonly chars_per_chunk: number;
    readonly service: CpuFigure & { readonly failed: number };
    /** The same with `--workers=0`. */
    readonly service_workers_0: CpuFigure & { readonly failed: number };
    readonly openai_client: CpuFigure;
    readonly fetch_sse_reader: CpuFigure;
  };
}

const SESSIONS = 64;
const TURNS = 20;
const ANSWERS = 20;
const STREAMS = 10;
const CHUNKS = 1000;
const CHUNK_TEXT = "lorem ipsum"; // 11 characters

/** Service CPU per answered request: non-streamed answers, history kept and saved. */
async function perRequest(brokerUrl: string, args: string[]): Promise<RequestFigure> {
  const standIn = await startStandIn({ chunks: 1, chunkText: "Noted; here is a short answer." });
  const bench = await run(brokerUrl, standIn, args, 32);
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
  try {
    // Warm-up: compiled code, connections, the store's files.
    await Promise.all(
      Array.from({ length: SESSIONS }, (_, s) => session(`w${s}-${tag}`, 3, s)),
    );
    const runs: number[] = [];
    const rps: number[] = [];
    for (let r = 0; r < REPEATS; r++) {
      const names = Array.from({ length: SESSIONS }, (_, s) => `r${r}s${s}-${tag}`);
      await bench.load.prepare(names.map((name, s) => [s, name] as const));
      const before = cpuMs(pid);
      const started = performance.now();
      await byThread(
        pid,
        "per request",
        () => Promise.all(names.map((name, s) => session(name, TURNS, s))),
      );
      const seconds = (performance.now() - started) / 1000;
      runs.push(round((cpuMs(pid) - before) / (SESSIONS * TURNS), 3));
      rps.push(round(SESSIONS * TURNS / seconds));
    }
    return { median: median(runs), runs, rps: median(rps), failed };
  } finally {
    await bench.stop();
  }
}

const TOKENS = ANSWERS * CHUNKS;

/** Service CPU per streamed token, the service started with `args`. */
async function serviceTokens(
  brokerUrl: string,
  standIn: Simulator,
  args: string[],
): Promise<CpuResults["per_token"]["service"]> {
  const service: number[] = [];
  let failed = 0;
  const bench = await run(brokerUrl, standIn, ["--max-tokens=2048", ...args], STREAMS);
  const pid = bench.service.child.pid;
  const tag = crypto.randomUUID().slice(0, 8);
  const answers = async (prefix: string, count: number) =>
    await drive(count, STREAMS, async (i) => {
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
  try {
    // Warm-up as long as a measured run (a shorter one left the first run the highest).
    await answers("w", ANSWERS);
    for (let r = 0; r < REPEATS; r++) {
      const before = cpuMs(pid);
      await byThread(pid, "per token", () => answers(`r${r}-`, ANSWERS));
      service.push(round((cpuMs(pid) - before) * 1000 / TOKENS, 2));
    }
  } finally {
    await bench.stop();
  }
  return { median: median(service), runs: service, failed };
}

/** Service CPU per streamed token, and the baselines' on the same streams. */
async function perToken(brokerUrl: string, systemPrompt: string): Promise<CpuResults["per_token"]> {
  const service = await serviceTokens(
    brokerUrl,
    await startStandIn({ chunks: CHUNKS, chunkText: CHUNK_TEXT }),
    [],
  );
  const inPlace = await serviceTokens(
    brokerUrl,
    await startStandIn({ chunks: CHUNKS, chunkText: CHUNK_TEXT }),
    ["--workers=0"],
  );
  const standInAgain = await startStandIn({ chunks: CHUNKS, chunkText: CHUNK_TEXT });
  const baseline = async (mode: "openai" | "fetch") => {
    const runs: number[] = [];
    for (let r = 0; r < REPEATS; r++) {
      const output = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          new URL("./stream_consumer.ts", import.meta.url).pathname,
          JSON.stringify({
            url: standInAgain.url,
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
      runs.push(round(cpu_ms * 1000 / TOKENS, 2));
    }
    return { median: median(runs), runs };
  };
  try {
    return {
      unit: "µs",
      answers: ANSWERS,
      concurrency: STREAMS,
      chunks_per_answer: CHUNKS,
      chars_per_chunk: CHUNK_TEXT.length,
      service,
      service_workers_0: inPlace,
      openai_client: await baseline("openai"),
      fetch_sse_reader: await baseline("fetch"),
    };
  } finally {
    await standInAgain.close();
  }
}

/** Measures the CPU figures (the service as a child process, the broker at `brokerUrl`). */
export async function cpuBench(brokerUrl: string, systemPrompt: string): Promise<CpuResults> {
  const per_request = {
    unit: "ms" as const,
    sessions: SESSIONS,
    turns: TURNS,
    ...await perRequest(brokerUrl, []),
    workers_0: await perRequest(brokerUrl, ["--workers=0"]),
  };
  const per_token = await perToken(brokerUrl, systemPrompt);
  return { per_request, per_token };
}

/** The CPU table's rows, for `console.table`. */
export function cpuTable(results: CpuResults): Record<string, unknown>[] {
  const { per_request: request, per_token: token } = results;
  const runs = (figure: CpuFigure) => figure.runs.join(" / ");
  return [
    {
      "what": `service, per answered request (${request.sessions} sessions × ${request.turns} ` +
        "turns, history saved, not streamed)",
      "CPU": `${request.median} ms`,
      "runs": runs(request),
      "goal": "≤ 0.3 ms",
      "req/s": request.rps,
    },
    {
      "what": "the same, with --workers=0 (turns on the MQTT thread)",
      "CPU": `${request.workers_0.median} ms`,
      "runs": runs(request.workers_0),
      "goal": "≤ 0.3 ms",
      "req/s": request.workers_0.rps,
    },
    {
      "what":
        `service, per streamed token (${token.answers} answers × ${token.chunks_per_answer} ` +
        `chunks, ${token.concurrency} at a time, deltas to MQTT)`,
      "CPU": `${token.service.median} µs`,
      "runs": runs(token.service),
      "goal": "≤ 6 µs",
      "req/s": "",
    },
    {
      "what": "the same, with --workers=0 (turns on the MQTT thread)",
      "CPU": `${token.service_workers_0.median} µs`,
      "runs": runs(token.service_workers_0),
      "goal": "≤ 6 µs",
      "req/s": "",
    },
    {
      "what": "openai client alone, per streamed token (same streams)",
      "CPU": `${token.openai_client.median} µs`,
      "runs": runs(token.openai_client),
      "goal": "baseline",
      "req/s": "",
    },
    {
      "what": "fetch + line-based SSE reader, per streamed token (same streams)",
      "CPU": `${token.fetch_sse_reader.median} µs`,
      "runs": runs(token.fetch_sse_reader),
      "goal": "floor",
      "req/s": "",
    },
  ];
}
