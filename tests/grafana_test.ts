/**
 * The Grafana dashboard in deploy/ against what the service exports: every
 * metric its PromQL names is on a real `/metrics` (the service as a child
 * process, mosquitto, the simulated engine, traffic that makes every labelled
 * series), used the way its type allows, with labels it has; every family
 * the service exports is on the dashboard; and the compose file's `metrics`
 * profile wires Prometheus and Grafana to it (provisioning, mounts, scrape
 * target, the service's HTTP endpoint reachable on the compose network).
 *
 * @module
 */

import assert, { deepEqual, equal, match, ok } from "node:assert/strict";
import { parse as parseYaml } from "yaml";
import { Stats } from "../lib/observability/stats.ts";
import {
  freePort,
  mosquittoTest,
  removeTempDir,
  ROOT,
  tempDir,
  waitFor,
  withService,
} from "./_helpers.ts";
import { AB_ADAPTER, writeExperimentPrompts } from "./_experiment_traffic.ts";

const DEPLOY = `${ROOT}deploy/`;
const DASHBOARD_FILE = `${DEPLOY}grafana/vllm-mqtt-dashboard.json`;

// deno-lint-ignore no-explicit-any
type Json = any;

const dashboard: Json = JSON.parse(Deno.readTextFileSync(DASHBOARD_FILE));
const readYaml = (path: string): Json => parseYaml(Deno.readTextFileSync(path));

/** One PromQL expression of the dashboard, and where it is. */
interface Query {
  readonly where: string;
  readonly expr: string;
  readonly legend?: string;
}

function queries(): Query[] {
  const found: Query[] = [];
  for (const panel of dashboard.panels) {
    for (const target of panel.targets ?? []) {
      found.push({
        where: `panel "${panel.title}" ${target.refId}`,
        expr: target.expr,
        legend: target.legendFormat,
      });
    }
  }
  for (const variable of dashboard.templating.list) {
    if (variable.type !== "query") continue;
    const expr = typeof variable.query === "string" ? variable.query : variable.query.query;
    found.push({ where: `variable $${variable.name}`, expr });
  }
  return found;
}

const metricNames = (expr: string) => [...new Set(expr.match(/\bvllm_mqtt_\w+/g) ?? [])];
/** The label names in `by (...)` clauses. */
const byLabels = (expr: string) =>
  [...expr.matchAll(/\bby\s*\(([^)]*)\)/g)].flatMap((m) =>
    m[1].split(",").map((label) => label.trim()).filter(Boolean)
  );
