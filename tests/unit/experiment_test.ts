/**
 * Unit tests of experiments (lib/projects/experiment.ts, lib/gateway/experiments.ts):
 * the front matter's variants and their errors, the assignment hash against
 * the weights (2,000 sessions split 90/10 within binomial bounds), stopped
 * variants and winners, and the stored assignment in an in-memory Deno KV
 * (first write wins, a weight change moves no stored session).
 */

import { deepEqual, equal, match, ok, rejects, throws } from "node:assert/strict";
import { ConfigError } from "../../lib/config/config.ts";
import {
  assignVariant,
  type Experiment,
  pickVariant,
  servedVariant,
  variantPoint,
} from "../../lib/projects/experiment.ts";
import { parseProjectFile, type Project } from "../../lib/projects/project_file.ts";
import { Experiments, readExperimentControl, stopVariant } from "../../lib/gateway/experiments.ts";
import { ServiceError } from "../../lib/protocol/errors.ts";
import { FeedbackTopic, parseFeedback } from "../../lib/gateway/feedback_topic.ts";
import { Topics } from "../../lib/protocol/topics.ts";
import type { Session } from "../../lib/sessions/records.ts";

const file = (front: string) => `---\n${front}\n---\n# Maze\nGuide the player.\n`;

function project(front: string, name = "maze"): Project {
  return parseProjectFile(name, `prompts/${name}.md`, file(front));
}

function experiment(weights: Record<string, number>, salt = "maze"): Experiment {
  return {
    salt,
    allowRequest: false,
    variants: Object.entries(weights).map(([name, weight]) => ({ name, weight })),
  };
}

Deno.test("variants: parsed from the front matter, with the salt defaulting to the project", () => {
  const p = project(
    "variants:\n  - name: a\n    weight: 80\n  - name: b\n    weight: 20\n" +
      "    model: maze-lora-v2\n    temperature: 0.2\n    top_p: 0.9\n    max_tokens: 64",
  );
  equal(p.experiment?.salt, "maze");
  equal(p.experiment?.allowRequest, false);
  equal(p.experiment?.variants.length, 2);
  const b = p.experiment!.variants[1];
  equal(b.model, "maze-lora-v2");
  equal(b.temperature, 0.2);
  equal(b.topP, 0.9);
  equal(b.maxTokens, 64);
  equal(project("experiment: x-1\nvariants:\n  - name: a\n    weight: 1").experiment?.salt, "x-1");
  equal(project("state_topic: true").experiment, undefined);
});

Deno.test("variants: bad values stop the start-up naming the file and the value", () => {
  const bad: [string, RegExp][] = [
    ["variants: []", /prompts\/maze\.md: .*'variants'/],
    ["variants:\n  - name: a\n    weight: 1\n  - name: a\n    weight: 2", /"a" is used twice/],
    ["variants:\n  - name: a\n    weight: -1", /variants\[0\] \(a\)\.weight.*-1/],
    ["variants:\n  - name: a\n    weight: 0", /weights sum to 0/],
    ["variants:\n  - name: a b\n    weight: 1", /variants\[0\]\.name/],
    ["variants:\n  - name: a\n    weight: 1\n    colour: red", /unknown key/],
    ["variants:\n  - name: a\n    weight: 1\n    prompt: ../secret", /prompt/],
    ["variants:\n  - name: a\n    weight: 1\n    temperature: 3", /temperature.*3/],
    ["allow_variant_request: true", /no 'variants'/],
  ];
  for (const [front, message] of bad) {
    throws(() => project(front), (error: unknown) => {
      ok(error instanceof ConfigError, String(error));
      match((error as Error).message, message);
      return true;
    });
  }
});

