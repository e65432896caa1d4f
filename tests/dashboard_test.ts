/**
 * The operator's live page, in a real browser: headless Chromium (Debian's
 * `chromium` package, which `.ci/run` installs) driven by playwright-core,
 * against the service as a child process with a real mosquitto. Where
 * Chromium is missing, the browser tests are reported as ignored, with the
 * reason, never as passed. A screenshot of the page goes to `tests/output/`.
 *
 * @module
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import fs from "node:fs";
import type { Browser, Page } from "playwright-core";
import { type LivePoint, LiveStats } from "../lib/observability/live_stats.ts";
import { Stats } from "../lib/observability/stats.ts";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  HAS_MOSQUITTO,
  removeTempDir,
  ROOT,
  type ServiceFixture,
  tempDir,
  waitFor,
  withService,
  withServiceOn,
} from "./_helpers.ts";
import {
  AB_ADAPTER,
  meanSessionScore,
  playSessions,
  writeExperimentPrompts,
} from "./_experiment_traffic.ts";

const CHROMIUM = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";
const HAS_CHROMIUM = (() => {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
})();
const SKIP_REASON = !HAS_CHROMIUM
  ? `Chromium is not installed at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)`
  : !HAS_MOSQUITTO
  ? "mosquitto is not installed"
  : undefined;
if (SKIP_REASON) console.warn(`dashboard browser tests skipped: ${SKIP_REASON}`);

const OUTPUT = Deno.env.get("VLLM_MQTT_TEST_OUTPUT") ?? `${ROOT}tests/output`;

/**
 * A browser test: ignored (with the reason in its name) where Chromium or
 * mosquitto is missing. Playwright keeps the browser's pipes and process
 * between its calls, so the op and resource sanitizers are off here; the test
 * closes the browser itself.
 */
function browserTest(name: string, fn: () => Promise<void>): void {
  Deno.test({
    name: SKIP_REASON ? `${name} (skipped: ${SKIP_REASON})` : name,
    ignore: SKIP_REASON !== undefined,
    sanitizeOps: false,
    sanitizeResources: false,
    fn,
  });
}

/**
 * Playwright asks at load whether it runs under WSL by probing a file in
 * /proc, which Deno lets only `--allow-all` read: not knowing means no.
 */
function tolerateProcProbes(): void {
  const existsSync = fs.existsSync;
  fs.existsSync = (path) => {
    try {
      return existsSync(path);
    } catch (error) {
      if (error instanceof Deno.errors.NotCapable) return false;
      throw error;
    }
  };
}

async function withBrowser<T>(fn: (browser: Browser) => Promise<T>): Promise<T> {
  tolerateProcProbes();
  const { chromium } = await import("playwright-core");
  // `launch` gives the browser a new, empty profile (user-data-dir) of its own, removed at close.
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    return await fn(browser);
  } finally {
    await browser.close();
  }
}

/** A page that fails the test on a script error. */
async function openPage(browser: Browser, url: string, headers?: Record<string, string>) {
  const context = await browser.newContext({
    viewport: { width: 1280, height: 1100 },
    extraHTTPHeaders: headers,
  });
  const page = await context.newPage();
  const errors: string[] = [];
  page.on("pageerror", (error) => errors.push(error.message));
  const response = await page.goto(url);
  return { page, response, errors };
}

const text = (page: Page, selector: string) => page.locator(selector).first().innerText();
const number = async (page: Page, selector: string) => Number(await text(page, selector));

/** Collects the raw event stream of the page, to check what it carries. */
function readEvents(url: string, headers: Record<string, string> = {}) {
  const abort = new AbortController();
  let received = "";
  const done = (async () => {
    const response = await fetch(url, { headers, signal: abort.signal });
    const decoder = new TextDecoder();
    for await (const chunk of response.body!) received += decoder.decode(chunk, { stream: true });
  })().catch(() => {});
  return {
    get text() {
      return received;
    },
    async close() {
      abort.abort();
      await done;
    },
  };
}

async function screenshot(page: Page, name: string): Promise<string> {
  await Deno.mkdir(OUTPUT, { recursive: true });
  const path = `${OUTPUT}/${name}.png`;
  await page.screenshot({ path, fullPage: true });
  return path;
}