/** The label names matched in `{...}` selectors. */
const matcherLabels = (expr: string) =>
  [...expr.matchAll(/\{([^}]*)\}/g)].flatMap((m) =>
    [...m[1].matchAll(/(\w+)\s*(?:=~|!~|!=|=)\s*"/g)].map((l) => l[1])
  );
/** Labels Prometheus attaches to every scraped series. */
const TARGET_LABELS = new Set(["instance", "job"]);

/** A scrape, parsed: each family's type and each sample's name and labels. */
interface Exposition {
  readonly types: Map<string, string>;
  readonly samples: Map<string, Record<string, string>[]>;
}

function parseExposition(text: string): Exposition {
  const types = new Map<string, string>();
  const samples = new Map<string, Record<string, string>[]>();
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const type = /^# TYPE (\w+) (\w+)$/.exec(line);
    if (type) {
      types.set(type[1], type[2]);
      continue;
    }
    if (line.startsWith("#")) continue;
    const sample = /^(\w+)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert(sample, `not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const [, name, value] of (sample[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[name] = value;
    }
    samples.set(sample[1], [...(samples.get(sample[1]) ?? []), labels]);
  }
  return { types, samples };
}

/** The family a series name belongs to, and how it may be used. */
function family(
  name: string,
  types: Map<string, string>,
): { family: string; kind: "counter" | "gauge" | "bucket" | "sum_or_count" } | undefined {
  const type = types.get(name);
  if (type === "counter" || type === "gauge") return { family: name, kind: type };
  const part = /^(\w+)_(bucket|sum|count)$/.exec(name);
  if (part && types.get(part[1]) === "histogram") {
    return { family: part[1], kind: part[2] === "bucket" ? "bucket" : "sum_or_count" };
  }
  return undefined;
}

Deno.test("the Grafana dashboard is a dashboard Grafana 10 and 11 load", () => {
  match(dashboard.uid, /^[\w-]{1,40}$/);
  ok(typeof dashboard.title === "string" && dashboard.title.length > 0);
  // 39 is Grafana 10.4/11.0's; newer versions migrate it on load.
  ok(dashboard.schemaVersion >= 37 && dashboard.schemaVersion <= 41, `${dashboard.schemaVersion}`);
  const variables = dashboard.templating.list;
  const datasource = variables.find((v: Json) => v.type === "datasource");
  deepEqual([datasource?.name, datasource?.query], ["datasource", "prometheus"]);
  const defined = new Set(variables.map((v: Json) => v.name));

  ok(dashboard.panels.length > 0);
  const ids = dashboard.panels.map((panel: Json) => panel.id);
  equal(new Set(ids).size, ids.length, "panel ids are unique");
  for (const panel of dashboard.panels) {
    const { x, y, w, h } = panel.gridPos;
    ok(x >= 0 && y >= 0 && w > 0 && h > 0 && x + w <= 24, `panel "${panel.title}" fits the grid`);
    ok(typeof panel.title === "string" && panel.title.length > 0);
    if (panel.type === "row") continue;
    ok(["timeseries", "stat"].includes(panel.type), `panel "${panel.title}": ${panel.type}`);
    deepEqual(panel.datasource, { type: "prometheus", uid: "${datasource}" }, panel.title);
    ok(panel.targets?.length > 0, `panel "${panel.title}" has queries`);
    const refIds = panel.targets.map((target: Json) => target.refId);
    equal(new Set(refIds).size, refIds.length, `panel "${panel.title}": refIds are unique`);
    for (const target of panel.targets) {
      deepEqual(target.datasource, panel.datasource, `${panel.title} ${target.refId}`);
      ok(typeof target.expr === "string" && target.expr.length > 0);
    }
  }
  for (const { where, expr } of queries()) {
    // Brackets balance (a typo Grafana would only show as a query error).
    const stack: string[] = [];
    for (const char of expr.replaceAll(/"(?:[^"\\]|\\.)*"/g, '""')) {
      if ("([{".includes(char)) stack.push(")]}"["([{".indexOf(char)]);
      else if (")]}".includes(char)) equal(stack.pop(), char, `${where}: ${expr}`);
    }
    equal(stack.length, 0, `${where}: ${expr}`);
    for (const [, name] of expr.matchAll(/\$(\w+)/g)) {
      ok(name.startsWith("__") || defined.has(name), `${where}: $${name} is not defined`);
    }
  }
});

mosquittoTest(
  "every metric the Grafana dashboard queries is on /metrics, as its type allows",
  async () => {
    const port = freePort();
    // maze runs an experiment (variants a and b): its turns make the per-variant series.
    const prompts = await tempDir("vllm-mqtt-prompts-");
    await writeExperimentPrompts(prompts, "# Maze guide B\nBe brief.\n");
    await withService({
      args: [`--http-port=${port}`, `--prompts-dir=${prompts}`],
      sim: { ttftMs: 5, itlMs: 1, adapters: [AB_ADAPTER] },
    }, async ({ client, broker }) => {
      const metrics = async () => await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      // Answered, in two projects (tokens counted), an error reply, a message with no session to
      // answer, a reply topic refused, and a client's retry of an answered request (ignored as a
      // duplicate).
      await client.send("maze/user_input", { session_id: "g1", message: "hi", request_id: "r1" });
      equal((await client.final("g1", "r1")).json!.type, "done");
      // A rating of that answer, on the session's feedback topic.
      await client.send("maze/feedback/g1", { request_id: "r1", score: 1 });
      await client.next((m) => m.json?.type === "feedback" && m.json.request_id === "r1");
      await client.send("general/user_input", { session_id: "g2", message: "hello" });
      equal((await client.final("g2")).json!.type, "done");
      await client.send("maze/user_input", { session_id: "g3", message: 42 });
      equal((await client.final("g3")).json!.type, "error");
      await client.send("general/user_input", "{not json");
      await client.send("maze/user_input", {
        session_id: "g4",
        message: "hi",
        reply_topic: "maze/clear_history",
      });
      equal((await client.final("g4")).json!.type, "error");
      await client.send("maze/user_input", { session_id: "g1", message: "hi", request_id: "r1" });
      // A broker outage: the service reconnects.
      await broker.stop();
      await broker.start();
      await waitFor(
        async () => /^vllm_mqtt_broker_reconnects_total [1-9]/m.test(await metrics()),
        20_000,
        "the service to reconnect to the broker",
      );
      await waitFor(async () => /reason="duplicate"/.test(await metrics()), 10_000, "duplicate");
      await waitFor(async () => /code="invalid_request"/.test(await metrics()), 10_000, "error");

      const scraped = parseExposition(await metrics());
      // Restarts are of a managed vLLM only (tests/vllm_supervisor_test.ts scrapes them from a
      // stand-in); here the family is declared, and its series are made as /metrics renders them.
      const restarts = parseExposition(
        new Stats(() => ({
          queued: 0,
          inFlight: 0,
          liveSessions: 0,
          engineReady: true,
          engineRestarts: { exit_1: 1 },
        })).prometheus(),
      ).samples.get("vllm_mqtt_engine_restarts_total");
      ok(restarts);
      equal(scraped.types.get("vllm_mqtt_engine_restarts_total"), "counter");
      scraped.samples.set("vllm_mqtt_engine_restarts_total", restarts);

      const used = new Set<string>();
      for (const { where, expr, legend } of queries()) {
        const names = metricNames(expr);
        ok(names.length > 0, `${where} queries no vllm_mqtt_ metric: ${expr}`);
        const labelsOf = new Set<string>();
        for (const name of names) {
          const found = family(name, scraped.types);
          assert(found, `${where}: ${name} is not exported by /metrics`);
          used.add(found.family);
          const samples = scraped.samples.get(name) ?? [];
          ok(samples.length > 0, `${where}: ${name} has no series after the traffic`);
          for (const labels of samples) {
            for (const label of Object.keys(labels)) labelsOf.add(label);
          }
        }
        // rate() and increase() of counters (histogram parts are counters), never of gauges.
        for (const [, fn, name] of expr.matchAll(/\b(rate|increase)\(\s*(\w+)/g)) {
          ok(
            family(name, scraped.types)?.kind !== "gauge",
            `${where}: ${fn}() of the gauge ${name}`,
          );
        }
        for (const [, name] of expr.matchAll(/\b(\w+)\{[^}]*\}(?!\[)/g)) {
          const kind = family(name, scraped.types)?.kind;
          ok(kind === undefined || kind === "gauge", `${where}: ${name} is not a gauge: rate() it`);
        }
        // Buckets only in histogram_quantile, summed by `le`.
        if (names.some((name) => family(name, scraped.types)?.kind === "bucket")) {
          ok(expr.includes("histogram_quantile("), `${where}: buckets outside histogram_quantile`);
          ok(byLabels(expr).includes("le"), `${where}: histogram_quantile needs sum by (le)`);
        }
        for (const label of [...byLabels(expr), ...matcherLabels(expr)]) {
          ok(
            TARGET_LABELS.has(label) || labelsOf.has(label),
            `${where}: no series of ${names.join(", ")} has the label ${label}`,
          );
        }
        // A legend names labels the result keeps.
        const kept = byLabels(expr).length > 0 ? new Set(byLabels(expr)) : labelsOf;
        for (const [, label] of (legend ?? "").matchAll(/\{\{\s*(\w+)\s*\}\}/g)) {
          ok(
            kept.has(label) || (byLabels(expr).length === 0 && TARGET_LABELS.has(label)),
            `${where}: the legend's {{${label}}} is not in the result`,
          );
        }
      }
      // And the other way round: nothing the service exports is missing from the dashboard.
      deepEqual([...scraped.types.keys()].filter((name) => !used.has(name)), []);
    }).finally(() => removeTempDir(prompts));
  },
);