Deno.test("assignment: 2,000 sessions split 90/10 within binomial bounds", () => {
  const e = experiment({ a: 90, b: 10 });
  let b = 0;
  for (let i = 0; i < 2000; i++) if (assignVariant(e, `session-${i}`) === "b") b++;
  // Mean 200, standard deviation sqrt(2000 * 0.1 * 0.9) = 13.4: four of them either side.
  ok(b > 200 - 4 * 13.4 && b < 200 + 4 * 13.4, `${b} of 2000 on b`);
  // Random-looking ids (UUIDs) too.
  let c = 0;
  for (let i = 0; i < 2000; i++) if (assignVariant(e, crypto.randomUUID()) === "b") c++;
  ok(c > 200 - 4 * 13.4 && c < 200 + 4 * 13.4, `${c} of 2000 UUIDs on b`);
});

Deno.test("assignment: stable, salted, and weight 0 never picked", () => {
  const e = experiment({ a: 50, b: 50 });
  equal(assignVariant(e, "s1"), assignVariant(e, "s1"));
  const point = variantPoint("maze", "s1");
  ok(point >= 0 && point < 1);
  ok(variantPoint("other", "s1") !== point);
  for (let i = 0; i < 200; i++) equal(assignVariant(experiment({ a: 1, b: 0 }), `s${i}`), "a");
  equal(pickVariant([{ name: "a", weight: 0 }], 0.5), undefined);
  equal(pickVariant([{ name: "a", weight: 1 }, { name: "b", weight: 1 }], 0.999999), "b");
});

Deno.test("served variant: a winner takes every session; a stopped variant's move by the hash", () => {
  const e = experiment({ a: 50, b: 25, c: 25 });
  const control = { stopped: ["b"], reasons: { b: "errors" }, at: 1 };
  for (let i = 0; i < 300; i++) {
    const id = `s${i}`;
    equal(servedVariant(e, "a", id, { ...control, winner: "c" }), "c");
    equal(servedVariant(e, "a", id, control), "a");
    const moved = servedVariant(e, "b", id, control);
    ok(moved === "a" || moved === "c");
    // The same on every instance: a function of the session alone.
    equal(servedVariant(e, "b", id, control), moved);
  }
  // A variant no longer in the file is treated as stopped.
  ok(["a", "b", "c"].includes(servedVariant(e, "gone", "s1", undefined)));
});

function withExperiments(
  front: string,
  run: (experiments: Experiments, path: string) => Promise<void>,
): () => Promise<void> {
  return async () => {
    const dir = await Deno.makeTempDir();
    const path = `${dir}/kv`;
    const p = project(front);
    const experiments = await Experiments.open(path, {
      projects: new Map([["maze", p]]),
      ttlMs: 60_000,
      controlReloadMs: 60_000,
    });
    try {
      await run(experiments, path);
    } finally {
      experiments.close();
      await Deno.remove(dir, { recursive: true });
    }
  };
}

const AB = "variants:\n  - name: a\n    weight: 50\n  - name: b\n    weight: 50";

Deno.test(
  "stored assignment: kept across a weight change and read by another instance",
  withExperiments(AB, async (experiments, path) => {
    const ids = Array.from({ length: 40 }, (_, i) => `s${i}`);
    const first = new Map<string, string>();
    for (const id of ids) first.set(id, (await experiments.assign("maze", id))!.name);
    equal(experiments.known("maze", "s0"), first.get("s0"));
    // Another instance whose file gives everything to a.
    const moved = project("variants:\n  - name: a\n    weight: 1\n  - name: b\n    weight: 0");
    const other = await Experiments.open(path, {
      projects: new Map([["maze", moved]]),
      ttlMs: 60_000,
      controlReloadMs: 60_000,
    });
    try {
      for (const id of ids) equal((await other.assign("maze", id))!.name, first.get(id));
      equal((await other.assign("maze", "new-session"))!.name, "a");
    } finally {
      other.close();
    }
    ok([...first.values()].includes("b"));
  }),
);

