/**
 * Unit tests of the gateway's admission steps: requests fed to the gateway
 * in-process, with a stand-in broker (`publish` records what would go on the
 * wire) and stand-in workers (`runTurn` answers when the test says), on an
 * injected clock.
 */

import { deepEqual, equal } from "node:assert/strict";
import { Buffer } from "node:buffer";
import type { IPublishPacket } from "mqtt";
import { Gateway, type GatewayOptions } from "../../lib/gateway/gateway.ts";
import type { PublishOptions } from "../../lib/gateway/reply_publisher.ts";
import { Stats, type StatsEvent } from "../../lib/observability/stats.ts";
import { type RequestLimits, Topics } from "../../lib/protocol/mod.ts";
import type { SessionDirectory } from "../../lib/sessions/session_directory.ts";
import type { TurnJob, TurnResult } from "../../lib/workers/messages.ts";

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
  readonly job: TurnJob;
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
  } as unknown as SessionDirectory;
  const g = new Gateway({
    publish: (topic, payload, publishOptions) => {
      sent.push({ topic, body: JSON.parse(payload), options: publishOptions });
      return Promise.resolve();
    },
    subscribe: () => Promise.resolve(),
    unsubscribe: () => Promise.resolve(),
    runTurn: (job, onDelta, signal) => {
      const { promise, resolve, reject } = Promise.withResolvers<TurnResult>();
      turns.push({ job, onDelta, signal, finish: resolve, fail: reject });
      return promise;
    },
    topics: new Topics("", "vllm"),
    projects: new Map([["general", "You are helpful."]]),
    directory,
    stats,
    engineHealth: { ready: () => Promise.resolve(), succeeded: () => {}, failed: () => {} },
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
  return { g, sent, turns, events, clock, send };
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
  const correlationData = Buffer.from([1, 2]);
  send("general/user_input", "{not json", {
    properties: { responseTopic: "client/replies", correlationData },
  });
  equal(sent.length, 1);
  equal(sent[0].topic, "client/replies");
  equal(errorOf(sent[0]), "invalid_request");
  deepEqual(sent[0].options, { qos: 1, correlationData });
  send("general/user_input", { session_id: "s1", message: 42 });
  equal(sent[1].topic, "general/assistant_response/s1");
  equal(errorOf(sent[1]), "invalid_request");
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
  const directory = { settled: () => waiting.promise, touch: () => {} };
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
