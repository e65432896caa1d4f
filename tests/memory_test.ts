/**
 * Memory: big and deeply nested payloads within `--max-payload-bytes` do not
 * grow the service's heap, and every other session keeps being served
 * meanwhile. The service runs as a child process; its peak resident memory
 * is read from /proc (`VmHWM` of the deno process itself, which runs the
 * gateway and the request workers as threads).
 */

import assert, { equal } from "node:assert/strict";
import { mosquittoTest as test, withService } from "./_helpers.ts";

/**
 * The service's resident memory now and at its peak, in MB, from
 * /proc/PID/status (read by `cat`: Deno lets only `--allow-all` read /proc).
 */
function residentMb(pid: number): { now: number; peak: number } {
  const output = new Deno.Command("cat", { args: [`/proc/${pid}/status`] }).outputSync();
  const status = new TextDecoder().decode(output.stdout);
  const kb = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(status)![1]);
  return { now: Math.round(kb("VmRSS") / 1024), peak: Math.round(kb("VmHWM") / 1024) };
}

/**
 * The bound the service's peak RSS stays under while the payloads come. It
 * starts at about 160 MB on the development machine; before payloads were
 * judged by their shape, these ones took it past 1,200 MB.
 */
const PEAK_BOUND_MB = 400;

/** A request of `bytes` bytes whose extra field nests arrays three million levels deep. */
function deepPayload(sessionId: string, bytes: number): string {
  const head = JSON.stringify({ session_id: sessionId, message: "hi" }).slice(0, -1) + ',"x":';
  const levels = Math.floor((bytes - head.length - 1) / 2);
  return head + "[".repeat(levels) + "]".repeat(levels) + "}";
}

test(
  `memory: 60 payloads of 5.8 MB nested 2.9 million deep keep the service under ${PEAK_BOUND_MB} MB; other sessions are served meanwhile`,
  async () => {
    await withService({}, async ({ client, service }) => {
      const pid = service.child.pid;
      await client.send("general/user_input", { session_id: "warm", message: "hi" });
      equal((await client.final("warm")).json?.type, "done");
      const before = residentMb(pid);
      const template = deepPayload("big-00", 5_800_000);
      const pings: Promise<unknown>[] = [];
      for (let i = 0; i < 60; i++) {
        const id = `big-${String(i).padStart(2, "0")}`;
        await client.send("general/user_input", template.replace("big-00", id));
        await client.send("general/user_input", { session_id: `ping-${i}`, message: "ping" });
        pings.push(client.final(`ping-${i}`, undefined, 60_000));
      }
      const answers = await Promise.all(pings) as { json?: Record<string, unknown> }[];
      const refusals = await Promise.all(
        Array.from({ length: 60 }, (_, i) => client.final(`big-${String(i).padStart(2, "0")}`)),
      );
      const after = residentMb(pid);
      console.log(
        `60 payloads of 5.8 MB, nested: RSS ${before.now} MB before, peak ${after.peak} MB, ` +
          `${after.now} MB after; ${answers.length} of 60 pings answered`,
      );
      assert(after.peak < PEAK_BOUND_MB, `peak RSS ${after.peak} MB, over ${PEAK_BOUND_MB} MB`);
      for (const answer of answers) equal(answer.json?.type, "done");
      for (const refusal of refusals) {
        const error = refusal.json?.error as { code: string; message: string };
        equal(error.code, "invalid_request");
        assert(error.message.includes("levels deep"), error.message);
      }
    });
  },
);

test("memory: requests past --payload-memory get overloaded with a retry time; small ones and retries are taken", async () => {
  // Each 16,000-character message holds 64,000 bytes (its text on the gateway and its worker)
  // until its turn ends: four of them fill 256 KiB.
  const args = ["--max-images=0", "--max-payload-bytes=64KiB", "--payload-memory=256KiB"];
  const engine = { ttftMs: 5, itlMs: 1, maxModelLen: 32_768 };
  await withService({ args, sim: engine }, async ({ client, sim }) => {
    const big = (session_id: string) => ({ session_id, message: "m".repeat(16_000) });
    // The engine holds every turn until the test lets it go.
    sim.fault = "hang";
    for (let i = 0; i < 4; i++) await client.send("general/user_input", big(`big-${i}`));
    await client.send("general/user_input", big("late"));
    const refused = (await client.final("late")).json!.error as Record<string, unknown>;
    equal(refused.code, "overloaded");
    equal(refused.retry_after_ms, 1000);
    await client.send("general/user_input", { session_id: "small", message: "ping" });
    sim.fault = undefined;
    for (const id of ["big-0", "big-1", "big-2", "big-3", "small"]) {
      equal((await client.final(id)).json?.type, "done", id);
    }
    // Their turns over, the memory they held is free again.
    client.received.length = 0;
    await client.send("general/user_input", big("late"));
    equal((await client.final("late")).json?.type, "done");
  });
});