Deno.test(
  "stored assignment: the first of two concurrent writers wins",
  withExperiments(AB, async (experiments, path) => {
    const other = await Experiments.open(path, {
      projects: new Map([[
        "maze",
        project("variants:\n  - name: a\n    weight: 0\n  - name: b\n    weight: 1"),
      ]]),
      ttlMs: 60_000,
      controlReloadMs: 60_000,
    });
    try {
      for (let i = 0; i < 20; i++) {
        const [x, y] = await Promise.all([
          experiments.assign("maze", `race${i}`),
          other.assign("maze", `race${i}`),
        ]);
        equal(x!.name, y!.name);
      }
    } finally {
      other.close();
    }
  }),
);

Deno.test(
  "control: stopVariant and a winner change what answers, stored for every instance",
  withExperiments(AB, async (experiments, path) => {
    const ids = Array.from({ length: 40 }, (_, i) => `s${i}`);
    for (const id of ids) await experiments.assign("maze", id);
    const kv = await Deno.openKv(path);
    try {
      await stopVariant(kv, "maze", "maze", "b", "too slow");
      equal((await readExperimentControl(kv, "maze", "maze"))?.reasons.b, "too slow");
    } finally {
      kv.close();
    }
    await experiments.reload();
    for (const id of ids) equal((await experiments.assign("maze", id))!.name, "a");
    await experiments.decide("maze", { winner: "b" });
    for (const id of ids) equal(experiments.known("maze", id), "b");
  }),
);

Deno.test(
  "requested variant: refused unless the project allows it",
  withExperiments(AB, async (experiments) => {
    await rejects(experiments.assign("maze", "s1", "b"), (error: unknown) => {
      ok(error instanceof ServiceError);
      equal(error.code, "forbidden");
      return true;
    });
  }),
);

Deno.test(
  "requested variant: taken where allowed, and kept by the session",
  withExperiments(`allow_variant_request: true\n${AB}`, async (experiments) => {
    equal((await experiments.assign("maze", "pick", "b"))!.name, "b");
    equal((await experiments.assign("maze", "pick"))!.name, "b");
    await rejects(experiments.assign("maze", "pick", "a"), /answered by variant b/);
    await rejects(experiments.assign("maze", "pick", "z"), /no variant "z"/);
  }),
);

Deno.test("feedback payloads: request_id and a score or label; anything else refused with a reason", () => {
  const read = (value: unknown) =>
    parseFeedback(
      new TextEncoder().encode(typeof value === "string" ? value : JSON.stringify(value)),
    );
  const good = read({ request_id: "r7", score: 1, label: "maze solved in 12 moves" });
  ok(good.ok);
  equal(good.requestId, "r7");
  equal(good.score, 1);
  ok(read({ request_id: "r7", score: 2.5 }).ok);
  ok(read({ request_id: "r7", score: 0 }).ok);
  ok(read({ request_id: "r7", label: "lost" }).ok);
  const refused: [unknown, RegExp][] = [
    ["{", /not valid JSON/],
    [[1], /JSON object/],
    [{ score: 1 }, /'request_id'/],
    [{ request_id: "r7" }, /'score' or a 'label'/],
    [{ request_id: "r7", score: "1" }, /finite number/],
    // A score sum is a counter on /metrics: a negative score would read as a restart.
    [{ request_id: "r7", score: -2.5 }, /0 or more/],
    [{ request_id: "r7", label: "x".repeat(501) }, /at most 500/],
    [{ request_id: "r7", score: 1, rating: 5 }, /'rating' is not a feedback field/],
  ];
  for (const [value, reason] of refused) {
    const outcome = read(value);
    ok(!outcome.ok, JSON.stringify(value));
    equal(outcome.error.code, "invalid_request");
    match(outcome.error.message, reason);
  }
  const large = parseFeedback(new Uint8Array(5000));
  ok(!large.ok);
  equal(large.error.code, "payload_too_large");
});

Deno.test("variants: a variant's response format with the project's tools is refused", () => {
  const front = [
    "tools:",
    "  - type: function",
    "    function: { name: look, parameters: { type: object, properties: { x: { type: integer } } } }",
    "    maps_to: { look: x }",
    "variants:",
    "  - name: a",
    "    weight: 1",
    "    response_format: { name: x, schema: { type: object } }",
  ].join("\n");
  throws(() => project(front), /variants \(a\)\.response_format.*tools/);
});

