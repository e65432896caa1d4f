/**
 * Several engines behind the service: each turn's engine is the router's
 * choice (`routing/router.ts`), made with what only this service knows — the
 * session, the adapter the turn asks for, the prompt's size and how much of it
 * the session's previous turn sent. The router is told what goes on: turns
 * started and finished on each engine, circuits opening and closing, and each
 * engine's `/metrics` (polled here, as vLLM reports its queue and cache).
 *
 * A turn whose engine is down goes to another that serves its model; when
 * none does, it waits (within --engine-wait) for the first to come back.
 *
 * @module
 */

import { abortableSleep, LruMap, ProbeLoop } from "../_util.ts";
import type { EngineFleet, FleetEngine } from "../engine/engine_fleet.ts";
import { ServiceError } from "../protocol/errors.ts";
import { parseEngineLoad } from "../routing/engine_load.ts";
import type { RouteLedger } from "../routing/route_ledger.ts";
import type { RouteDecision, Router } from "../routing/router.ts";
import type { EngineGauges } from "../observability/stats.ts";
import type { EngineLease, TurnEngines, TurnFacts } from "./turn_engines.ts";

/** Options of {@linkcode FleetRouting}. */
export interface FleetRoutingOptions {
  readonly fleet: EngineFleet;
  readonly router: Router;
  /** The model a turn that names none asks for (`--served-model-name`). */
  readonly model: string;
  /**
   * The session -> home ledger shared by the instances of a share group, so that they keep a
   * session on one engine; none alone.
   * @default {undefined}
   */
  readonly ledger?: RouteLedger;
  /**
   * Milliseconds between reads of each engine's `/metrics`.
   * @default {2000}
   */
  readonly loadIntervalMs?: number;
  /**
   * Sessions whose last prompt is remembered (the least recently used are forgotten).
   * @default {100000}
   */
  readonly maxSessions?: number;
  /**
   * The clock, in milliseconds.
   * @default {performance.now}
   */
  readonly now?: () => number;
}

/** What a session sent last: its prompt and the answer, both in its next prompt's prefix. */
interface LastTurn {
  readonly promptTokens: number;
  readonly completionTokens: number;
}

/** Gives each turn the router's engine, and keeps the router told. */
export class FleetRouting implements TurnEngines {
  readonly #fleet: EngineFleet;
  readonly #router: Router;
  readonly #model: string;
  readonly #ledger: RouteLedger | undefined;
  readonly #now: () => number;
  readonly #last: LruMap<string, LastTurn>;
  readonly #loads: ProbeLoop;

  constructor(options: FleetRoutingOptions) {
    this.#fleet = options.fleet;
    this.#router = options.router;
    this.#model = options.model;
    this.#ledger = options.ledger;
    this.#now = options.now ?? (() => performance.now());
    this.#last = new LruMap(options.maxSessions ?? 100_000);
    const interval = options.loadIntervalMs ?? 2000;
    this.#loads = new ProbeLoop(() => this.#readLoads(), () => interval);
  }

  /** Starts reading the engines' `/metrics`. */
  start(): this {
    this.#loads.start();
    return this;
  }

  /** Stops reading them. */
  close(): Promise<void> {
    return this.#loads.close();
  }

  /** An engine's circuit opened or closed, or it gave up for good: the router re-homes. */
  health(index: number, ready: boolean): void {
    const engine = this.#fleet.engines[index];
    this.#router.setHealthy(engine.id, ready && !engine.gaveUp);
  }

  /**
   * Forgets a session (reset, cleared or deleted): its next turn is a new one, placed by cost,
   * here and, through the shared ledger, on every instance that reads it. The project's system
   * prompt, which the engines that served the project still hold, keeps counting as cached
   * there: a reset session's next turn goes where that saves most, not necessarily back home.
   */
  async forget(session: string): Promise<void> {
    this.#last.delete(session);
    this.#router.forgetSession(session);
    if (this.#ledger === undefined) return;
    const slash = session.indexOf("/");
    await this.#ledger.forget(session.slice(0, slash), session.slice(slash + 1))
      .catch(() => {}); // The store failing: the recorded home is adopted and moves by cost.
  }

  async acquire(
    turn: TurnFacts,
    exclude: ReadonlySet<number>,
    waitMs: number,
    signal: AbortSignal,
  ): Promise<EngineLease> {
    const deadline = this.#now() + waitMs;
    // A reset empties the history: what the engines hold of the session is no prefix of it.
    if (turn.reset) await this.forget(turn.session);
    const routed = this.#routed(turn);
    // Most turns exclude none: no set built for them.
    const excluded = exclude.size === 0
      ? undefined
      : new Set([...exclude].map((index) => this.#fleet.engines[index].id));
    for (;;) {
      signal.throwIfAborted();
      // Another engine than those that failed the turn; failing that, one of those, back (with
      // none excluded, the same question again would get the same answer).
      const decision = (this.#ledger
        ? await this.#ledger.route(this.#router, routed, excluded)
        : this.#router.route(routed, excluded)) ?? (excluded && this.#router.route(routed));
      const engine = decision && this.#fleet.engines.find((e) =>
        e.id === decision.engine
      );
      if (decision && engine) return this.#lease(turn.session, engine, decision);
      const left = deadline - this.#now();
      if (left <= 0) throw unavailable(routed.model);
      await this.#anyBack(routed.model, left, signal);
    }
  }

  /**
   * Waits until an engine serving `model` takes turns again, or `waitMs` passes. Only those
   * down are waited for: one that is up is the router's to choose (it hears of each circuit
   * from the same probe), so this never returns at once for an engine it would not take.
   */
  async #anyBack(model: string, waitMs: number, signal: AbortSignal): Promise<void> {
    const down = this.#fleet.engines.filter((engine) =>
      !engine.gaveUp && engine.health.state === "down" && this.#serves(engine, model)
    );
    const settled = new AbortController();
    const both = AbortSignal.any([signal, settled.signal]);
    try {
      await Promise.any([
        ...down.map((engine) => engine.health.ready(waitMs, both)),
        abortableSleep(waitMs, both).then(() => Promise.reject(unavailable(model))),
      ]);
    } catch {
      signal.throwIfAborted();
      throw unavailable(model);
    } finally {
      settled.abort();
    }
  }

  /** Whether `engine` serves `model`: the default one always (each engine answers with its own). */
  #serves(engine: FleetEngine, model: string): boolean {
    return model === this.#model || (engine.running.serves?.includes(model) ?? true);
  }

