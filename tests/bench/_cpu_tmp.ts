import mqtt from "mqtt";
import { startSimulator } from "../../lib/engine/simulator.ts";
import { freePort, startMosquitto, startService } from "../_helpers.ts";

const conc = Number(Deno.args[0] ?? 16), total = Number(Deno.args[1] ?? 3000);
const extra = Deno.args.slice(2);
const UNIQUE = !!Deno.env.get("UNIQUE");
const ticks = (pid: number) => { const f = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1].split(" "); return (Number(f[11]) + Number(f[12])) * 10; };
const broker = await startMosquitto();
const sim = await startSimulator({ ttftMs: 0, itlMs: 0, fillerTokens: 0, maxModelLen: 32768 });
const dataDir = await Deno.makeTempDir();
const PROF = Deno.env.get("PROF");
const service = PROF ? await (async () => { const child = new Deno.Command(Deno.execPath(), { args: ["run", "-A", "--cpu-prof", `--cpu-prof-dir=${PROF}`, "main.ts", "--engine=url", `--engine-url=${sim.url}`, `--mqtt-url=${broker.url}`, `--data-dir=${dataDir}`, "--projects=general", "--max-model-len=32768", "--http-port=0", "--rate-limit=0", "--rate-limit-client=0", "--max-history-tokens=1000", ...extra], stdout: "null", stderr: "null" }).spawn(); await new Promise((r) => setTimeout(r, 4000)); return { child, stop: async () => { child.kill("SIGTERM"); await child.status; } }; })() : await startService(["--engine=url", `--engine-url=${sim.url}`, `--mqtt-url=${broker.url}`, `--data-dir=${dataDir}`, "--projects=general", "--max-model-len=32768", `--http-port=${freePort()}`, "--rate-limit=0", "--rate-limit-client=0", "--max-history-tokens=1000", ...extra], { env: Deno.env.get("V8F") ? { DENO_V8_FLAGS: Deno.env.get("V8F")! } : {} });
const clients = await Promise.all(Array.from({ length: Math.min(conc, 32) }, () => mqtt.connectAsync(broker.url, { reconnectPeriod: 0 })));
for (const c of clients) (c.stream as any).setNoDelay?.(true);
const pending = new Map<string, (first: number | undefined) => void>();
const firsts = new Map<string, number>();
for (const c of clients) c.on("message", (_t, p) => { const r = JSON.parse(new TextDecoder().decode(p)); if (r.type === "delta" && !firsts.has(r.request_id)) firsts.set(r.request_id, performance.now()); if (r.type === "done" || r.type === "error") { pending.get(r.request_id)?.(firsts.get(r.request_id)); pending.delete(r.request_id);} });
if (UNIQUE) for (const c of clients) await c.subscribeAsync("general/assistant_response/#", { qos: 1 });
else for (let l = 0; l < conc; l++) await clients[l % clients.length].subscribeAsync(`general/assistant_response/s${l}`, { qos: 1 });
async function go(n: number, tag: string) {
  let next = 0; const lat: number[] = []; const ttfd: number[] = [];
  const t0 = performance.now();
  await Promise.all(Array.from({ length: conc }, async (_, l) => { while (next < n) { const i = next++; const t = performance.now(); const first = await new Promise<number | undefined>((res) => { pending.set(`${tag}${i}`, res); clients[l % clients.length].publish("general/user_input", JSON.stringify({ session_id: UNIQUE ? `u${tag}${i}` : `s${l}`, message: `hello ${i}`, request_id: `${tag}${i}` }), { qos: 1 }); }); lat.push(performance.now() - t); if (first) ttfd.push(first - t); } }));
  return { rps: n / ((performance.now() - t0) / 1000), p50: lat.sort((a, b) => a - b)[lat.length >> 1], ttfd: ttfd.sort((a, b) => a - b)[ttfd.length >> 1] };
}
await go(300, "w");
const pid = service.child.pid;
const bpid = Number(new TextDecoder().decode((await new Deno.Command("pgrep", { args: ["-f", broker.dir] }).output()).stdout).trim().split("\n")[0]);
const s0 = ticks(pid), m0 = ticks(bpid), b0 = ticks(Deno.pid);
const r = await go(total, "m");
const s1 = ticks(pid), m1 = ticks(bpid), b1 = ticks(Deno.pid);
const st = Deno.readTextFileSync(`/proc/${pid}/status`); const kb = (f: string) => Math.round(Number(st.match(new RegExp(`${f}:\\s+(\\d+)`))?.[1] ?? 0) / 1024);
console.log(JSON.stringify({ conc, rss: kb("VmRSS"), hwm: kb("VmHWM"), ...r, svc_cpu_ms_per_req: (s1 - s0) / total, broker_ms: (m1 - m0) / total, bench_ms: (b1 - b0) / total }));
if (Deno.env.get("IDLE")) { for (let k = 0; k < 6; k++) { await new Promise((r) => setTimeout(r, 5000)); const st2 = Deno.readTextFileSync(`/proc/${pid}/status`); console.log(`after ${(k + 1) * 5}s idle rss`, Math.round(Number(st2.match(/VmRSS:\s+(\d+)/)![1]) / 1024)); } }
if (Deno.env.get("SMAPS")) {
  const sm = Deno.readTextFileSync(`/proc/${pid}/smaps`).split("\n");
  const regions: { name: string; size: number; rss: number }[] = []; let cur: any;
  for (const line of sm) { const m = line.match(/^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$/); if (m) { cur = { name: m[3] || "[anon]", size: (parseInt(m[2], 16) - parseInt(m[1], 16)) / 1024, rss: 0 }; regions.push(cur); } else { const r = line.match(/^Rss:\s+(\d+)/); if (r) cur.rss = Number(r[1]); } }
  const bucket = new Map<string, number[]>();
  for (const r of regions) { const k = r.name !== "[anon]" ? r.name.split("/").pop()! : r.size >= 60000 ? "anon>=60MB" : r.size >= 1000 ? "anon 1-60MB" : r.size >= 256 ? "anon 256K-1MB" : "anon<256K"; const b = bucket.get(k) ?? [0, 0]; b[0]++; b[1] += r.rss; bucket.set(k, b); }
  console.log([...bucket].sort((a, b) => b[1][1] - a[1][1]).slice(0, 10).map(([k, [n, rss]]) => `${k}: ${n} regions ${Math.round(rss / 1024)} MB`).join("\n"));
}
for (const c of clients) await c.endAsync(true);
await service.stop(); await sim.close(); await broker.stop();
Deno.exit(0);