Deno.test(
  "stored assignment: a new experiment name deals the sessions anew",
  withExperiments(AB, async (experiments, path) => {
    const ids = Array.from({ length: 40 }, (_, i) => `s${i}`);
    for (const id of ids) await experiments.assign("maze", id);
    const renamed = project(
      "experiment: next\nvariants:\n  - name: a\n    weight: 0\n  - name: c\n    weight: 1",
    );
    const next = await Experiments.open(path, {
      projects: new Map([["maze", renamed]]),
      ttlMs: 60_000,
      controlReloadMs: 60_000,
    });
    try {
      for (const id of ids) equal((await next.assign("maze", id))!.name, "c");
    } finally {
      next.close();
    }
  }),
);

Deno.test(
  "control: a new experiment name starts without the last one's winner or stops",
  withExperiments(AB, async (experiments, path) => {
    await experiments.decide("maze", { stop: "a", reason: "too slow" });
    await experiments.decide("maze", { winner: "b" });
    const renamed = project(
      "experiment: next\nvariants:\n  - name: a\n    weight: 50\n  - name: b\n    weight: 50",
    );
    const next = await Experiments.open(path, {
      projects: new Map([["maze", renamed]]),
      ttlMs: 60_000,
      controlReloadMs: 60_000,
    });
    try {
      equal(next.control("maze"), undefined);
      const served = new Set<string>();
      for (let i = 0; i < 40; i++) served.add((await next.assign("maze", `s${i}`))!.name);
      equal(served.size, 2, "the new experiment deals by its weights, not the old winner");
      // The old experiment's decisions stay with it.
      equal(experiments.control("maze")?.winner, "b");
    } finally {
      next.close();
    }
  }),
);

Deno.test("feedback topic at shutdown: feedback being stored is finished and acknowledged, later feedback is cancelled with a retry hint", async () => {
  let release!: () => void;
  const stalled = new Promise<void>((resolve) => release = resolve);
  const sent: string[] = [];
  const refused: string[] = [];
  const stored: string[] = [];
  const feedback = new FeedbackTopic({
    topics: new Topics("", "vllm"),
    experiments: {
      assign: () => Promise.resolve(undefined),
      storeFeedback: (_project, sessionId, requestId) => {
        stored.push(`${sessionId}/${requestId}`);
        return Promise.resolve(true);
      },
    },
    // The session's history is read slowly: the feedback is in flight when the drain starts.
    store: {
      load: async (): Promise<Session> => {
        await stalled;
        return {
          meta: undefined,
          versionstamp: null,
          history: [{ seq: 0, role: "user", content: "hi", tokens: 1, requestId: "r1" }],
        };
      },
    },
    stats: { feedback: () => {}, error: () => {} },
    refuse: (_target, error) => refused.push(`${error.code} ${error.retryAfterMs ?? "-"}`),
    send: (_topic, payload) => sent.push(payload),
    rateLimit: { perSession: 0, burst: 1 },
    sessionTopicsOnly: false,
    signer: undefined,
  });
  const body = (requestId: string) =>
    new TextEncoder().encode(JSON.stringify({ request_id: requestId, score: 1 }));
  const first = feedback.handle("maze", "s1", body("r1"));
  feedback.stopAccepting();
  let settled = false;
  const drained = feedback.settled().then(() => settled = true);
  // Arriving now: not taken, told to retry (as a request is).
  await feedback.handle("maze", "s1", body("r2"));
  deepEqual(refused, ["cancelled 5000"]);
  await Promise.resolve();
  equal(settled, false);
  release();
  await first;
  await drained;
  // The one in flight was stored and acknowledged, not refused.
  deepEqual(stored, ["s1/r1"]);
  equal(sent.length, 1);
  match(sent[0], /"type":"feedback".*"accepted":true/);
  deepEqual(refused, ["cancelled 5000"]);
  // Nothing in flight: settled at once.
  await feedback.settled();
});
