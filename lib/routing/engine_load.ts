/**
 * What an engine's `/metrics` says about its load, read from vLLM's
 * Prometheus text: the scheduler's gauges `vllm:num_requests_waiting` and
 * `vllm:num_requests_running`, the KV cache's use `vllm:kv_cache_usage_perc`
 * (before vLLM 0.9, and hidden after 0.10: `vllm:gpu_cache_usage_perc`), the
 * prefix cache's counters `vllm:prefix_cache_hits_total` and
 * `vllm:prefix_cache_queries_total` (before 0.9: `vllm:gpu_prefix_cache_*`),
 * and the cache's size in tokens from `vllm:cache_config_info`'s labels
 * `num_gpu_blocks` and `block_size` (names as vllm/v1/metrics/loggers.py
 * registers them; prometheus_client adds `_total` to counters).
 *
 * An engine with several engine cores (`--data-parallel-size`) reports one
 * series per `engine` label: gauges and counters are summed over them.
 *
 * @module
 */

/** An engine's load as its `/metrics` reports it; a field is absent when the engine does not report it. */
export interface EngineLoad {
  /** Requests waiting to be scheduled. */
  readonly waiting?: number;
  /** Requests in the running batch. */
  readonly running?: number;
  /** Share of the KV cache in use, 0 to 1. */
  readonly kvCacheUsage?: number;
  /** Prompt tokens found in the prefix cache since the engine started. */
  readonly prefixCacheHits?: number;
  /** Prompt tokens looked up in the prefix cache since the engine started. */
  readonly prefixCacheQueries?: number;
  /** Tokens the KV cache holds (`num_gpu_blocks` × `block_size`). */
  readonly cacheTokens?: number;
}

const SAMPLE = /^(vllm:[A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/;

/** Reads an engine's Prometheus text into an {@linkcode EngineLoad}. */
export function parseEngineLoad(text: string): EngineLoad {
  const sums = new Map<string, number>();
  const series = new Map<string, number>();
  let cacheTokens: number | undefined;
  for (const line of text.split("\n")) {
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const [, name, labels = "", raw] = match;
    if (name === "vllm:cache_config_info") {
      const label = (key: string) =>
        Number(new RegExp(`(?:^|,)\\s*${key}="([^"]*)"`).exec(labels)?.[1]);
      const blocks = label("num_gpu_blocks");
      const size = label("block_size");
      if (blocks > 0 && size > 0) cacheTokens = (cacheTokens ?? 0) + blocks * size;
      continue;
    }
    const value = Number(raw);
    if (!Number.isFinite(value)) continue;
    sums.set(name, (sums.get(name) ?? 0) + value);
    series.set(name, (series.get(name) ?? 0) + 1);
  }
  const named = (...names: string[]) => names.find((name) => sums.has(name));
  const first = (...names: string[]) => {
    const name = named(...names);
    return name === undefined ? undefined : sums.get(name);
  };
  const usageName = named("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc");
  const load: Record<string, number | undefined> = {
    waiting: first("vllm:num_requests_waiting"),
    running: first("vllm:num_requests_running"),
    // A share: averaged, not summed, over engine cores.
    kvCacheUsage: usageName === undefined
      ? undefined
      : sums.get(usageName)! / series.get(usageName)!,
    prefixCacheHits: first("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    prefixCacheQueries: first(
      "vllm:prefix_cache_queries_total",
      "vllm:gpu_prefix_cache_queries_total",
    ),
    cacheTokens,
  };
  for (const key of Object.keys(load)) if (load[key] === undefined) delete load[key];
  return load as EngineLoad;
}
