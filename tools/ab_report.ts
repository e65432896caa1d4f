/**
 * `deno task ab-report`: the figures of a project's experiment over a time
 * range, from what the service stored (its outcome records and the feedback
 * topic's records in the session store), so it works with the service
 * stopped or restarted, and sees every instance that shares the store.
 *
 * ```sh
 * deno task ab-report --project maze --since 2026-12-01 [--until 2026-12-08] [--data-dir ./data] [--json]
 * ```
 *
 * Prints, per experiment of the project found in the range, a table of the
 * variants side by side (with 95% intervals) and each variant's verdict
 * against the baseline; `--json` prints the same figures as JSON. The rules
 * behind the intervals and the verdict: `lib/observability/experiment_stats.ts`
 * and docs/operations.md, "Reading an experiment".
 *
 * Exit status: 0 with a report, 1 when the store holds no outcome of the
 * project in the range, 2 for a wrong command line.
 *
 * @module
 */

import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  type ExperimentFigures,
  experimentFigures,
  type Interval,
  type VariantFigures,
} from "../lib/observability/experiment_stats.ts";
import {
  readExperimentMeta,
  readFeedback,
  readOutcomes,
  type TimeRange,
} from "../lib/observability/outcome_log.ts";
import { openKv } from "../lib/sessions/_util.ts";

/** One experiment's report. */
export interface ExperimentReport {
  readonly project: string;
  readonly experiment: string;
  readonly since: string | null;
  readonly until: string | null;
  readonly figures: ExperimentFigures;
}

const USAGE =
  "usage: deno task ab-report --project NAME [--since DATE] [--until DATE] [--data-dir DIR] [--json]\n" +
  "  DATE: 2026-12-01 (midnight UTC) or an ISO time; --since included, --until not";

/** Reads the store and reports each experiment of `project` in `range`. */
export async function abReport(
  kv: Deno.Kv,
  project: string,
  range: TimeRange,
): Promise<ExperimentReport[]> {
  const outcomes = await readOutcomes(kv, project, range);
  const feedback = await readFeedback(kv, project, range);
  const reports: ExperimentReport[] = [];
  for (const [experiment, records] of outcomes) {
    const sessions = new Set(records.map((r) => r.sessionId));
    const meta = await readExperimentMeta(kv, project, experiment);
    reports.push({
      project,
      experiment,
      since: range.since === undefined ? null : new Date(range.since).toISOString(),
      until: range.until === undefined ? null : new Date(range.until).toISOString(),
      figures: experimentFigures(
        records,
        feedback.filter((f) => sessions.has(f.sessionId)),
        { variants: meta?.variants ?? [] },
      ),
    });
  }
  return reports;
}

const pct = (share: number) => `${(share * 100).toFixed(1)}%`;
const round = (value: number, digits: number) =>
  Number.isFinite(value) ? String(Math.round(value * 10 ** digits) / 10 ** digits) : "?";
const ms = (value: number | null) => value === null ? "-" : String(value);

function interval(i: Interval | null, show: (value: number) => string): string {
  if (!i) return "-";
  return `${show(i.value)} [${show(i.low)}, ${show(i.high)}]`;
}

const COLUMNS: readonly [string, (v: VariantFigures) => string][] = [
  ["sessions", (v) => String(v.sessions)],
  ["requests", (v) => String(v.requests)],
  ["error rate", (v) => interval(v.errorRate, pct)],
  ["first delta p50/p95 ms", (v) => `${ms(v.ttfdMs.p50)}/${ms(v.ttfdMs.p95)}`],
  ["total p50/p95 ms", (v) => `${ms(v.totalMs.p50)}/${ms(v.totalMs.p95)}`],
  ["tokens in/out", (v) => `${v.tokensIn}/${v.tokensOut}`],
  ["parse failures", (v) => `${v.parseFailures} (${pct(v.parseFailureRate.value)})`],
  ["turns/session", (v) => interval(v.turnsPerSession, (x) => round(x, 1))],
  ["feedback rate", (v) => interval(v.feedbackRate, pct)],
  ["mean score", (v) => interval(v.meanScore, (x) => round(x, 2))],
];