async function sendTraffic(f: ServiceFixture, count: number, marker: string): Promise<void> {
  for (let i = 0; i < count; i++) {
    const project = i % 3 === 2 ? "general" : "maze";
    await f.client.send(`${project}/user_input`, {
      session_id: `load-${i}`,
      request_id: `r${i}`,
      message: `${marker} number ${i}`,
    });
  }
  for (let i = 0; i < count; i++) await f.client.final(`load-${i}`, `r${i}`);
}

browserTest(
  "dashboard: the page shows the state, follows MQTT traffic, and try it streams an answer",
  async () => {
    const port = freePort();
    // Slow tokens, so that the answer on the page visibly streams.
    await withService(
      { args: [`--http-port=${port}`, "--max-audio-clips=1"], sim: { ttftMs: 5, itlMs: 25 } },
      (f) =>
        withBrowser(async (browser) => {
          const base = `http://127.0.0.1:${port}`;
          const events = readEvents(`${base}/dashboard/events`);
          const { page, response, errors } = await openPage(browser, `${base}/`);
          equal(response?.status(), 200);
          await waitFor(
            async () => (await text(page, "#engine-state")) === "ready",
            10_000,
            "ready",
          );
          equal(await text(page, "#broker-connected"), "connected");
          equal(await text(page, "#status"), "online");
          equal(await text(page, "#engine-mode"), "url");
          equal(await text(page, "#engine-circuit"), "closed");
          equal(await text(page, "#stream-state"), "live");
          match(await text(page, "#instance"), /svc-/);
          equal(await number(page, "#total-answered"), 0);
          equal(await number(page, "#max-in-flight"), 256);

          // Traffic on MQTT: the page's numbers follow within an update or two.
          const marker = "Zebra-canary-7731";
          await sendTraffic(f, 12, marker);
          await f.client.send("maze/user_input", { session_id: "bad", message: 5 }); // an error
          await f.client.final("bad");
          await waitFor(
            async () => (await number(page, "#total-answered")) === 12,
            5000,
            "the page to count 12 answers",
          );
          const maze = 'tr[data-project="maze"]';
          await waitFor(
            async () => (await number(page, `${maze} td[data-key="requests"]`)) === 9,
            5000,
            "the maze row to show 9 requests",
          );
          equal(await number(page, 'tr[data-project="general"] td[data-key="requests"]'), 4);
          assert((await number(page, `${maze} td[data-key="p50"]`)) > 0);
          assert((await number(page, `${maze} td[data-key="ttft50"]`)) > 0);
          equal(await text(page, 'tr[data-code="invalid_request"] td:nth-child(3)'), "1");

          // The numbers match /status within one update.
          const status = await (await fetch(`${base}/status`)).json();
          await waitFor(
            async () =>
              (await number(page, "#live-sessions")) === status.live_sessions &&
              (await number(page, "#queued")) === status.queued &&
              (await number(page, "#in-flight")) === status.in_flight,
            2500,
            `the page to show /status's ${JSON.stringify(status)}`,
          );
          equal(status.live_sessions, 12);

          // A chart has drawn points: uPlot holds them and has painted its canvas.
          await waitFor(
            () =>
              page.evaluate(() => {
                // deno-lint-ignore no-explicit-any
                const chart = (globalThis as any).dashboard.charts.requests;
                return chart.data[1].some((v: number) => v > 0);
              }),
            5000,
            "the requests chart to have points",
          );
          assert(await page.locator("#chart-requests canvas").isVisible());
          // deno-lint-ignore no-explicit-any
          const painted = await page.locator("#chart-requests canvas").evaluate((canvas: any) => {
            const { data } = canvas.getContext("2d").getImageData(
              0,
              0,
              canvas.width,
              canvas.height,
            );
            let inked = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) inked++;
            return inked;
          });
          assert(painted > 500, `the chart's canvas is nearly blank (${painted} pixels)`);

          // Try it: the answer streams in, through the engine, to this page only.
          const projects = await page.locator("#try-project option").allInnerTexts();
          deepEqual(projects, ["maze", "general"]);
          await page.selectOption("#try-project", "general");
          const session = await text(page, "#try-session");
          match(session, /^dashboard-[0-9a-f]{16}$/);
          const question = "Quokka-question-4410";
          await page.fill("#try-message", question);
          await page.click("#try-send");
          const answer = page.locator(".turn.assistant").last();
          const seen = new Set<string>();
          await waitFor(
            async () => {
              seen.add(await answer.innerText());
              return (await answer.getAttribute("data-done")) === "true";
            },
            15_000,
            "the try-it answer",
          );
          const final = await answer.innerText();
          match(final, new RegExp(`you said "${question}"`));
          match(final, /stop · first delta \d+ ms/);
          const partial = [...seen].filter((t) => t !== "" && !t.includes("first delta"));
          assert(partial.length >= 2, `the answer did not stream: ${JSON.stringify([...seen])}`);
          const sent = f.sim.received.at(-1)!;
          const messages = sent.messages as { role: string; content: string }[];
          equal(messages.at(-1)!.content, question);
          equal(messages[0].role, "system");
          assert(
            !f.client.received.some((m) => m.text.includes(question)),
            "the try-it answer was published on MQTT",
          );
          // A second turn in the same session has the first one in its history.
          await page.fill("#try-message", "and again");
          await page.click("#try-send");
          await waitFor(
            async () => (await page.locator(".turn.assistant[data-done]").count()) === 2,
            15_000,
            "the second answer",
          );
          match(await page.locator(".turn.assistant").last().innerText(), /Turn 2/);
          // A clip attached alone is a turn; the engine hears it.
          await page.setInputFiles(
            "#try-audio",
            new URL("./fixtures/audio/hello.wav", import.meta.url).pathname,
          );
          await page.click("#try-send");
          await waitFor(
            async () => (await page.locator(".turn.assistant[data-done]").count()) === 3,
            15_000,
            "the answer to a clip",
          );
          match(
            await page.locator(".turn.assistant").last().innerText(),
            /Turn 3: you said "". Heard 1 audio clip: wav\/pcm 0\.85 s, 13,614 bytes\./,
          );
          match(await page.locator(".turn.user").last().innerText(), /\[hello\.wav\]/);

          // Counts only: no conversation text in the event stream.
          await new Promise((resolve) => setTimeout(resolve, 1200));
          const stream = events.text;
          await events.close();
          assert(stream.includes("event: update"), "no updates were streamed");
          for (const secret of [marker, question, "and again", "you said"]) {
            assert(!stream.includes(secret), `the event stream carries "${secret}"`);
          }

          // The page's session id only: try it takes no client's session.
          const refused = await fetch(`${base}/dashboard/try`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ project: "maze", session_id: "load-1", message: "hi" }),
          });
          equal(refused.status, 400);
          await refused.body?.cancel();
          // Nor a post from another origin (a page elsewhere posting a form).
          const foreign = await fetch(`${base}/dashboard/try`, {
            method: "POST",
            headers: { "content-type": "application/json", origin: "http://evil.example" },
            body: JSON.stringify({ project: "maze", session_id: session, message: "hi" }),
          });
          equal(foreign.status, 403);
          await foreign.body?.cancel();

          const path = await screenshot(page, "dashboard");
          console.log(`screenshot: ${path}`);
          deepEqual(errors, []);
        }),
    );
  },
);

