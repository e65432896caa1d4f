/**
 * Unit tests of the gateway's admission steps: requests fed to the gateway
 * in-process, with a stand-in broker (`publish` records what would go on the
 * wire) and stand-in workers (a pool whose turns answer when the test says), on an
 * injected clock.
 */

import { deepEqual, equal, match } from "node:assert/strict";
import { Buffer } from "node:buffer";
import type { IPublishPacket } from "mqtt";
import { Gateway, type GatewayOptions } from "../../lib/gateway/gateway.ts";
import type { PublishOptions } from "../../lib/gateway/reply_publisher.ts";
import { Stats, type StatsEvent } from "../../lib/observability/stats.ts";
import { type RequestLimits, Topics } from "../../lib/protocol/mod.ts";
import type { SessionDirectory } from "../../lib/sessions/session_directory.ts";
import type { SessionSigner } from "../../lib/gateway/session_signer.ts";
import type { TurnResult, WorkerTurn } from "../../lib/workers/messages.ts";

const LIMITS: RequestLimits = {
  maxPayloadBytes: 65_536,
  maxMessageChars: 10_000,
  maxPriority: 10,
  maxTokens: 64,
  temperature: 0.7,
  topP: 1,
  stream: true,
};

interface Sent {
  readonly topic: string;
  readonly body: Record<string, unknown>;
  readonly options: PublishOptions;
}

/** A turn handed to the stand-in workers, finished by the test. */
interface Turn {
  readonly job: WorkerTurn;
  readonly onDelta: (seq: number, text: string) => void;
  readonly signal: AbortSignal;
  readonly finish: (result: TurnResult) => void;
  readonly fail: (error: unknown) => void;
}

const RESULT: TurnResult = { response: "hello", finishReason: "stop", usage: null, ttftMs: 3 };

