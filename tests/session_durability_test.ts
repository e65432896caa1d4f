/**
 * Session durability end to end: mosquitto, the service as a child process,
 * the simulated engine and MQTT clients. A damaged session store costs the
 * damaged sessions their history, not their service. (Messages over 64 KiB
 * are covered against real KV files in `session_store_test.ts`.)
 */

import assert, { equal } from "node:assert/strict";
import { mosquittoTest, startService, withService } from "./_helpers.ts";

/** Replaces the stored values of `session`'s messages with bytes Deno KV cannot read. */
async function damageMessages(path: string, project: string, session: string): Promise<void> {
  const hex = (text: string) =>
    "02" + [...new TextEncoder().encode(text)].map((b) =>
      b.toString(16).padStart(2, "0")
    ).join("") +
    "00";
  const prefix = (hex("message") + hex(project) + hex(session)).toUpperCase();
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: [
      "eval",
      `import { DatabaseSync } from "node:sqlite";
       const db = new DatabaseSync(Deno.args[0]);
       console.log(db.prepare("update kv set v = x'ff0f6f00' where hex(k) like ?").run(Deno.args[1] + "%").changes);
       db.close();`,
      path,
      prefix,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert(code === 0, new TextDecoder().decode(stderr));
  assert(Number(new TextDecoder().decode(stdout)) > 0, "nothing damaged");
}

mosquittoTest(
  "durability: sessions that cannot be read are named at start-up and start afresh",
  async () => {
    await withService({}, async ({ client, service, args, dataDir }) => {
      for (const id of ["a", "b"]) {
        await client.send("maze/user_input", {
          session_id: id,
          message: `hi ${id}`,
          request_id: id,
        });
        equal((await client.final(id, id)).json?.type, "done");
      }
      equal(await service.stop(), 0);
      await damageMessages(`${dataDir}/sessions.kv`, "maze", "b");
      const restarted = await startService(args);
      try {
        assert(/1 sessions cannot be read \(maze\/b\)/.test(restarted.log()), restarted.log());
        for (const [id, n] of [["b", "b2"], ["a", "a2"]]) {
          await client.send("maze/user_input", { session_id: id, message: "again", request_id: n });
          const reply = await client.final(id, n);
          equal(reply.json?.type, "done", reply.text);
        }
        // b lost its history (its answer counts turn 1 again); a kept its own.
        const answers = client.received.filter((m) => m.json?.type === "done").map((m) =>
          `${m.json?.session_id}:${m.json?.response}`
        );
        assert(
          answers.some((a) => a.startsWith("b:") && a.includes("Turn 1") && a.includes("again")),
          answers.join("\n"),
        );
        assert(answers.some((a) => a.startsWith("a:") && a.includes("Turn 2")), answers.join("\n"));
        await client.send("maze/user_input", {
          session_id: "b",
          message: "reset",
          reset: true,
          request_id: "b3",
        });
        equal((await client.final("b", "b3")).json?.type, "done");
      } finally {
        await restarted.stop();
      }
    });
  },
);