browserTest(
  "dashboard: with several engines the engine card shows each one, and one going down",
  async () => {
    const port = freePort();
    const sims = await Promise.all([0, 1].map(() => startSimulator({ ttftMs: 5, itlMs: 1 })));
    try {
      await withServiceOn(
        sims.map((sim) => sim.url).join(","),
        { args: [`--http-port=${port}`] },
        (f) =>
          withBrowser(async (browser) => {
            const { page, errors } = await openPage(browser, `http://127.0.0.1:${port}/`);
            const line = (id: string) => text(page, `#engine-list li[data-engine="${id}"]`);
            await waitFor(
              async () => (await page.locator("#engine-list li").count()) === 2,
              10_000,
              "a line per engine",
            );
            match(await line("e0"), /^e0\s*ready · in flight 0/);
            match(await line("e1"), /^e1\s*ready/);
            // Sessions' turns show on the engine that ran them.
            await sendTraffic(f, 6, "fleet");
            await waitFor(
              async () => {
                const turns = await Promise.all(
                  ["e0", "e1"].map(async (id) =>
                    Number(/turns (\d+)/.exec(await line(id))?.[1] ?? 0)
                  ),
                );
                return turns[0] + turns[1] === 6 &&
                  turns[0] === sims[0].received.length && turns[1] === sims[1].received.length;
              },
              5000,
              "the engines' turns on the page",
            );
            // Engine e1 dies: its line says so within a probe (5 s), e0 stays ready.
            sims[1].fault = "error";
            await waitFor(async () => /^e1\s*down/.test(await line("e1")), 10_000, "e1 down");
            match(await line("e0"), /^e0\s*ready/);
            equal(await text(page, "#engine-state"), "ready");
            await screenshot(page, "dashboard-engines");
            deepEqual(errors, []);
          }),
      );
    } finally {
      await Promise.all(sims.map((sim) => sim.close()));
    }
  },
);