/** A gateway serving project `general`, with every dependency a stand-in. */
function gateway(options: Partial<GatewayOptions> = {}) {
  const sent: Sent[] = [];
  const turns: Turn[] = [];
  const events: StatsEvent[] = [];
  const clock = { now: 1000 };
  const gauges = { queued: 0, inFlight: 0, liveSessions: 0, engineReady: true };
  const stats = new Stats(() => ({ ...gauges, engineRestarts: {} }));
  stats.watch((event) => events.push(event));
  const directory = {
    settled: () => Promise.resolve(),
    touch: () => {},
    has: () => false,
  } as unknown as SessionDirectory;
  const g = new Gateway({
    publish: (topic, payload, publishOptions) => {
      sent.push({ topic, body: JSON.parse(payload), options: publishOptions });
      return Promise.resolve();
    },
    subscribe: () => Promise.resolve(),
    unsubscribe: () => Promise.resolve(),
    pool: {
      run: (job, onDelta, signal) => {
        const { promise, resolve, reject } = Promise.withResolvers<TurnResult>();
        turns.push({ job, onDelta, signal: signal!, finish: resolve, fail: reject });
        return promise;
      },
      close: () => Promise.resolve(),
    },
    topics: new Topics("", "vllm"),
    projects: new Map([["general", "You are helpful."]]),
    directory,
    stats,
    engineHealth: {
      ready: () => Promise.resolve(),
      succeeded: () => {},
      failed: () => {},
      confirmDown: () => Promise.resolve(false),
    },
    engineWaitMs: 1000,
    limits: LIMITS,
    qos: 1,
    maxQueue: 10,
    maxInFlight: 4,
    dedupWindowMs: 60_000,
    rateLimit: { perSession: 0, perClient: 0, burst: 10 },
    controlStore: undefined,
    turnOrder: undefined,
    answerUnknownProjects: true,
    sessionTopicsOnly: false,
    signer: undefined,
    engineTokenCount: () => Promise.resolve(7),
    now: () => clock.now,
    ...options,
  });
  const send = (
    topic: string,
    payload: string | Record<string, unknown>,
    packet: Partial<IPublishPacket> = {},
  ) =>
    g.handle(
      topic,
      new TextEncoder().encode(typeof payload === "string" ? payload : JSON.stringify(payload)),
      { cmd: "publish", topic, payload: "", qos: 1, dup: false, retain: false, ...packet },
    );
  return { g, sent, turns, events, clock, send, stats };
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
const errorOf = (sent: Sent) => (sent.body.error as { code: string }).code;

Deno.test("admission: a request runs, its deltas and answer go to the session's topic", async () => {
  const { sent, turns, clock, send } = gateway();
  send("general/user_input", { session_id: "s1", request_id: "r1", message: "hi" });
  await tick();
  equal(turns.length, 1);
  equal(turns[0].job.message, "hi");
  equal(turns[0].job.systemPrompt, "You are helpful.");
  turns[0].onDelta(0, "hel");
  clock.now += 250;
  turns[0].finish(RESULT);
  await tick();
  deepEqual(sent.map((s) => [s.topic, s.body.type]), [
    ["general/assistant_response/s1", "delta"],
    ["general/assistant_response/s1", "done"],
  ]);
  deepEqual(sent[1].body.timing, { queue_ms: 0, ttft_ms: 3, total_ms: 250 });
  deepEqual(sent[1].options, { qos: 1 });
  equal(sent[1].body.request_id, "r1");
});

Deno.test("admission: bad JSON is answered only where it can be", () => {
  const { sent, events, send } = gateway();
  send("general/user_input", "{not json");
  equal(sent.length, 0, "no address: nothing to answer");
  deepEqual(events.at(-1), { kind: "error", project: undefined, code: "invalid_request" });
  // Nor at a Response Topic, which could be anyone's: no session, nobody to answer.
  const correlationData = Buffer.from([1, 2]);
  send("general/user_input", "{not json", {
    properties: { responseTopic: "general/assistant_response/s9", correlationData },
  });
  equal(sent.length, 0);
  // On a session's own topic, it is that session's, answered at a Response Topic below its own.
  send("general/user_input/s2", "{not json", {
    properties: { responseTopic: "general/assistant_response/s2/mine", correlationData },
  });
  equal(sent.length, 1);
  equal(sent[0].topic, "general/assistant_response/s2/mine");
  equal(errorOf(sent[0]), "invalid_request");
  deepEqual(sent[0].options, { qos: 1, correlationData });
  send("general/user_input", { session_id: "s1", message: 42 });
  equal(sent[1].topic, "general/assistant_response/s1");
  equal(errorOf(sent[1]), "invalid_request");
});

Deno.test("admission: a reply topic its sender may not read is refused on the session's own", async () => {
  const { g, sent, turns, send, stats } = gateway();
  await g.subscribe();
  const request = { session_id: "s1", message: "hi" };
  for (
    const topic of [
      "general/assistant_response/bob",
      "general/assistant_response/s10",
      "general/clear_history",
      "general/user_input/s1",
      "vllm/status",
      "$SYS/x",
      "elsewhere/replies",
    ]
  ) {
    send("general/user_input", request, { properties: { responseTopic: topic } });
    send("general/user_input", { ...request, reply_topic: topic });
  }
  await tick();
  equal(turns.length, 0);
  equal(sent.length, 14);
  for (const reply of sent) {
    equal(reply.topic, "general/assistant_response/s1");
    equal(errorOf(reply), "forbidden");
  }
  match(String((sent[0].body.error as { message: string }).message), /not one session s1 may read/);
  match(String((sent[4].body.error as { message: string }).message), /one the service listens to/);
  match(String((sent[8].body.error as { message: string }).message), /the service's own/);
  match(stats.prometheus(), /vllm_mqtt_reply_topics_refused_total\{project="general"\} 14/);
  // The session's own reply topic and those below it (the original clients' form) are taken.
  send("general/user_input", { ...request, reply_topic: "general/assistant_response/s1/c/r1" });
  send("general/user_input", request, {
    properties: { responseTopic: "general/assistant_response/s1" },
  });
  await tick();
  equal(turns.length, 1);
});

Deno.test("admission: --reply-topics patterns allow more, never the service's own topics", async () => {
  const { g, sent, turns, send } = gateway({
    replyTopics: ["replies/{username}/#", "{project}/#"],
  });
  await g.subscribe();
  // {username}: the session of the per-session topic the request came on; none on the shared.
  send("general/user_input/s1", { message: "hi" }, {
    properties: { responseTopic: "replies/s1/x" },
  });
  send("general/user_input", { session_id: "s1", message: "hi" }, {
    properties: { responseTopic: "replies/s1/x" },
  });
  // A pattern as wide as the project does not open the topics the service listens to.
  send("general/user_input/s2", { message: "hi", request_id: "c" }, {
    properties: { responseTopic: "general/clear_history" },
  });
  send("general/user_input/s2", { message: "hi", request_id: "t" }, {
    properties: { responseTopic: "general/template/s9" },
  });
  await tick();
  equal(turns.length, 1);
  deepEqual(sent.map((s) => [s.topic, errorOf(s)]), [
    ["general/assistant_response/s1", "forbidden"],
    ["general/assistant_response/s2", "forbidden"],
    ["general/assistant_response/s2", "forbidden"],
  ]);
  turns[0].finish(RESULT);
  await tick();
  deepEqual([sent.at(-1)!.topic, sent.at(-1)!.body.type], ["replies/s1/x", "done"]);
});

Deno.test("admission: a project not served is unknown_project", () => {
  const { sent, turns, send } = gateway();
  send("other/user_input", { session_id: "s1", message: "hi" });
  equal(sent.length, 1);
  equal(sent[0].topic, "other/assistant_response/s1");
  equal(errorOf(sent[0]), "unknown_project");
  equal(turns.length, 0);
});

Deno.test("admission: over the rate, rate_limited with the time to wait", async () => {
  const { sent, turns, clock, send } = gateway({
    rateLimit: { perSession: 60, perClient: 0, burst: 1 },
  });
  send("general/user_input", { session_id: "s1", message: "one" });
  send("general/user_input", { session_id: "s1", message: "two" });
  await tick();
  equal(turns.length, 1);
  equal(errorOf(sent[0]), "rate_limited");
  equal((sent[0].body.error as { retry_after_ms: number }).retry_after_ms, 1000);
  clock.now += 1000;
  send("general/user_input", { session_id: "s1", message: "three" });
  equal(sent.length, 1, "a token came back after a second");
});

Deno.test("admission: a redelivered copy (DUP) is dropped; a retry gets the answer again", async () => {
  const { g, sent, turns, send } = gateway();
  const request = { session_id: "s1", request_id: "r1", message: "hi" };
  send("general/user_input", request);
  await tick();
  send("general/user_input", request, { dup: true });
  send("general/user_input", request);
  await tick();
  equal(turns.length, 1, "generated once");
  equal(sent.length, 0, "a copy of a running request is only dropped");
  turns[0].finish(RESULT);
  await tick();
  equal(sent.length, 1);
  send("general/user_input", request, { dup: true });
  equal(sent.length, 1, "a redelivery is never answered twice");
  send("general/user_input", request);
  equal(sent.length, 2, "a client's retry is sent the answer again");
  // The same answer, marked as sent again.
  deepEqual(sent[1].body, { ...sent[0].body, repeated: true });
  // Without a request_id only a flagged redelivery of the same bytes is a copy.
  const plain = { session_id: "s2", message: "again" };
  send("general/user_input", plain);
  send("general/user_input", plain, { dup: true });
  send("general/user_input", plain);
  await tick();
  equal(turns.length, 2);
  equal(g.queued, 1, "the same text sent again is a turn of its own, behind the first");
  turns[1].finish(RESULT);
  await tick();
  equal(turns.length, 3);
});

Deno.test("admission: a full queue is queue_full", async () => {
  const { sent, turns, send } = gateway({ maxQueue: 1, maxInFlight: 1 });
  send("general/user_input", { session_id: "a", message: "1" });
  send("general/user_input", { session_id: "b", message: "2" });
  send("general/user_input", { session_id: "c", message: "3" });
  await tick();
  equal(turns.length, 1);
  equal(sent.length, 1);
  equal(sent[0].topic, "general/assistant_response/c");
  deepEqual(sent[0].body.error, {
    code: "queue_full",
    message: "the queue is full (1 waiting)",
    retry_after_ms: 1000,
  });
});

Deno.test("admission: past the memory budget, overloaded with a retry hint; each ending gives its share back", async () => {
  // A 10,000-character message holds 40,000 bytes (its text, on the gateway and its worker)
  // until its turn ends; its payload takes about 30,000 while it is parsed.
  const { sent, turns, send } = gateway({ payloadMemory: 100_000 });
  const big = (session_id: string, extra: Record<string, unknown> = {}) => ({
    session_id,
    message: "m".repeat(10_000),
    ...extra,
  });
  send("general/user_input", big("a"));
  // Copies and cancels with nothing to cancel hold nothing once answered.
  for (let i = 0; i < 5; i++) {
    send("general/user_input", big("a"), { dup: true });
    send("general/user_input", {
      session_id: "z",
      cancel: true,
      system_prompt: "m".repeat(10_000),
    });
  }
  equal(sent.filter((s) => errorOf(s) !== "not_found").length, 0);
  send("general/user_input", big("b"));
  await tick();
  equal(turns.length, 2);
  send("general/user_input", big("c", { request_id: "c1" }));
  const error = sent.at(-1)!.body.error as {
    code: string;
    message: string;
    retry_after_ms: number;
  };
  equal(sent.at(-1)!.topic, "general/assistant_response/c");
  deepEqual([error.code, error.retry_after_ms], ["overloaded", 1000]);
  match(error.message, /hold 0\.1 MB of the 0\.1 MB of --payload-memory/);
  turns[0].finish(RESULT);
  await tick();
  send("general/user_input", big("c", { request_id: "c1" }));
  await tick();
  equal(turns.length, 3, "the turn that ended gave its share back");
  // One that could never fit is not told to retry.
  send("general/user_input", big("d", { x: Array.from({ length: 2000 }, () => []) }));
  const tooLarge = sent.at(-1)!.body.error as { code: string; message: string };
  equal(tooLarge.code, "payload_too_large");
  match(tooLarge.message, /about 0\.2 MB of memory \(2,002 arrays and objects\)/);
});

Deno.test("admission: audio clips are held in the memory budget until their turn ends", async () => {
  // A 13.6 KB WAV is an 18,200-character data URL: a request holds twice that (the gateway's
  // copy and its worker's) until its turn ends, and takes about 55,000 bytes while parsed.
  const wav = await Deno.readFile(new URL("../fixtures/audio/hello.wav", import.meta.url));
  const clip = `data:audio/wav;base64,${Buffer.from(wav).toString("base64")}`;
  const limits = { ...LIMITS, maxAudioClips: 1, maxAudioBytes: 1 << 20, maxAudioMs: 30_000 };
  const { sent, turns, send } = gateway({ payloadMemory: 100_000, limits });
  send("general/user_input", { session_id: "a", audio: [clip] });
  send("general/user_input", { session_id: "b", audio: [clip] });
  await tick();
  equal(turns.length, 2);
  send("general/user_input", { session_id: "c", audio: [clip] });
  equal(errorOf(sent.at(-1)!), "overloaded");
  turns[0].finish(RESULT);
  await tick();
  send("general/user_input", { session_id: "c", audio: [clip] });
  await tick();
  equal(turns.length, 3, "the turn that ended gave its share back");
});

Deno.test("admission: a request refused after parsing (forbidden) holds no memory", async () => {
  const { sent, turns, send } = gateway({ payloadMemory: 100_000, sessionTopicsOnly: true });
  const big = (session_id: string) => ({ session_id, message: "m".repeat(10_000) });
  for (let i = 0; i < 5; i++) send("general/user_input", big(`s${i}`));
  deepEqual(sent.map(errorOf), Array(5).fill("forbidden"));
  send("general/user_input/a", big("a"));
  send("general/user_input/b", big("b"));
  await tick();
  equal(turns.length, 2);
});

Deno.test("admission: a cancel aborts the session's turn, or is not_found", async () => {
  const { sent, turns, send } = gateway();
  send("general/user_input", { session_id: "s1", cancel: true });
  equal(errorOf(sent[0]), "not_found");
  send("general/user_input", { session_id: "s1", request_id: "r1", message: "hi" });
  await tick();
  send("general/user_input", { session_id: "s1", request_id: "r1", cancel: true });
  equal(turns[0].signal.aborted, true);
  equal(turns[0].signal.reason.code, "cancelled");
});

Deno.test("admission: a turn cancelled while it waits to start is never run", async () => {
  const waiting = Promise.withResolvers<void>();
  const directory = { settled: () => waiting.promise, touch: () => {}, has: () => false };
  const { sent, turns, send } = gateway({ directory: directory as unknown as SessionDirectory });
  send("general/user_input", { session_id: "s1", request_id: "r1", message: "hi" });
  await tick();
  send("general/user_input", { session_id: "s1", request_id: "r1", cancel: true });
  waiting.resolve();
  await tick();
  equal(turns.length, 0);
  deepEqual(sent.map((s) => [s.body.request_id, errorOf(s)]), [["r1", "cancelled"]]);
});

Deno.test("admission: while stopping, cancelled with a retry hint; drain fails what is left", async () => {
  const { g, sent, turns, send } = gateway();
  send("general/user_input", { session_id: "s1", message: "running" });
  await tick();
  g.stopAccepting();
  send("general/user_input", { session_id: "s2", message: "late" });
  deepEqual(sent[0].body.error, {
    code: "cancelled",
    message: "the service is shutting down",
    retry_after_ms: 5000,
  });
  const drained = g.drain(0);
  await tick();
  equal(turns[0].signal.aborted, true);
  turns[0].fail(turns[0].signal.reason);
  await drained;
  equal(errorOf(sent[1]), "cancelled");
  equal(sent[1].topic, "general/assistant_response/s1");
});

Deno.test("admission: a retained message is ignored", async () => {
  const { sent, turns, events, send } = gateway();
  send("general/user_input", { session_id: "s1", message: "stale" }, { retain: true });
  await tick();
  equal(turns.length + sent.length, 0);
  deepEqual(events, [{ kind: "ignored", reason: "retained" }]);
});

Deno.test("admission: under signed ids, sessions not seen draw from the project's new sessions first", async () => {
  const live = new Set(["old"]);
  const directory = {
    settled: () => Promise.resolve(),
    touch: () => {},
    has: (_project: string, sessionId: string) => live.has(sessionId),
  };
  const { sent, turns, clock, send } = gateway({
    directory: directory as unknown as SessionDirectory,
    rateLimit: { perSession: 60, perClient: 0, burst: 20, newSessions: 3 },
    maxInFlight: 10,
    signer: { verify: () => true } as unknown as SessionSigner,
  });
  // Rotating ids: three new sessions start, the rest wait for the project's next one.
  for (let i = 0; i < 6; i++) send("general/user_input", { session_id: `r${i}`, message: "hi" });
  await tick();
  equal(turns.length, 3);
  deepEqual(sent.map((s) => [s.topic, errorOf(s)]), [
    ["general/assistant_response/r3", "rate_limited"],
    ["general/assistant_response/r4", "rate_limited"],
    ["general/assistant_response/r5", "rate_limited"],
  ]);
  equal((sent[0].body.error as { retry_after_ms: number }).retry_after_ms, 20_000);
  // A session already started, or live from before, is not new.
  send("general/user_input", { session_id: "r0", message: "again" });
  send("general/user_input", { session_id: "old", message: "back" });
  await tick();
  equal(sent.length, 3, "refused");
  equal(turns.length, 4, "old runs; r0's second turn waits for its first");
  clock.now += 20_000;
  send("general/user_input", { session_id: "r3", message: "hi" });
  await tick();
  equal(sent.length, 3, "refused");
  equal(turns.length, 5);
});

Deno.test("admission: a reply topic the broker cannot carry refuses the request before it runs", async () => {
  const { sent, turns, send, g } = gateway({
    broker: {
      fits: () => true,
      maxPacketBytes: Infinity,
      topicRefusal: (topic) => topic.includes(".") ? "no '.' in a topic" : undefined,
    },
  });
  send("general/user_input", { session_id: "abc.def", message: "hi" });
  send("general/user_input", { session_id: "fine", message: "hi" });
  await tick();
  deepEqual(turns.map((t) => t.job.sessionId), ["fine"]);
  equal(sent.length, 0);
  equal(g.queued + g.inFlight, 1);
});

Deno.test("admission: a message no subscription of this run matches is ignored", async () => {
  const { sent, turns, send, events } = gateway({ answerUnknownProjects: false });
  send("racing/user_input", { session_id: "s", message: "hi" });
  await tick();
  equal(turns.length, 0);
  equal(sent.length, 0);
  deepEqual(events, [{ kind: "ignored", reason: "unsubscribed" }]);
});

Deno.test("admission: every refusal after parsing gives the request's memory back", async () => {
  // Each 10,000-character request holds 40,000 bytes of the 100,000 until it ends: five refused
  // ones that kept theirs would leave no room for the two taken at the end.
  const big = (session_id: string, extra: Record<string, unknown> = {}) => ({
    session_id,
    message: "m".repeat(10_000),
    ...extra,
  });
  const refusals: [
    string,
    Partial<GatewayOptions>,
    (i: number) => [string, Record<string, unknown>],
  ][] = [
    ["unknown_project", {}, (i) => ["racing/user_input", big(`u${i}`)]],
    [
      "forbidden reply topic",
      {},
      (i) => ["general/user_input", big(`f${i}`, { reply_topic: "x" })],
    ],
    ["rate_limited", { rateLimit: { perSession: 1, perClient: 0, burst: 1 } }, () => [
      "general/user_input",
      big("r"),
    ]],
    ["unreachable reply topic", {
      broker: {
        fits: () => true,
        maxPacketBytes: Infinity,
        topicRefusal: (topic) => topic.includes(".") ? "no '.' in a topic" : undefined,
      },
    }, (i) => ["general/user_input", big(`n.${i}`)]],
  ];
  for (const [name, options, request] of refusals) {
    const { turns, send } = gateway({ payloadMemory: 100_000, ...options });
    for (let i = 0; i < 5; i++) send(...request(i));
    await tick();
    // What was taken (the rate limit's first) ends, and gives its share back.
    for (const turn of turns) turn.finish(RESULT);
    await tick();
    const before = turns.length;
    send("general/user_input", big("a"));
    send("general/user_input", big("b"));
    await tick();
    equal(turns.length - before, 2, name);
  }
});