  /** What the router is told of a turn: its size, and what the session sent before it. */
  #routed(turn: TurnFacts) {
    const last = this.#last.get(turn.session);
    // The previous prompt and its answer are the history this turn's prompt starts with.
    const prefix = last === undefined ? 0 : last.promptTokens + last.completionTokens;
    const shared = turn.systemTokens ?? 0;
    return {
      key: turn.session,
      model: turn.model ?? this.#model,
      promptTokens: Math.max(prefix, shared) + turn.messageTokens,
      ...(last !== undefined && { prefixTokens: prefix }),
      sharedPrefixTokens: shared,
    };
  }

  #lease(session: string, engine: FleetEngine, decision: RouteDecision): EngineLease {
    const router = this.#router;
    router.started(engine.id, decision);
    let done = false;
    return {
      index: engine.index,
      health: engine.health,
      prefilled: () => router.prefilled(engine.id, decision),
      finished: (outcome) => {
        if (done) return;
        done = true;
        if (outcome.promptTokens !== undefined && outcome.completionTokens !== undefined) {
          this.#last.set(session, {
            promptTokens: outcome.promptTokens,
            completionTokens: outcome.completionTokens,
          });
        }
        router.finished(engine.id, decision, {
          ok: outcome.ok,
          ...(outcome.ttftMs !== undefined && { ttftMs: outcome.ttftMs }),
          ...(outcome.promptTokens !== undefined && { promptTokens: outcome.promptTokens }),
        });
      },
    };
  }

  /** Each engine as the operator sees it: health, load, routing. */
  engineGauges(): EngineGauges[] {
    const routed = new Map(this.#router.snapshot().engines.map((engine) => [engine.id, engine]));
    return this.#fleet.engines.map((engine) => {
      const route = routed.get(engine.id);
      const load = route?.load;
      const queries = load?.prefixCacheQueries;
      return {
        id: engine.id,
        url: engine.running.endpoint.baseUrl,
        state: engine.gaveUp ? "gave_up" : engine.health.state,
        inFlight: route?.inFlight ?? 0,
        ...(load?.waiting !== undefined && { waiting: load.waiting }),
        ...(queries !== undefined && queries > 0 &&
          { prefixHitRate: (load!.prefixCacheHits ?? 0) / queries }),
        sessions: route?.sessions ?? 0,
        turns: route?.turnsTotal ?? 0,
        errors: route?.failuresTotal ?? 0,
        uncachedTokens: route?.uncachedTokensTotal ?? 0,
        outages: engine.health.outages,
        restarts: engine.running.restarts,
        decisions: route?.decisions ?? {},
      };
    });
  }

  async #readLoads(): Promise<void> {
    await Promise.all(this.#fleet.engines.map(async (engine) => {
      const url = engine.running.metricsUrl;
      if (url === undefined || engine.gaveUp) return;
      try {
        const response = await fetch(url, {
          headers: { authorization: `Bearer ${engine.running.endpoint.apiKey}` },
          signal: AbortSignal.any([AbortSignal.timeout(2000), this.#loads.signal]),
        });
        if (!response.ok) {
          await response.body?.cancel();
          return;
        }
        this.#router.observe(engine.id, parseEngineLoad(await response.text()));
      } catch {
        // Down or without /metrics: its health probe and the turns' own counts say enough.
      }
    }));
  }
}

function unavailable(model: string): ServiceError {
  return new ServiceError(
    "engine_unavailable",
    `no engine serving ${model} is answering; try again later`,
    { retryAfterMs: 5000 },
  );
}