browserTest(
  "dashboard: a token protects the page and try it; the health checks stay open",
  async () => {
    const port = freePort();
    const token = "s3cret-token-for-the-page";
    await withService(
      { args: [`--http-port=${port}`], env: { VLLM_MQTT_DASHBOARD_TOKEN: token } },
      (f) =>
        withBrowser(async (browser) => {
          const base = `http://127.0.0.1:${port}`;
          for (
            const path of ["/", "/dashboard/app.js", "/dashboard/events", "/dashboard/uplot.js"]
          ) {
            const refused = await fetch(`${base}${path}`);
            equal(refused.status, 401, path);
            equal(refused.headers.get("www-authenticate"), 'Bearer realm="vllm-mqtt"');
            await refused.body?.cancel();
          }
          const wrong = await fetch(`${base}/dashboard/events`, {
            headers: { authorization: "Bearer not-the-token" },
          });
          equal(wrong.status, 401);
          await wrong.body?.cancel();
          const tryRefused = await fetch(`${base}/dashboard/try`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({
              project: "maze",
              session_id: "dashboard-abcdefgh",
              message: "x",
            }),
          });
          equal(tryRefused.status, 401);
          await tryRefused.body?.cancel();
          equal((await fetch(`${base}/healthz`)).status, 200);
          equal(
            (await (await fetch(`${base}/metrics`)).text()).includes("vllm_mqtt_in_flight"),
            true,
          );
          assert(!f.service.log().includes(token), "the token was logged");

          // In the browser: a sign-in form; a wrong token is refused, the right one lets in.
          const { page, response, errors } = await openPage(browser, `${base}/`);
          equal(response?.status(), 401);
          assert(await page.locator("input[name=token]").isVisible());
          await page.fill("input[name=token]", "wrong-token-wrong-token");
          await page.click("form button");
          await page.waitForSelector("text=Wrong token.");
          await page.fill("input[name=token]", token);
          await page.click("form button");
          await waitFor(
            async () =>
              (await page.locator("#engine-state").count()) === 1 &&
              (await text(page, "#engine-state")) === "ready",
            10_000,
            "the page after signing in",
          );
          // The cookie holds a hash of the token, never the token.
          const cookies = await page.context().cookies();
          equal(cookies.length, 1);
          assert(cookies[0].httpOnly && cookies[0].sameSite === "Strict");
          assert(!cookies[0].value.includes(token));
          await page.fill("#try-message", "hello with a token");
          await page.click("#try-send");
          await page.waitForSelector(".turn.assistant[data-done]");
          match(await page.locator(".turn.assistant").innerText(), /you said "hello with a token"/);

          // A bearer header works as well (scripts, or a proxy that adds it).
          const bearer = await openPage(browser, `${base}/`, { authorization: `Bearer ${token}` });
          equal(bearer.response?.status(), 200);
          await waitFor(
            async () => (await text(bearer.page, "#broker-connected")) === "connected",
            10_000,
            "the page with a bearer header",
          );
          deepEqual([...errors, ...bearer.errors], []);
        }),
    );
  },
);

