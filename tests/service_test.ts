/**
 * The core service, end to end: a real mosquitto, the service as a child
 * process, the simulated engine over HTTP, and real MQTT clients.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  mosquittoTest as test,
  removeTempDir,
  startService,
  tempDir,
  TestClient,
  waitFor,
  withService,
} from "./_helpers.ts";

test("an answer streams to the session's topic and reflects the project's prompt", async () => {
  await withService({}, async ({ client, sim }) => {
    await client.send("maze/user_input", { session_id: "p1", message: "hi", request_id: "r1" });
    const done = await client.final("p1", "r1");
    deepEqual(done.topic, "maze/assistant_response/p1");
    deepEqual(done.json!.type, "done");
    deepEqual(done.json!.response, '[Maze guide] Turn 1: you said "hi".');
    deepEqual(done.json!.finish_reason, "stop");
    const usage = done.json!.usage as Record<string, number>;
    assert(usage.prompt_tokens > 100 && usage.completion_tokens === 7);
    const timing = done.json!.timing as Record<string, number>;
    assert(timing.total_ms >= timing.ttft_ms && timing.ttft_ms >= timing.queue_ms);
    // Deltas, in order, concatenate to the final response.
    const deltas = client.received.filter((m) =>
      m.json?.type === "delta" && m.json.request_id === "r1"
    );
    assert(deltas.length >= 1);
    deepEqual(deltas.map((m) => m.json!.seq), deltas.map((_, i) => i));
    deepEqual(deltas.map((m) => m.json!.delta).join(""), done.json!.response);
    // The engine got the maze system prompt.
    const messages = sim.received[0].messages as { role: string; content: string }[];
    deepEqual(messages[0].role, "system");
    match(messages[0].content, /"hint"/);
    // Another project, another prompt.
    await client.send("general/user_input", { session_id: "p1", message: "hello", stream: false });
    const general = await client.final("p1", undefined);
    deepEqual(general.topic, "maze/assistant_response/p1");
    const other = await client.next((m) => m.topic === "general/assistant_response/p1");
    deepEqual(other.json!.response, '[General assistant] Turn 1: you said "hello".');
    deepEqual(
      client.received.filter((m) => m.topic.startsWith("general/") && m.json?.type === "delta")
        .length,
      0,
    );
  });
});

test("history is kept across turns and trimmed to the low-water mark over budget", async () => {
  // A budget of 600 tokens: turns of ~130 tokens, so about four fit, then it trims.
  await withService(
    { args: ["--max-history-tokens=600", "--rate-limit=0"] },
    async ({ client, sim }) => {
      const long = "tell me about walls and corridors ".repeat(8).trim();
      const sizes: number[] = [];
      for (let turn = 1; turn <= 12; turn++) {
        await client.send("maze/user_input", {
          session_id: "h",
          message: `${turn} ${long}`,
          request_id: `t${turn}`,
        });
        const done = await client.final("h", `t${turn}`);
        deepEqual(done.json!.type, "done", done.text);
        const messages = sim.received.at(-1)!.messages as { role: string; content: string }[];
        sizes.push(messages.length);
        // The engine sees the previous turns as alternating user/assistant messages.
        for (let i = 1; i < messages.length; i++) {
          deepEqual(messages[i].role, i % 2 === 1 ? "user" : "assistant");
        }
        deepEqual(messages.at(-1)!.content, `${turn} ${long}`);
      }
      // Grows by one turn (two messages) at a time, then drops several turns at once.
      deepEqual(sizes.slice(0, 3), [2, 4, 6]);
      const drops = sizes.slice(1).map((n, i) => n - sizes[i]).filter((d) => d < 0);
      assert(drops.length >= 1, `history never trimmed: ${sizes}`);
      assert(drops.every((d) => d <= -4), `trimmed one turn at a time: ${sizes}`);
      // The turn counter in the answer counts the user turns the engine saw.
      const last = await client.final("h", "t12");
      match(last.json!.response as string, /Turn \d+:/);
    },
  );
});

test("one session's turns run in order while another session runs in parallel", async () => {
  await withService({ sim: { ttftMs: 300, itlMs: 1 } }, async ({ client, sim }) => {
    await client.send("maze/user_input", { session_id: "a", message: "first", request_id: "a1" });
    await client.send("maze/user_input", { session_id: "a", message: "second", request_id: "a2" });
    await client.send("maze/user_input", { session_id: "b", message: "other", request_id: "b1" });
    const a2 = await client.final("a", "a2");
    const finals = client.received.filter((m) => m.json?.type === "done");
    const order = finals.map((m) => m.json!.request_id);
    // b1 did not wait for a's two turns, and a's turns answered in order.
    assert(order.indexOf("b1") < order.indexOf("a2"), `order: ${order}`);
    assert(order.indexOf("a1") < order.indexOf("a2"), `order: ${order}`);
    deepEqual(a2.json!.response, '[Maze guide] Turn 2: you said "second".');
    // The second turn of a was sent to the engine only after the first finished: it saw it in history.
    const seen = sim.received.find((b) =>
      (b.messages as { content: string }[]).at(-1)!.content === "second"
    )!;
    deepEqual((seen.messages as unknown[]).length, 4);
  });
});

test("reset clears the history, alone or before a message", async () => {
  await withService({}, async ({ client }) => {
    await client.send("maze/user_input", { session_id: "r", message: "one", request_id: "1" });
    await client.final("r", "1");
    await client.send("maze/user_input", { session_id: "r", message: "two", request_id: "2" });
    match((await client.final("r", "2")).json!.response as string, /Turn 2/);
    await client.send("maze/user_input", { session_id: "r", reset: true, request_id: "3" });
    const reset = await client.final("r", "3");
    deepEqual(reset.json!.finish_reason, "reset");
    await client.send("maze/user_input", { session_id: "r", message: "three", request_id: "4" });
    match((await client.final("r", "4")).json!.response as string, /Turn 1: you said "three"/);
    await client.send("maze/user_input", {
      session_id: "r",
      message: "four",
      reset: true,
      request_id: "5",
    });
    match((await client.final("r", "5")).json!.response as string, /Turn 1: you said "four"/);
  });
});

test("cancel aborts a running request and drops a queued one; history keeps neither", async () => {
  await withService({ sim: { ttftMs: 50, itlMs: 50, fillerTokens: 100 } }, async ({ client }) => {
    await client.send("maze/user_input", { session_id: "c", message: "slow", request_id: "run" });
    await client.send("maze/user_input", {
      session_id: "c",
      message: "queued",
      request_id: "wait",
    });
    await client.next((m) => m.json?.type === "delta" && m.json.request_id === "run");
    await client.send("maze/user_input", { session_id: "c", cancel: true });
    const running = await client.final("c", "run");
    const queued = await client.final("c", "wait");
    deepEqual((running.json!.error as { code: string }).code, "cancelled");
    deepEqual((queued.json!.error as { code: string }).code, "cancelled");
    await client.send("maze/user_input", {
      session_id: "c",
      message: "after",
      request_id: "after",
      params: { max_tokens: 8 },
    });
    const after = await client.final("c", "after");
    match(after.json!.response as string, /Turn 1: you said "after"/);
  });
});

test("MQTT 5: replies go to the Response Topic with the Correlation Data", async () => {
  await withService({ mqtt5: true }, async ({ client }) => {
    const mine = "maze/assistant_response/m5/replies";
    const correlationData = new TextEncoder().encode("corr-42");
    await client.send("maze/user_input", { session_id: "m5", message: "hi" }, {
      properties: { responseTopic: mine, correlationData: correlationData as never },
    });
    const done = await client.next((m) => m.topic === mine && m.json?.type === "done");
    deepEqual(
      new TextDecoder().decode(done.packet.properties!.correlationData as Uint8Array),
      "corr-42",
    );
    // Even a payload that names no session is answered there, on the session's own topic.
    await client.send("maze/user_input/m5", "{not json", {
      properties: { responseTopic: mine, correlationData: correlationData as never },
    });
    const error = await client.next((m) => m.topic === mine && m.json?.type === "error");
    deepEqual((error.json!.error as { code: string }).code, "invalid_request");
  });
});

test("each kind of bad input gets its error code and the service keeps answering", async () => {
  await withService(
    // A payload limit this small leaves no room for images: none are taken.
    {
      args: ["--max-payload-bytes=2048", "--max-images=0", "--stats-interval=0.3"],
      mqtt5: false,
    },
    async ({ client }) => {
      await client.subscribe("vllm-mqtt/stats");
      const code = async (payload: unknown, sessionId: string) => {
        await client.send("maze/user_input", payload);
        const reply = await client.final(sessionId);
        deepEqual(reply.json!.type, "error", reply.text);
        return (reply.json!.error as { code: string }).code;
      };
      deepEqual(await code({ session_id: "e1" }, "e1"), "invalid_request");
      deepEqual(await code({ session_id: "e2", message: 42 }, "e2"), "invalid_request");
      deepEqual(
        await code({ session_id: "e3", message: "x", params: { max_tokens: "many" } }, "e3"),
        "invalid_request",
      );
      deepEqual(
        await code({ session_id: "e4", message: "x", priority: 1.5 }, "e4"),
        "invalid_request",
      );
      deepEqual(await code({ session_id: "e5", message: "   " }, "e5"), "invalid_request");
      // Too large to parse, but its session id can still be read: answered.
      deepEqual(
        await code(JSON.stringify({ session_id: "big", message: "x".repeat(5000) }), "big"),
        "payload_too_large",
      );
      // Unaddressable: counted, not answered.
      await client.send("maze/user_input", "{not json");
      await client.send("maze/user_input", { session_id: "a/b", message: "inject a level" });
      await client.send("maze/user_input", { session_id: "#", message: "wildcard" });
      await client.send("maze/user_input", new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]));
      await client.send("maze/user_input", JSON.stringify({ message: "x".repeat(5000) }));
      await client.send("maze/user_input", "[".repeat(1000) + "]".repeat(1000));
      // Every other client is still served.
      await client.send("maze/user_input", { session_id: "ok", message: "still there?" });
      deepEqual((await client.final("ok")).json!.type, "done");
      assert(!client.received.some((m) => m.topic.includes("a/b")));
      // A report made after every outcome was counted (one may fall between the last request's
      // arrival and its answer).
      const stats = await client.next((m) => {
        if (m.topic !== "vllm-mqtt/stats") return false;
        const { answered, errors } = m.json!.totals as Record<string, number>;
        return answered + errors >= 13;
      });
      const totals = stats.json!.totals as Record<string, number>;
      deepEqual(totals.requests, 13);
      deepEqual(totals.answered, 1);
      deepEqual(totals.errors, 12);
    },
  );
});

test("a flood beyond the queue gets queue_full at once; accepted requests finish", async () => {
  const args = ["--max-queue=5", "--max-in-flight=2"];
  await withService({ args, sim: { ttftMs: 100, itlMs: 5 } }, async ({ client }) => {
    const n = 40;
    await Promise.all(
      Array.from(
        { length: n },
        (_, i) => client.send("maze/user_input", { session_id: `f${i}`, message: "go" }),
      ),
    );
    const finals = await Promise.all(Array.from({ length: n }, (_, i) => client.final(`f${i}`)));
    const full = finals.filter((m) =>
      (m.json!.error as { code?: string } | undefined)?.code === "queue_full"
    );
    const done = finals.filter((m) => m.json!.type === "done");
    deepEqual(full.length + done.length, n);
    assert(done.length >= 7 && full.length >= 20, `done ${done.length}, queue_full ${full.length}`);
    assert((full[0].json!.error as { retry_after_ms: number }).retry_after_ms > 0);
  });
});

test("a repeated request_id is answered again, not generated twice", async () => {
  await withService({}, async ({ client, sim }) => {
    await client.send("maze/user_input", { session_id: "d", message: "once", request_id: "same" });
    const first = await client.final("d", "same");
    const before = sim.received.length;
    client.received.length = 0;
    await client.send("maze/user_input", { session_id: "d", message: "once", request_id: "same" });
    const again = await client.final("d", "same");
    deepEqual(again.json!.response, first.json!.response);
    deepEqual(sim.received.length, before);
    // Marked as sent again, as a replay from history after a restart is; the first is not.
    deepEqual([first.json!.repeated, again.json!.repeated], [undefined, true]);
  });
});

test("sessions survive a restart and are forgotten after their TTL", async () => {
  await withService({}, async (f) => {
    const { client } = f;
    await client.send("maze/user_input", { session_id: "s", message: "one", request_id: "1" });
    await client.final("s", "1");
    deepEqual(await f.service.stop(), 0);
    // A short TTL from here on: the restart itself need not fit into it on a busy machine.
    f.service = await startService([...f.args, "--session-ttl=2"]);
    await client.send("maze/user_input", { session_id: "s", message: "two", request_id: "2" });
    match((await client.final("s", "2")).json!.response as string, /Turn 2: you said "two"/);
    await new Promise((resolve) => setTimeout(resolve, 2200));
    await client.send("maze/user_input", { session_id: "s", message: "three", request_id: "3" });
    match((await client.final("s", "3")).json!.response as string, /Turn 1: you said "three"/);
  });
});

test("the least recently used session is evicted beyond --max-sessions", async () => {
  await withService({ args: ["--max-sessions=2"] }, async ({ client }) => {
    for (const id of ["l1", "l2", "l3"]) {
      await client.send("maze/user_input", { session_id: id, message: "a", request_id: `${id}-a` });
      await client.final(id, `${id}-a`);
    }
    await client.send("maze/user_input", { session_id: "l1", message: "b", request_id: "l1-b" });
    match((await client.final("l1", "l1-b")).json!.response as string, /Turn 1/);
    await client.send("maze/user_input", { session_id: "l3", message: "b", request_id: "l3-b" });
    match((await client.final("l3", "l3-b")).json!.response as string, /Turn 2/);
  });
});

test("shutdown answers or cancels every accepted request, says offline and exits 0", async () => {
  const args = ["--shutdown-timeout=0.5", "--max-in-flight=2"];
  await withService(
    { args, sim: { ttftMs: 20, itlMs: 40, fillerTokens: 200 } },
    async ({ client, service }) => {
      await client.subscribe("vllm-mqtt/status");
      const online = await client.next((m) => m.topic === "vllm-mqtt/status");
      deepEqual(online.json!.status, "online");
      deepEqual(online.packet.retain, true);
      for (let i = 0; i < 6; i++) {
        await client.send("maze/user_input", {
          session_id: `x${i}`,
          message: "long",
        });
      }
      await client.next((m) => m.json?.type === "delta");
      deepEqual(await service.stop("SIGTERM"), 0);
      for (let i = 0; i < 6; i++) {
        const reply = await client.final(`x${i}`, undefined, 5000);
        if (reply.json!.type === "error") {
          deepEqual((reply.json!.error as { code: string }).code, "cancelled");
        }
      }
      await client.next((m) => m.topic === "vllm-mqtt/status" && m.json?.status === "offline");
    },
  );
});

Deno.test("without a broker URL, the embedded broker serves the main flow", async () => {
  const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
  const dataDir = await tempDir("vllm-mqtt-data-");
  const port = freePort();
  const service = await startService([
    "--engine=url",
    `--engine-url=${sim.url}`,
    `--embedded-broker-port=${port}`,
    `--data-dir=${dataDir}`,
    "--projects=maze",
  ]);
  const client = await TestClient.connect(`mqtt://127.0.0.1:${port}`, { protocolVersion: 4 });
  try {
    match(service.log(), /started the embedded broker/);
    await client.subscribe("maze/assistant_response/#");
    await client.send("maze/user_input", { session_id: "e", message: "hi" });
    const done = await client.final("e");
    deepEqual(done.json!.response, '[Maze guide] Turn 1: you said "hi".');
    assert(client.received.some((m) => m.json?.type === "delta"));
    await client.send("maze/user_input", { session_id: "e", message: "again" });
    await client.next((m) => m.json?.response === '[Maze guide] Turn 2: you said "again".');
  } finally {
    await client.close();
    deepEqual(await service.stop(), 0);
    await sim.close();
    await removeTempDir(dataDir);
  }
});

test("the HTTP endpoint reports health, readiness, status and metrics during traffic", async () => {
  const port = freePort();
  await withService(
    { args: [`--http-port=${port}`], sim: { ttftMs: 300, itlMs: 5 } },
    async ({ client }) => {
      const get = (path: string) => fetch(`http://127.0.0.1:${port}${path}`);
      equal(await (await get("/healthz")).text(), "ok\n");
      const ready = await get("/readyz");
      equal(ready.status, 200);
      deepEqual(await ready.json(), {
        ready: true,
        broker: true,
        engine: true,
        serving: true,
        storage: true,
      });

      for (let i = 0; i < 4; i++) {
        await client.send("maze/user_input", { session_id: `m${i}`, message: "hi" });
      }
      await client.send("general/user_input", "{not json");
      await client.send("general/user_input", { session_id: "bad/id", message: "x" });
      // Scraped while the four are in the engine.
      await waitFor(async () => (await (await get("/status")).json()).in_flight === 4);
      const during = await (await get("/metrics")).text();
      match(during, /^vllm_mqtt_in_flight 4$/m);
      match(during, /^vllm_mqtt_unaddressable_total\{code="invalid_request"\} 2$/m);

      for (let i = 0; i < 4; i++) equal((await client.final(`m${i}`)).json!.type, "done");
      const after = await (await get("/metrics")).text();
      match(after, /^vllm_mqtt_requests_total\{project="maze",outcome="answered"\} 4$/m);
      match(after, /^vllm_mqtt_request_duration_seconds_count 4$/m);
      match(after, /^vllm_mqtt_time_to_first_token_seconds_bucket\{le="0.05"\} 0$/m);
      match(after, /^vllm_mqtt_time_to_first_token_seconds_bucket\{le="\+Inf"\} 4$/m);
      match(after, /^vllm_mqtt_generation_tokens_total\{project="maze"\} [1-9]\d*$/m);
      match(after, /^vllm_mqtt_engine_up 1$/m);
      const status = await (await get("/status")).json();
      equal(status.status, "online");
      deepEqual(status.engine, { mode: "url", state: "ready", restarts: {} });
      const missing = await get("/nope");
      await missing.body?.cancel();
      equal(missing.status, 404);
    },
  );
});

test("a session over its rate gets rate_limited with a retry time; others are served", async () => {
  await withService(
    { args: ["--rate-limit=6", "--rate-limit-burst=2", "--rate-limit-client=0"] },
    async ({ client }) => {
      for (const id of ["1", "2", "3"]) {
        await client.send("maze/user_input", { session_id: "r", message: id, request_id: id });
      }
      equal((await client.final("r", "1")).json!.type, "done");
      equal((await client.final("r", "2")).json!.type, "done");
      const limited = (await client.final("r", "3")).json!.error as Record<string, unknown>;
      equal(limited.code, "rate_limited");
      // 6 a minute: the next token is about 10 s away.
      assert(
        (limited.retry_after_ms as number) > 5000 && (limited.retry_after_ms as number) <= 10_000,
      );
      await client.send("maze/user_input", { session_id: "other", message: "hi" });
      equal((await client.final("other")).json!.type, "done");
      // The original clients get the original plain-text error.
      await client.send("maze/user_input", { sessionId: "r", message: "again" });
      match(
        (await client.next((m) => m.topic === "maze/assistant_response/r" && !m.json)).text,
        /^Error: /,
      );
    },
  );
});

test("with --answer-unknown-projects, a project not served is answered unknown_project", async () => {
  await withService({ args: ["--answer-unknown-projects"] }, async ({ client }) => {
    await client.subscribe("racing/assistant_response/#");
    await client.send("racing/user_input", { session_id: "u", message: "hi" });
    const reply = await client.final("u");
    equal(reply.topic, "racing/assistant_response/u");
    equal((reply.json!.error as { code: string }).code, "unknown_project");
    // Served projects are still answered, once.
    await client.send("maze/user_input", { session_id: "k", message: "hi", request_id: "k1" });
    equal((await client.final("k", "k1")).json!.type, "done");
    await new Promise((resolve) => setTimeout(resolve, 200));
    equal(
      client.received.filter((m) => m.json?.request_id === "k1" && m.json.type === "done").length,
      1,
    );
  });
});
