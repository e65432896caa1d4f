/**
 * An experiment's figures, end to end: a real mosquitto, the service as a
 * child process on its simulated engine (`--engine sim`) told how good each
 * variant is (`--sim-quality`), players that rate each answer as the engine
 * graded it, and then `deno task ab-report` run as a command on the stored
 * records, after the service stopped: its figures are what the players saw,
 * and its verdict names the variant known to be better. The guardrail: a
 * variant whose prompt does not fit the model fails its turns, is stopped by
 * the service on its own, said so on the status topic, and its sessions' next
 * turns are answered by the baseline.
 *
 * @module
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { join } from "node:path";
import {
  AB_ADAPTER,
  meanSessionScore,
  playSessions,
  writeExperimentPrompts,
} from "./_experiment_traffic.ts";
import {
  freePort,
  mosquittoTest as test,
  removeTempDir,
  ROOT,
  type ServiceProcess,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
  waitFor,
} from "./_helpers.ts";

/** Runs `deno task ab-report` with `args` in the checkout, as a user would. */
async function abReport(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["task", "-q", "ab-report", ...args],
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return { code: output.code, stdout: decode(output.stdout), stderr: decode(output.stderr) };
}

/**
 * A broker, a prompts folder with the experiment (`bPrompt` for `b`, the
 * engine's `quality` of each variant's answers), a data
 * folder inside the checkout's `data/` (where the report task may read), a
 * client subscribed to the replies and the status topic, and `start` for the
 * service with `extra` flags; all of it goes when `fn` ends.
 */
async function withExperiment(
  project: { bPrompt: string; quality: { a: number; b: number }; frontMatter?: string[] },
  fn: (setup: {
    client: TestClient;
    dataDir: string;
    start: (extra: string[]) => Promise<ServiceProcess>;
  }) => Promise<void>,
): Promise<void> {
  const broker = await startMosquitto();
  const promptsDir = await tempDir("vllm-mqtt-prompts-");
  await Deno.mkdir(join(ROOT, "data"), { recursive: true });
  const dataDir = await Deno.makeTempDir({ dir: join(ROOT, "data"), prefix: "ab-report-test-" });
  await writeExperimentPrompts(promptsDir, project.bPrompt, project.frontMatter);
  const client = await TestClient.connect(broker.url);
  await client.subscribe(["maze/assistant_response/#", "vllm-mqtt/status"]);
  const started: ServiceProcess[] = [];
  try {
    await fn({
      client,
      dataDir,
      start: async (extra) => {
        const service = await startService([
          "--engine=sim",
          "--model=sim-model",
          `--lora-modules=${AB_ADAPTER}=${promptsDir}`,
          `--sim-quality=sim-model=${project.quality.a},${AB_ADAPTER}=${project.quality.b}`,
          "--sim-ttft=2",
          "--sim-itl=0",
          `--mqtt-url=${broker.url}`,
          `--data-dir=${dataDir}`,
          `--prompts-dir=${promptsDir}`,
          "--projects=maze,general",
          "--rate-limit=0",
          ...extra,
        ]);
        started.push(service);
        return service;
      },
    });
  } catch (error) {
    for (const service of started) {
      console.error(`--- service log ---\n${service.log().slice(-3000)}`);
    }
    throw error;
  } finally {
    await client.close();
    for (const service of started) await service.stop();
    await broker.close();
    await removeTempDir(promptsDir);
    await removeTempDir(dataDir);
  }
}