Deno.test("the compose file's metrics profile provisions Prometheus and Grafana with the dashboard", () => {
  const compose = readYaml(`${DEPLOY}compose.yaml`);
  const { grafana, prometheus } = compose.services;
  const service = compose.services["vllm-mqtt"];
  deepEqual(grafana.profiles, ["metrics"]);
  deepEqual(prometheus.profiles, ["metrics"]);
  ok(!service.profiles && !compose.services.mosquitto.profiles, "the service itself is not opt-in");
  match(grafana.image, /^grafana\/grafana:\d+\.\d+\.\d+$/);
  match(prometheus.image, /^prom\/prometheus:v\d+\.\d+\.\d+$/);

  /** A service's bind mounts: the file or folder in the repository → where the container sees it. */
  const mounts = (svc: Json) =>
    new Map<string, string>(
      (svc.volumes as string[]).filter((volume) => volume.startsWith("./")).map((volume) => {
        const [source, target] = volume.split(":");
        return [new URL(source, `file://${DEPLOY}`).pathname, target];
      }),
    );
  const grafanaMounts = mounts(grafana);
  const dashboardTarget = grafanaMounts.get(DASHBOARD_FILE);
  assert(dashboardTarget, "compose mounts the dashboard JSON into Grafana");
  const provisioning = `${DEPLOY}grafana/provisioning/`;
  equal(grafanaMounts.get(`${provisioning}datasources`), "/etc/grafana/provisioning/datasources");
  equal(grafanaMounts.get(`${provisioning}dashboards`), "/etc/grafana/provisioning/dashboards");

  // The dashboard provider loads the folder the JSON is mounted in.
  const providers = [...Deno.readDirSync(`${provisioning}dashboards`)]
    .filter((entry) => /\.ya?ml$/.test(entry.name))
    .flatMap((entry) => readYaml(`${provisioning}dashboards/${entry.name}`).providers);
  ok(
    providers.some((provider: Json) =>
      provider.type === "file" && dashboardTarget.startsWith(`${provider.options.path}/`)
    ),
    `a file provider loads ${dashboardTarget}`,
  );
  equal(
    grafana.environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH,
    dashboardTarget,
    "the home dashboard",
  );

  // The data source is the compose file's Prometheus.
  const datasources = [...Deno.readDirSync(`${provisioning}datasources`)]
    .filter((entry) => /\.ya?ml$/.test(entry.name))
    .flatMap((entry) => readYaml(`${provisioning}datasources/${entry.name}`).datasources);
  const source = datasources.find((ds: Json) => ds.type === "prometheus");
  equal(source?.url, "http://prometheus:9090");
  ok(source.isDefault);

  // Prometheus reads the repository's configuration, which scrapes the service's HTTP port.
  const configFile = (prometheus.command as string[])
    .find((arg) => arg.startsWith("--config.file="))?.slice("--config.file=".length);
  equal(mounts(prometheus).get(`${DEPLOY}prometheus/prometheus.yml`), configFile);
  const scrape = readYaml(`${DEPLOY}prometheus/prometheus.yml`).scrape_configs;
  const job = scrape.find((config: Json) => config.job_name === "vllm-mqtt");
  equal(job.metrics_path ?? "/metrics", "/metrics");
  const command = service.command as string[];
  const httpPort = command.find((arg) => arg.startsWith("--http-port="))?.split("=")[1] ?? "8081";
  deepEqual(job.static_configs[0].targets, [`vllm-mqtt:${httpPort}`]);

  // Reachable from the Prometheus container: all the container's interfaces, none published on
  // the host, and the live page (then off loopback) behind a token or off.
  ok(command.includes("--http-host=0.0.0.0"));
  ok(!(service.ports ?? []).some((port: string) => String(port).includes(httpPort)));
  ok(
    command.includes("--no-dashboard") || "VLLM_MQTT_DASHBOARD_TOKEN" in service.environment,
    "the live page needs a token off loopback",
  );
  // The image's entrypoint grants listening there (the service stops before it lacks a permission).
  const dockerfile = Deno.readTextFileSync(`${ROOT}vllm.Dockerfile`);
  match(dockerfile, /"--allow-net=[^"]*\b0\.0\.0\.0\b[^"]*"/);
});