/** The report as text: a heading, the table (a row per variant), errors by code, the verdicts. */
export function reportText(report: ExperimentReport): string {
  const { figures } = report;
  const turns = figures.variants.reduce((n, v) => n + v.requests, 0);
  const sessions = figures.variants.reduce((n, v) => n + v.sessions, 0);
  const lines = [
    `Experiment ${report.experiment} of project ${report.project}, ${
      report.since ?? "the start"
    } to ${report.until ?? "now"}: ${turns} turns in ${sessions} sessions (95% intervals)`,
    "",
  ];
  const header = ["variant", ...COLUMNS.map(([name]) => name)];
  const rows = figures.variants.map((v) => [
    v.name === figures.baseline ? `${v.name} (baseline)` : v.name,
    ...COLUMNS.map(([, value]) => value(v)),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  lines.push(line(header), ...rows.map(line), "");
  for (const v of figures.variants) {
    const codes = Object.entries(v.errors).map(([code, n]) => `${code} ${n}`).join(", ");
    if (codes) lines.push(`errors of ${v.name}: ${codes}`);
  }
  lines.push("Verdicts (mean feedback score per session when both have it, else the error rate):");
  for (const verdict of figures.verdicts) {
    const d = verdict.difference;
    const basis = verdict.metric === "feedback_score"
      ? `mean score ${round(d.value, 3)} against ${verdict.baseline}, interval [${
        round(d.low, 3)
      }, ${round(d.high, 3)}]`
      : `error rate ${d.value >= 0 ? "+" : ""}${pct(d.value)} against ${verdict.baseline}, ` +
        `interval [${pct(d.low)}, ${pct(d.high)}]`;
    lines.push(`  ${verdict.variant}: ${verdict.text} (${basis})`);
  }
  if (figures.verdicts.length === 0) lines.push("  (one variant only: nothing to compare)");
  return lines.join("\n");
}

/** A date or time of the command line, in Unix milliseconds. */
function parseTime(option: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Date.parse(/^\d{4}-\d{2}-\d{2}$/.test(text) ? `${text}T00:00:00Z` : text);
  if (Number.isNaN(value)) throw new Error(`--${option}: not a date or time: ${text}`);
  return value;
}

async function main(args: string[]): Promise<number> {
  const { values: flags } = parseArgs({
    args,
    options: {
      project: { type: "string" },
      since: { type: "string" },
      until: { type: "string" },
      "data-dir": { type: "string", default: "./data" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  if (!flags.project) throw new Error("--project is required");
  const range = {
    since: parseTime("since", flags.since),
    until: parseTime("until", flags.until),
  };
  const path = join(flags["data-dir"], "sessions.kv");
  try {
    await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      console.error(`no session store at ${path}: give the service's --data-dir`);
      return 1;
    }
    throw error;
  }
  // The service may hold the store's lock a moment (its writes): tried again, as the service does.
  const kv = await openKv(path);
  try {
    const reports = await abReport(kv, flags.project, range);
    if (reports.length === 0) {
      console.error(`no experiment outcomes of project ${flags.project} in that range`);
      return 1;
    }
    console.log(
      flags.json ? JSON.stringify(reports, null, 2) : reports.map(reportText).join("\n\n"),
    );
    return 0;
  } finally {
    kv.close();
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable) {
      console.error(
        `${(error as Error).message}\nab-report reads ./data and /var/lib/vllm-mqtt; for another ` +
          "--data-dir run: deno run --allow-read=DIR --allow-write=DIR tools/ab_report.ts ...",
      );
      Deno.exit(2);
    }
    console.error(`${(error as Error).message}\n${USAGE}`);
    Deno.exit(2);
  }
}