test("ab-report: the stored figures of a simulated experiment, and the known-better variant", async () => {
  const project = { bPrompt: "# Maze guide B\nBe brief.\n", quality: { a: 0.85, b: 0.3 } };
  await withExperiment(project, async ({ client, dataDir, start }) => {
    const port = freePort();
    const service = await start([`--http-port=${port}`]);
    const played = await playSessions(client, {
      sessions: 40,
      turns: 3,
      prefix: "p",
      feedback: true,
    });
    const sessionsOf = (variant: string) =>
      [...played.variantOf.values()].filter((v) => v === variant).length;
    assert(sessionsOf("a") >= 8 && sessionsOf("b") >= 8, JSON.stringify(played.answered));
    deepEqual(played.errors, {});

    // /metrics: the turns of each variant, as the replies named them.
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    for (const variant of ["a", "b"]) {
      match(
        metrics,
        new RegExp(
          `^vllm_mqtt_variant_requests_total\\{project="maze",variant="${variant}",outcome="answered"\\} ${
            played.answered[variant]
          }$`,
          "m",
        ),
      );
      match(
        metrics,
        new RegExp(
          `^vllm_mqtt_variant_time_to_first_delta_seconds_count\\{project="maze",variant="${variant}"\\} ${
            played.answered[variant]
          }$`,
          "m",
        ),
      );
    }
    // Stopped: the report reads what was stored, not the running service.
    equal(await service.stop(), 0);

    const today = new Date().toISOString().slice(0, 10);
    const json = await abReport([
      "--project",
      "maze",
      "--since",
      today,
      "--data-dir",
      dataDir,
      "--json",
    ]);
    equal(json.code, 0, json.stderr);
    const [report] = JSON.parse(json.stdout);
    equal(report.experiment, "maze-ab");
    const { figures } = report;
    equal(figures.baseline, "a");
    deepEqual(figures.variants.map((v: { name: string }) => v.name), ["a", "b"]);
    for (const v of figures.variants) {
      equal(v.sessions, sessionsOf(v.name), v.name);
      equal(v.requests, played.answered[v.name], v.name);
      equal(v.answered, played.answered[v.name], v.name);
      equal(v.feedback, played.answered[v.name], `every answer of ${v.name} was rated once`);
      equal(v.scoredSessions, sessionsOf(v.name));
      assert(Math.abs(v.meanScore.value - meanSessionScore(played, v.name)) < 1e-9, v.name);
      assert(v.meanScore.low <= v.meanScore.value && v.meanScore.value <= v.meanScore.high);
      equal(v.turnsPerSession.value, 3);
      equal(v.errorRate.value, 0);
      assert(v.tokensIn > 0 && v.tokensOut > 0);
      assert(v.ttfdMs.p50 !== null && v.ttfdMs.p50 <= v.ttfdMs.p95);
    }
    // The simulator's truth: a's answers are good 85% of the time, b's 30%.
    const [verdict] = figures.verdicts;
    equal(verdict.metric, "feedback_score");
    equal(verdict.text, "b worse");
    assert(verdict.difference.high < 0, JSON.stringify(verdict.difference));

    const text = await abReport(["--project", "maze", "--since", today, "--data-dir", dataDir]);
    equal(text.code, 0, text.stderr);
    console.log(text.stdout);
    match(text.stdout, /^Experiment maze-ab of project maze, /);
    match(text.stdout, /^variant\s+sessions\s+requests\s+error rate/m);
    match(
      text.stdout,
      new RegExp(`^a \\(baseline\\)\\s+${sessionsOf("a")}\\s+${played.answered.a}\\s`, "m"),
    );
    match(text.stdout, /^ {2}b: b worse \(mean score -0\.\d+ against a/m);

    // Nothing before the range's end: said, and exit status 1.
    const none = await abReport([
      "--project",
      "maze",
      "--until",
      "2000-01-01",
      "--data-dir",
      dataDir,
    ]);
    equal(none.code, 1);
    match(none.stderr, /no experiment outcomes of project maze/);
    const wrong = await abReport(["--project", "maze", "--since", "someday"]);
    equal(wrong.code, 2);
    match(wrong.stderr, /--since: not a date/);
  });
});

test("ab-report: an A/A split says no difference yet; JSON answers that do not parse are counted", async () => {
  // Both variants equally good; every answer held to a JSON schema: a bad one is cut short.
  const project = {
    bPrompt: "# Maze guide\nGuide the player through the maze.\n",
    quality: { a: 0.7, b: 0.7 },
    frontMatter: [
      "apply_to: all",
      "response_format:",
      "  name: maze_hint",
      "  schema: { type: object, properties: { hint: { type: string } }, required: [hint] }",
    ],
  };
  await withExperiment(project, async ({ client, dataDir, start }) => {
    const service = await start([]);
    const played = await playSessions(client, {
      sessions: 40,
      turns: 2,
      prefix: "aa",
      feedback: true,
    });
    equal(await service.stop(), 0);
    const json = await abReport(["--project", "maze", "--data-dir", dataDir, "--json"]);
    equal(json.code, 0, json.stderr);
    const { figures } = JSON.parse(json.stdout)[0];
    for (const v of figures.variants) {
      equal(v.requests, played.answered[v.name], v.name);
      equal(v.parseFailures, played.bad[v.name] ?? 0, `${v.name}: its bad answers did not parse`);
      assert(v.parseFailures > 0, v.name);
    }
    const [verdict] = figures.verdicts;
    equal(verdict.metric, "feedback_score");
    equal(verdict.outcome, "no_difference", JSON.stringify(verdict));
    match(verdict.text, /^no difference yet/);
    assert(verdict.difference.low < 0 && verdict.difference.high > 0);
  });
});

test("guardrail: a variant that fails its turns is stopped, said on the status topic (after a restart too), its sessions go to the baseline", async () => {
  // b's prompt is far longer than the model's context: every turn of b fails (context_overflow).
  const huge = `# Maze guide B\n${"wall ".repeat(12_000)}\n`;
  await withExperiment(
    { bPrompt: huge, quality: { a: 0.8, b: 0.8 } },
    async ({ client, start }) => {
      const service = await start([
        "--max-model-len=4096",
        "--guardrail",
        "--guardrail-min-sessions=5",
        "--guardrail-interval=200ms",
      ]);
      const played = await playSessions(client, {
        sessions: 20,
        turns: 1,
        prefix: "g",
        feedback: false,
      });
      const failed = Object.values(played.errors).reduce((a, b) => a + b, 0);
      assert(failed >= 5 && (played.answered.a ?? 0) >= 5, JSON.stringify(played));
      equal(played.answered.b, undefined, "b answers nothing");

      const status = await client.next(
        (m) => m.topic === "vllm-mqtt/status" && m.json?.stopped_variants !== undefined,
        20_000,
      );
      const reason =
        (status.json!.stopped_variants as Record<string, Record<string, string>>).maze.b;
      match(
        reason,
        /^guardrail: error rate 100% against the baseline's 0% \(\d+ and \d+ sessions\)/,
      );
      equal(status.json!.status, "online");
      await waitFor(
        () => /variant b stopped, guardrail: error rate/.test(service.log()),
        5000,
        "log",
      );

      // b's sessions (those that failed) now get the baseline's answers.
      const bSessions = Array.from({ length: 20 }, (_, i) => `g${i}`)
        .filter((session) => !played.variantOf.has(session));
      assert(bSessions.length >= 5);
      for (const session of bSessions) {
        await client.send("maze/user_input", {
          session_id: session,
          request_id: `${session}-again`,
          message: "and now?",
        });
        const reply = (await client.final(session, `${session}-again`, 30_000)).json!;
        equal(reply.type, "done", JSON.stringify(reply));
        equal(reply.variant, "a");
      }

      // b stays stopped after a restart (without the guardrail), and the status still says so.
      equal(await service.stop(), 0);
      const again = await start([]);
      const restarted = await client.next(
        (m) =>
          m.topic === "vllm-mqtt/status" && m.json?.status === "online" &&
          m.json.started_at !== status.json!.started_at,
        20_000,
      );
      match(
        (restarted.json!.stopped_variants as Record<string, Record<string, string>>)?.maze?.b ??
          "",
        /^guardrail: error rate 100%/,
        JSON.stringify(restarted.json),
      );
      await again.stop();
    },
  );
});