Deno.test({
  name: "dashboard: --no-dashboard-try-it hides the panel and refuses its requests",
  ignore: !HAS_MOSQUITTO,
  fn: async () => {
    const port = freePort();
    await withService({ args: [`--http-port=${port}`, "--no-dashboard-try-it"] }, async () => {
      const base = `http://127.0.0.1:${port}`;
      const refused = await fetch(`${base}/dashboard/try`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ project: "maze", session_id: "dashboard-abcdefgh", message: "x" }),
      });
      equal(refused.status, 404);
      await refused.body?.cancel();
      const events = readEvents(`${base}/dashboard/events`);
      await waitFor(() => events.text.includes("event: update"), 5000, "an update");
      await events.close();
      match(events.text, /"try_it":false/);
      equal((await fetch(`${base}/status`).then((r) => r.json())).status, "online");
    });
  },
});

Deno.test({
  name: "dashboard: --no-dashboard leaves / to the endpoint's 404",
  ignore: !HAS_MOSQUITTO,
  fn: async () => {
    const port = freePort();
    await withService({ args: [`--http-port=${port}`, "--no-dashboard"] }, async () => {
      const response = await fetch(`http://127.0.0.1:${port}/`);
      equal(response.status, 404);
      await response.body?.cancel();
    });
  },
});

Deno.test("live stats: per second and per project, percentiles, errors by code, bounded", () => {
  let now = 1_000_000_000;
  const stats = new Stats(() => ({
    queued: 0,
    inFlight: 0,
    liveSessions: 0,
    engineReady: true,
    engineRestarts: {},
  }));
  const live = new LiveStats(stats, ["maze", "general"], {
    now: () => now,
    historyS: 60,
    smoothS: 5,
    summaryS: 30,
  });
  const timing = (totalMs: number) => ({ queueMs: 1, ttftMs: totalMs / 4, totalMs });
  for (let i = 1; i <= 100; i++) stats.answered("maze", timing(i * 10), null);
  stats.error("general", "timeout");
  stats.unaddressable("invalid_request");
  stats.ignored("duplicate");
  stats.brokerReconnected();
  const second = live.second;
  now += 1000;
  const point: LivePoint = live.point(second);
  deepEqual(point.requests, { maze: 100, general: 1 });
  equal(point.errors, 1);
  equal(point.p50_ms, 510);
  equal(point.p95_ms, 960);
  equal(point.ttft_p50_ms, 128);
  const summary = live.summary();
  equal(summary.projects.maze.requests, 100);
  equal(summary.projects.maze.rps, 3.33);
  equal(summary.projects.general.errors, 1);
  equal(summary.projects.general.p50_ms, null);
  deepEqual(summary.errors, { timeout: 1, invalid_request: 1 });
  deepEqual(summary.totals.ignored, { duplicate: 1 });
  equal(summary.broker_reconnects, 1);
  equal(live.history().length, 60);
  equal(live.history().at(-1)!.t, second);
  // Beyond the summary window the counts leave it; the totals stay.
  now += 40_000;
  stats.answered("maze", timing(5), null);
  const later = live.summary();
  equal(later.projects.maze.requests, 0);
  deepEqual(later.errors, {});
  equal(later.totals.answered, 101);
  // A second's samples are bounded.
  for (let i = 0; i < 10_000; i++) stats.answered("maze", timing(1), null);
  now += 1000;
  equal(live.point(live.second - 1).requests.maze, 10_001);
  live.close();
});

