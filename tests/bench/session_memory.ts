/**
 * What a burst of new sessions leaves behind: starts mosquitto, the simulated
 * engine (over HTTP) and the service as a child process, sends rounds of turns
 * each from a new session, then waits idle; prints the service's RSS (from
 * /proc) and the gateway thread's heap after a forced garbage collection (read
 * through the V8 inspector the service is started with) after the first round,
 * after the last and after the idle time.
 *
 *     deno run -A tests/bench/session_memory.ts [--rounds=12] [--per-round=600] [--idle=60] [-- service flags]
 *
 * With `--dedup-window=20s --session-ttl=30s` after `--`, the windows that
 * keep a live session's entries pass within the idle minute.
 *
 * @module
 */

import { freePort, startMosquitto, startService, tempDir, TestClient } from "../_helpers.ts";
import { startSimulator } from "../../lib/engine/simulator.ts";

const split = Deno.args.indexOf("--");
const own = split === -1 ? Deno.args : Deno.args.slice(0, split);
const serviceFlags = split === -1 ? [] : Deno.args.slice(split + 1);
const flag = (name: string, fallback: number) =>
  Number(own.find((arg) => arg.startsWith(`--${name}=`))?.split("=")[1] ?? fallback);
const rounds = flag("rounds", 12);
const perRound = flag("per-round", 600);
const idleSeconds = flag("idle", 60);

/** The service's resident memory in MB. */
function rssMb(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Math.round(Number(/VmRSS:\s+(\d+)/.exec(status)![1]) / 1024);
}

/** The gateway thread's heap in use after two forced collections, in MB, through the inspector. */
async function gatewayHeapMb(inspectPort: number): Promise<number> {
  const [target] = await (await fetch(`http://127.0.0.1:${inspectPort}/json/list`)).json();
  const socket = new WebSocket(target.webSocketDebuggerUrl);
  await new Promise((resolve) => socket.onopen = resolve);
  const answers = new Map<number, (result: Record<string, unknown>) => void>();
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    answers.get(message.id)?.(message.result);
  };
  let id = 0;
  const call = (method: string, params = {}) =>
    new Promise<Record<string, unknown>>((resolve) => {
      answers.set(++id, resolve);
      socket.send(JSON.stringify({ id, method, params }));
    });
  await call("HeapProfiler.collectGarbage");
  await call("HeapProfiler.collectGarbage");
  const evaluated = await call("Runtime.evaluate", {
    expression: "Deno.memoryUsage().heapUsed",
    returnByValue: true,
  });
  socket.close();
  const heapUsed = (evaluated.result as { value: number }).value;
  return Math.round(heapUsed / 1e5) / 10;
}

const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
const broker = await startMosquitto();
const dataDir = await tempDir("vllm-mqtt-session-memory-");
const inspectPort = freePort();
const service = await startService([
  "--engine=url",
  `--engine-url=${sim.url}`,
  `--mqtt-url=${broker.url}`,
  `--data-dir=${dataDir}`,
  "--projects=general",
  ...serviceFlags,
], { denoFlags: [`--inspect=127.0.0.1:${inspectPort}`] });
const pid = service.child.pid;
const client = await TestClient.connect(broker.url);
await client.subscribe("general/assistant_response/#");
const row: Record<string, number> = { sessions: rounds * perRound, rss_start_mb: rssMb(pid) };
for (let round = 0; round < rounds; round++) {
  const waiting = new Set<string>();
  for (let i = 0; i < perRound; i++) {
    const requestId = `r${round}-${i}`;
    waiting.add(requestId);
    client.send("general/user_input", {
      session_id: `s${round}-${i}`,
      request_id: requestId,
      message: `hello number ${i} of round ${round}, tell me something`,
    });
  }
  while (waiting.size > 0) {
    for (const message of client.received.splice(0)) {
      const type = message.json?.type;
      if (type === "done" || type === "error") waiting.delete(String(message.json!.request_id));
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  if (round === 0) row.gateway_heap_round_1_mb = await gatewayHeapMb(inspectPort);
}
row.rss_after_rounds_mb = rssMb(pid);
row.gateway_heap_after_rounds_mb = await gatewayHeapMb(inspectPort);
await new Promise((resolve) => setTimeout(resolve, idleSeconds * 1000));
row.rss_after_idle_mb = rssMb(pid);
row.gateway_heap_after_idle_mb = await gatewayHeapMb(inspectPort);
console.log(JSON.stringify(row));
await client.close();
await service.stop();
await broker.close();
await sim.close();
