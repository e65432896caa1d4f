/**
 * Just enough of the Prometheus text exposition format (version 0.0.4) for
 * the service's own metrics: labelled counters and histograms, and gauges
 * read when scraped.
 *
 * @module
 */

type Labels = Readonly<Record<string, string>>;

/** A metric that can write itself in the exposition format. */
export interface Metric {
  render(): string;
}

/** A monotonically increasing count, per label set. */
export class Counter implements Metric {
  readonly #name: string;
  readonly #help: string;
  readonly #values = new Map<string, number>();

  constructor(name: string, help: string) {
    this.#name = name;
    this.#help = help;
  }

  inc(labels: Labels = {}, by = 1): void {
    const key = labelText(labels);
    this.#values.set(key, (this.#values.get(key) ?? 0) + by);
  }

  render(): string {
    const lines = [`# HELP ${this.#name} ${this.#help}`, `# TYPE ${this.#name} counter`];
    for (const [labels, value] of this.#values) lines.push(`${this.#name}${labels} ${value}`);
    return lines.join("\n");
  }
}

/** A value read at scrape time. */
export class Gauge implements Metric {
  readonly #name: string;
  readonly #help: string;
  readonly #read: () => number;

  constructor(name: string, help: string, read: () => number) {
    this.#name = name;
    this.#help = help;
    this.#read = read;
  }

  render(): string {
    return [
      `# HELP ${this.#name} ${this.#help}`,
      `# TYPE ${this.#name} gauge`,
      `${this.#name} ${this.#read()}`,
    ].join("\n");
  }
}

/** Values read at scrape time, one per label set (a series absent from a read is left out). */
export class LabelledGauge implements Metric {
  readonly #name: string;
  readonly #help: string;
  readonly #read: () => readonly { labels: Labels; value: number }[];

  constructor(
    name: string,
    help: string,
    read: () => readonly { labels: Labels; value: number }[],
  ) {
    this.#name = name;
    this.#help = help;
    this.#read = read;
  }

  render(): string {
    const lines = [`# HELP ${this.#name} ${this.#help}`, `# TYPE ${this.#name} gauge`];
    for (const { labels, value } of this.#read()) {
      lines.push(`${this.#name}${labelText(labels)} ${value}`);
    }
    return lines.join("\n");
  }
}

/**
 * Observations counted into cumulative buckets (seconds, as Prometheus
 * expects), per label set: none for the service's own histograms, a
 * project and variant for an experiment's.
 */
export class Histogram implements Metric {
  readonly #name: string;
  readonly #help: string;
  readonly #bounds: readonly number[];
  readonly #labelled: boolean;
  readonly #series = new Map<
    string,
    { labels: Labels; counts: number[]; sum: number; count: number }
  >();

  /** `labelled`: every series has labels, so none is shown before the first observation. */
  constructor(name: string, help: string, bounds: readonly number[], labelled = false) {
    this.#name = name;
    this.#help = help;
    this.#bounds = bounds;
    this.#labelled = labelled;
  }

  observe(value: number, labels: Labels = {}): void {
    const key = labelText(labels);
    let series = this.#series.get(key);
    if (!series) {
      series = { labels, counts: this.#bounds.map(() => 0), sum: 0, count: 0 };
      this.#series.set(key, series);
    }
    series.sum += value;
    series.count++;
    for (let i = 0; i < this.#bounds.length; i++) {
      if (value <= this.#bounds[i]) series.counts[i]++;
    }
  }

  render(): string {
    const lines = [`# HELP ${this.#name} ${this.#help}`, `# TYPE ${this.#name} histogram`];
    // An unlabelled histogram has its series from the start (zeros), as before labels existed.
    const all = this.#series.size > 0 || this.#labelled
      ? [...this.#series.values()]
      : [{ labels: {}, counts: this.#bounds.map(() => 0), sum: 0, count: 0 }];
    for (const { labels, counts, sum, count } of all) {
      const text = labelText(labels);
      this.#bounds.forEach((bound, i) =>
        lines.push(
          `${this.#name}_bucket${labelText({ ...labels, le: String(bound) })} ${counts[i]}`,
        )
      );
      lines.push(`${this.#name}_bucket${labelText({ ...labels, le: "+Inf" })} ${count}`);
      lines.push(`${this.#name}_sum${text} ${sum}`);
      lines.push(`${this.#name}_count${text} ${count}`);
    }
    return lines.join("\n");
  }
}

/** Latency buckets from 1 ms to 2 minutes. */
export const SECONDS_BUCKETS: readonly number[] = [
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  120,
];

/** Renders every metric, in order, as one exposition document (one that renders nothing is left out). */
export function renderMetrics(metrics: readonly Metric[]): string {
  return metrics.map((metric) => metric.render()).filter((text) => text !== "").join("\n") + "\n";
}

function labelText(labels: Labels): string {
  const entries = Object.entries(labels);
  if (entries.length === 0) return "";
  const escape = (value: string) =>
    value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
  return `{${entries.map(([name, value]) => `${name}="${escape(value)}"`).join(",")}}`;
}
