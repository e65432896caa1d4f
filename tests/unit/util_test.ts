import { deepEqual, equal, ok, throws } from "node:assert/strict";
import { backoffDelay, closest, LruMap, ProbeLoop } from "../../lib/_util.ts";

Deno.test("backoffDelay doubles from firstMs up to maxMs, exactly without jitter", () => {
  const delays = [0, 1, 2, 3, 4, 5, 6].map((attempt) =>
    backoffDelay(attempt, { firstMs: 1000, maxMs: 60_000, jitter: "none" })
  );
  deepEqual(delays, [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000]);
});

Deno.test("backoffDelay's jitter stays in its range", () => {
  for (let i = 0; i < 1000; i++) {
    const half = backoffDelay(3, { firstMs: 10 });
    ok(half >= 40 && half < 120, `half jitter of 80 ms gave ${half}`);
    const full = backoffDelay(3, { firstMs: 10, maxMs: 50, jitter: "full" });
    ok(full >= 10 && full <= 50 && Number.isInteger(full), `full jitter up to 50 ms gave ${full}`);
  }
});

Deno.test("LruMap forgets the least recently used entry; get and set count as a use", () => {
  const map = new LruMap<string, number>(2);
  map.set("a", 1).set("b", 2);
  equal(map.get("a"), 1);
  map.set("c", 3);
  deepEqual([...map.keys()], ["a", "c"]);
  map.set("a", 10);
  map.set("d", 4);
  deepEqual([...map.entries()], [["a", 10], ["d", 4]]);
  equal(map.get("b"), undefined);
  throws(() => new LruMap(0), /positive integer, got 0/);
});

Deno.test("ProbeLoop probes after each wait, reads the interval anew, wakes early, and stops", async () => {
  const waits: number[] = [];
  let release: (() => void) | undefined;
  const sleep = (ms: number, signal: AbortSignal) =>
    new Promise<void>((resolve, reject) => {
      waits.push(ms);
      release = resolve;
      signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    });
  let interval = 5000;
  let probes = 0;
  const loop = new ProbeLoop(() => Promise.resolve(probes++), () => interval, sleep);
  const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
  loop.start();
  await tick();
  deepEqual(waits, [5000]);
  release!();
  await tick();
  equal(probes, 1);
  interval = 1000;
  loop.wake(); // cut the second wait short: no probe, a new wait at the new interval
  await tick();
  equal(probes, 1);
  deepEqual(waits, [5000, 5000, 1000]);
  await loop.close();
  equal(loop.signal.aborted, true);
  equal(probes, 1);
});

Deno.test("closest: the nearest name within the distance, else none", () => {
  const names = ["maze", "general", "racing", "driving"];
  equal(closest("mazee", names), "maze");
  equal(closest("genral", names), "general");
  equal(closest("drivng", names), "driving");
  equal(closest("kg_llm_new", names), undefined);
  equal(closest("maz", names, 1), "maze");
  equal(closest("mz", names, 1), undefined);
});