Deno.test({
  name: "dashboard: the page's files are in the repository, and uPlot comes from npm",
  ignore: !HAS_MOSQUITTO,
  fn: async () => {
    const port = freePort();
    await withService({ args: [`--http-port=${port}`] }, async () => {
      const base = `http://127.0.0.1:${port}`;
      const page = await (await fetch(`${base}/`)).text();
      match(page, /<script type="module" src="\/dashboard\/app.js">/);
      for (
        const [path, type] of [
          ["/dashboard/app.js", "text/javascript"],
          ["/dashboard/style.css", "text/css"],
          ["/dashboard/uplot.css", "text/css"],
        ]
      ) {
        const response = await fetch(`${base}${path}`);
        equal(response.status, 200, path);
        match(response.headers.get("content-type")!, new RegExp(type));
        await response.body?.cancel();
      }
      const uplot = await (await fetch(`${base}/dashboard/uplot.js`)).text();
      match(uplot, /export \{ uPlot as default \}/);
      // Other paths are still the endpoint's.
      equal(await fetch(`${base}/healthz`).then((r) => r.text()), "ok\n");
    });
  },
});

browserTest(
  "dashboard: the experiment panel shows the variants side by side, intervals, verdict and a stop",
  async () => {
    const port = freePort();
    const prompts = await tempDir("vllm-mqtt-prompts-");
    await writeExperimentPrompts(prompts, "# Maze guide B\nBe brief.\n");
    try {
      await withService(
        {
          args: [`--http-port=${port}`, `--prompts-dir=${prompts}`, "--rate-limit=0"],
          sim: {
            ttftMs: 2,
            itlMs: 0,
            adapters: [AB_ADAPTER],
            quality: { "sim-model": 0.9, [AB_ADAPTER]: 0.2 },
          },
        },
        (f) =>
          withBrowser(async (browser) => {
            const base = `http://127.0.0.1:${port}`;
            const { page, errors } = await openPage(browser, `${base}/`);
            await waitFor(
              async () => (await text(page, "#engine-state")) === "ready",
              10_000,
              "ready",
            );
            const played = await playSessions(f.client, {
              sessions: 30,
              turns: 2,
              prefix: "web",
              feedback: true,
            });
            const panel = 'article.experiment[data-project="maze"]';
            const cell = (variant: string, column: string) =>
              text(page, `${panel} tr[data-variant="${variant}"] td[data-column="${column}"]`);
            await waitFor(
              async () =>
                (await page.locator(panel).count()) === 1 &&
                Number(await cell("a", "requests")) === played.answered.a &&
                Number(await cell("b", "requests")) === played.answered.b,
              10_000,
              "the panel to count every turn of both variants",
            );
            match(await text(page, `${panel} h3`), /^maze · experiment maze-ab$/);
            const sessions = (v: string) =>
              [...played.variantOf.values()].filter((x) => x === v).length;
            equal(Number(await cell("a", "sessions")), sessions("a"));
            equal(Number(await cell("b", "sessions")), sessions("b"));
            // The mean score and its interval, as the players rated.
            const score = /^([\d.]+) \[([\d.-]+), ([\d.]+)\]$/.exec(await cell("a", "mean score"));
            assert(score, await cell("a", "mean score"));
            assert(Math.abs(Number(score[1]) - meanSessionScore(played, "a")) < 0.006);
            assert(Number(score[2]) <= Number(score[1]) && Number(score[1]) <= Number(score[3]));
            match(await cell("a", "error rate"), /^0\.0% \[0\.0%, [\d.]+%\]$/);
            equal(await cell("a", "status"), "baseline");
            equal(await cell("b", "status"), "running");
            const verdict = `${panel} .verdicts li[data-variant="b"]`;
            equal(await text(page, `${verdict} b`), "b worse");
            equal(await page.locator(verdict).getAttribute("data-outcome"), "worse");
            match(await text(page, verdict), /\(mean feedback score, -0\.\d+ against a\)$/);

            // The operator stops b: the panel says so, with the reason.
            const stop = await fetch(`${base}/operator/experiments/maze`, {
              method: "POST",
              headers: { "content-type": "application/json" },
              body: JSON.stringify({ stop: "b", reason: "worse feedback" }),
            });
            equal(stop.status, 200, await stop.text());
            await waitFor(
              async () => (await cell("b", "status")) === "stopped: worse feedback",
              10_000,
              "the panel to show b stopped",
            );
            console.log(`experiment panel: ${await screenshot(page, "dashboard-experiment")}`);
            deepEqual(errors, []);
          }),
      );
    } finally {
      await removeTempDir(prompts);
    }
  },
);
