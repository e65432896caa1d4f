/**
 * Unit tests of the turn runner (lib/gateway/turn_runner.ts) with several
 * engines: what each engine's lease is told when a turn moves to another
 * engine, when it is cancelled while it waited for one, and that such a turn
 * is answered and counted once (stats, the experiment's outcomes).
 */

import { deepEqual, equal, rejects } from "node:assert/strict";
import { Prompts } from "../../lib/gateway/prompts.ts";
import type { EngineTurnOutcome, TurnEngines } from "../../lib/gateway/turn_engines.ts";
import type { TurnJob } from "../../lib/gateway/jobs.ts";
import { runTurnJob, type TurnRunnerOptions } from "../../lib/gateway/turn_runner.ts";
import type { ChatRequest, ReplyBody } from "../../lib/protocol/mod.ts";
import { ServiceError } from "../../lib/protocol/errors.ts";
import type { TurnResult, WorkerTurn } from "../../lib/workers/messages.ts";
import type { TurnOutcome } from "../../lib/observability/experiment_monitor.ts";

const request: ChatRequest = {
  project: "maze",
  sessionId: "s1",
  requestId: "r1",
  message: "hello",
  priority: 0,
  stream: true,
  params: { max_tokens: 64, temperature: 0.7, top_p: 1 },
  reset: false,
  cancel: false,
  style: "json",
  systemPrompt: undefined,
  replyTopic: undefined,
  clientId: undefined,
};

function job(): TurnJob {
  return {
    kind: "turn",
    id: 1,
    sessionKey: "maze/s1",
    priority: 0,
    request,
    target: {
      project: "maze",
      topic: "maze/assistant_response/s1",
      style: "json",
      sessionId: "s1",
      requestId: "r1",
      correlationData: undefined,
    },
    receivedAt: 0,
    dedupKey: "maze/s1/r1",
  };
}

const answer: TurnResult = {
  response: "hi",
  finishReason: "stop",
  usage: { prompt_tokens: 20, completion_tokens: 2, total_tokens: 22 },
  ttftMs: 5,
};

/**
 * Engines that hand out leases in turn and note what each was told, and a runner over them,
 * on a clock the test moves (`clock.now`).
 */
function setup(
  run: (turn: WorkerTurn, onDelta: (seq: number, text: string) => void) => Promise<TurnResult>,
  acquired: (index: number) => void = () => {},
) {
  const told: { engine: number; outcome: EngineTurnOutcome }[] = [];
  const replies: ReplyBody[] = [];
  const counted: string[] = [];
  const outcomes: TurnOutcome[] = [];
  const clock = { now: 0 };
  let next = 0;
  const engines: TurnEngines = {
    acquire: (_turn, exclude) => {
      while (exclude.has(next)) next++;
      const index = next;
      acquired(index);
      return Promise.resolve({
        index,
        health: {
          succeeded: () => {},
          failed: () => {},
          // Down: the turn may go to another engine.
          confirmDown: () => Promise.resolve(true),
        },
        prefilled: () => {},
        finished: (outcome) => told.push({ engine: index, outcome }),
      });
    },
  };
  const options = {
    pool: { run, close: () => Promise.resolve() },
    prompts: new Prompts(new Map([["maze", "# Maze"]]), () => Promise.resolve(undefined)),
    replies: { reply: (_target: unknown, body: ReplyBody) => replies.push(body) },
    recent: { answered: () => {} },
    directory: { settled: () => Promise.resolve(), touch: () => {} },
    stats: {
      answered: () => counted.push("answered"),
      ignored: () => counted.push("ignored"),
    },
    engines,
    storageHealth: undefined,
    engineWaitMs: 10_000,
    projectFiles: undefined,
    experiments: {
      assign: () => Promise.resolve({ name: "b", weight: 1 }),
    },
    experimentMonitor: {
      turnEnded: (_p: string, _s: string, _r: string, variant: string, outcome: TurnOutcome) => {
        counted.push(`outcome ${variant}`);
        outcomes.push(outcome);
      },
    },
    now: () => clock.now,
  } as unknown as TurnRunnerOptions;
  return { options, told, replies, counted, outcomes, clock };
}

Deno.test("turn runner: a turn whose engine is down moves to another, each lease told once, the turn counted once", async () => {
  const ran: (number | undefined)[] = [];
  const { options, told, replies, counted, outcomes, clock } = setup((turn) => {
    ran.push(turn.engine);
    if (turn.engine !== undefined) return Promise.resolve(answer);
    // The first engine takes a second to fail the turn.
    clock.now += 1000;
    return Promise.reject(new ServiceError("engine_unavailable", "connection refused"));
  });
  await runTurnJob(options, job(), new AbortController().signal);
  deepEqual(ran, [undefined, 1]);
  deepEqual(told.map(({ engine, outcome }) => [engine, outcome.ok]), [[0, false], [1, true]]);
  equal(told[1].outcome.promptTokens, 20);
  deepEqual(replies.map((r) => r.type), ["done"]);
  deepEqual(counted, ["answered", "outcome b"]);
  // The first token came a second and 5 ms after the turn arrived: the failed try counts.
  const done = replies[0] as Extract<ReplyBody, { type: "done" }>;
  equal(done.timing.ttft_ms, 1005);
  equal(outcomes[0].ttfdMs, 1005);
});

Deno.test("turn runner: a turn cancelled while it waited for its engine is no failure of that engine's", async () => {
  const cancel = new AbortController();
  const { options, told, replies } = setup(
    () => Promise.resolve(answer),
    () => cancel.abort(new ServiceError("cancelled", "cancelled by the client")),
  );
  await rejects(runTurnJob(options, job(), cancel.signal), /cancelled by the client/);
  deepEqual(told.map(({ engine, outcome }) => [engine, outcome.ok]), [[0, true]]);
  deepEqual(replies, []);
});
