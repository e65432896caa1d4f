/**
 * Which engine a turn goes to, when several engines serve the same model.
 *
 * The service knows what the engines' routers have to guess: the session a
 * turn belongs to, how many of its prompt's tokens were sent in that session's
 * previous turn (its reusable prefix), and how many every session of the
 * project shares (the system prompt). The `cache-aware` policy uses that. A
 * turn's expected time to first token on an engine is
 *
 *     (uncached tokens queued there + this turn's uncached tokens there) / its prefill rate
 *     (+ as much again for the tokens it would evict from a full cache)
 *
 * counting the uncached tokens this service has in flight there, not yet
 * prefilled, and the requests vLLM reports waiting that are not ours. A
 * session's turn stays on its home engine unless another engine, not busier
 * over time, saves more than `marginMs`, counting the history prefilled again
 * there as delaying `u / (1 - u)` turns more (`u` below): a move pays the
 * whole history once, at high load that costs everyone more than it saves, and
 * moving on a passing queue, or to an engine that only looks idle this
 * instant, starts a cascade of moves. A new session (or one whose home is
 * gone) goes where that time plus the wait its next turns will meet is
 * lowest: that wait comes from the engine's recent prefill work (a decaying
 * sum, so paced sessions, which leave nothing in flight between turns, still
 * count), `u / (1 - u)` mean prefills, `u` its recent share of time
 * prefilling. There its project's system prompt counts as cached on an idle
 * engine that lacks it (if it has room; the less the busier, none from `u`
 * 0.5 on): an idle engine pays it once for all the project's sessions it
 * takes, while counted only where it is, it drew every new session of a light
 * load to that engine, whose sessions all had to move at the first burst,
 * history and all; on busy engines, sessions of a project kept together save
 * the room more copies of its prompt would take from histories. What an
 * engine still holds of a session is modelled per engine as an LRU of
 * sessions (and of each project's shared system prompt) sized in tokens
 * against the engine's KV cache: a session whose engine took more than its
 * cache of other tokens since is taken as evicted, as vLLM's LRU of blocks
 * would have evicted it. Each engine's prefill rate is measured from its
 * turns' times to first token (the uncached tokens ahead of a turn and its
 * own, over that time). An engine down is no candidate and forgets what it
 * held; its sessions are re-homed at their next turn by the rule for new
 * sessions, in a stable order (ties broken by each session's rendezvous order
 * over the engines left, so they spread over them).
 *
 * Baselines (`--route-policy`): `round-robin`, `least-loaded` (fewest turns in
 * flight) and `consistent-hash` (the session's hash on a ring: sticky, blind
 * to load). Only engines serving the turn's model or adapter are candidates,
 * whatever the policy.
 *
 * Several instances in a share group: a new (or re-homed) session's engine is
 * chosen by cost, with ties (costs within a tenth of the margin, as under
 * light load) broken by rendezvous hashing of the session over the candidates, so
 * instances that see the same idle engines choose the same one without asking
 * each other; a home that load moved, or that one instance chose under load,
 * is recorded in the shared store by `route_ledger.ts` (keys
 * `["route", project, sessionId]`, expiring with the session) and adopted by
 * the instance that runs the session's next turn ({@linkcode Router.adopt}).
 * The store, not a rule alone, because the rule can only agree on what every
 * instance sees, and each instance sees only its own turns in flight.
 *
 * @module
 */

import { mixedHash32 } from "../_util.ts";
import type { EngineLoad } from "./engine_load.ts";

/** How turns are spread over engines. */
export type RoutePolicy = "cache-aware" | "round-robin" | "least-loaded" | "consistent-hash";

/** The route policies, for option parsing. */
export const ROUTE_POLICIES: readonly RoutePolicy[] = [
  "cache-aware",
  "round-robin",
  "least-loaded",
  "consistent-hash",
];

/** One engine the router may send turns to. */
export interface EngineSlot {
  /** Its name in metrics and logs: `e0`, `e1`... */
  readonly id: string;
  /** The model and the adapters it serves (a turn asking for another is never sent there). */
  readonly models: readonly string[];
  /** Tokens its KV cache holds, when known before its `/metrics` tells. */
  readonly cacheTokens?: number;
}

/** What the router needs to know of a turn. */
export interface TurnToRoute {
  /** The session: `${project}/${sessionId}`. */
  readonly key: string;
  /** The model or adapter the turn asks for. */
  readonly model: string;
  /** Estimated tokens of the whole prompt sent (system prompt, history and message). */
  readonly promptTokens: number;
  /** Of those, tokens sent in this session's previous turn (0 or absent for a new session). */
  readonly prefixTokens?: number;
  /** Of those, tokens every session of the project sends first (the system prompt). */
  readonly sharedPrefixTokens?: number;
}

/**
 * Why a turn went where it went: to its session's `home`; a `new` session;
 * `moved_for_load` from a home that is up; `rehomed` from a home that is
 * down, no longer serves the model, or already failed this turn.
 */
export type RouteReason = "home" | "new" | "moved_for_load" | "rehomed";

/** The router's choice for one turn. */
export interface RouteDecision {
  readonly engine: string;
  readonly reason: RouteReason;
  /** Estimated prompt tokens that engine has to prefill (not in its prefix cache). */
  readonly uncachedTokens: number;
}

/** How a turn sent to an engine ended, for {@linkcode Router.finished}. */
export interface RouteOutcome {
  /** Whether the engine answered. */
  readonly ok: boolean;
  /** Milliseconds from sending the turn to its first token, when one came. */
  readonly ttftMs?: number;
  /** The prompt's tokens as the engine counted them (`usage.prompt_tokens`). */
  readonly promptTokens?: number;
}

/** Options of {@linkcode Router}. */
export interface RouterOptions {
  /**
   * How turns are spread.
   * @default {"cache-aware"}
   */
  readonly policy?: RoutePolicy;
  /**
   * A session stays on its home engine unless another is expected to reach its first token
   * this many milliseconds sooner.
   * @default {250}
   */
  readonly marginMs?: number;
  /**
   * Prefill rate assumed for an engine until its turns have measured it, in tokens per millisecond.
   * @default {10}
   */
  readonly prefillTokensPerMs?: number;
  /**
   * KV cache size assumed for an engine, in tokens, until its slot or `/metrics` tells.
   * @default {500000}
   */
  readonly cacheTokens?: number;
  /**
   * Half-life of the decaying sum of recent prefill work that measures an engine's load
   * between turns, in milliseconds.
   * @default {10000}
   */
  readonly recentHalfLifeMs?: number;
  /**
   * Load an engine's `/metrics` reported is ignored once older than this, in milliseconds.
   * @default {10000}
   */
  readonly loadMaxAgeMs?: number;
  /**
   * Sessions remembered (the least recently routed are forgotten beyond).
   * @default {100000}
   */
  readonly maxSessions?: number;
  /**
   * The clock, in milliseconds.
   * @default {performance.now}
   */
  readonly now?: () => number;
}

/** One engine as the router sees it, for metrics and the live page. */
export interface EngineRouteStats {
  readonly id: string;
  readonly models: readonly string[];
  readonly healthy: boolean;
  /** Turns sent there and not finished. */
  readonly inFlight: number;
  /** Uncached tokens of those turns not prefilled yet. */
  readonly uncachedInFlight: number;
  /** The decaying sum of uncached tokens sent there recently. */
  readonly recentUncachedTokens: number;
  /** Uncached tokens sent there since the router started. */
  readonly uncachedTokensTotal: number;
  /** Turns sent there since the router started. */
  readonly turnsTotal: number;
  /** Turns that ended with the engine failing. */
  readonly failuresTotal: number;
  /** Sessions whose home it is. */
  readonly sessions: number;
  /** Tokens of sessions it probably still holds in its prefix cache (the router's model). */
  readonly residentTokens: number;
  /** Its KV cache's size in tokens, as the router takes it. */
  readonly cacheTokens: number;
  /** Decisions that sent a turn there, by reason. */
  readonly decisions: Readonly<Record<RouteReason, number>>;
  /** Measured (or assumed) prefill rate, tokens per millisecond. */
  readonly prefillTokensPerMs: number;
  /** What its `/metrics` said last, if anything. */
  readonly load?: EngineLoad;
}

/** The router's state, for metrics and the live page. */
export interface RouterSnapshot {
  readonly policy: RoutePolicy;
  /** Sessions remembered. */
  readonly sessions: number;
  readonly engines: readonly EngineRouteStats[];
}

/** Turns with fewer tokens ahead of their first token say little about the prefill rate. */
const MIN_RATE_SAMPLE_TOKENS = 256;
/** Weight of a new sample in the prefill rate's moving average. */
const RATE_ALPHA = 0.2;
/** Points per engine on the consistent-hash ring. */
const RING_POINTS = 64;
/** Utilization beyond which the queueing estimate stops growing (it diverges at 1). */
const MAX_UTILIZATION = 0.95;

interface Resident {
  tokens: number;
}

interface EngineState {
  readonly slot: EngineSlot;
  healthy: boolean;
  inFlight: number;
  /** Turns in flight not prefilled yet, and their uncached tokens. */
  queued: number;
  uncachedInFlight: number;
  /** Decaying sum of uncached tokens, as of `recentAt`. */
  recent: number;
  recentAt: number;
  uncachedTotal: number;
  turnsTotal: number;
  failuresTotal: number;
  /** Mean uncached tokens per turn (moving average). */
  meanUncached: number;
  msPerToken: number;
  sessions: number;
  /** Sessions (by key) and shared prompts (by `project/`) it holds, least recently used first. */
  readonly resident: Map<string, Resident>;
  residentTokens: number;
  cacheTokens: number;
  load?: EngineLoad;
  loadAt: number;
  readonly decisions: Record<RouteReason, number>;
}

/** What a turn would meet on an engine (`Router`'s `#estimate`). */
interface Estimate {
  /** The turn's tokens not cached there. */
  readonly uncached: number;
  readonly msPerToken: number;
  /** Its recent share of time prefilling (at most `MAX_UTILIZATION`). */
  readonly utilization: number;
  /** Milliseconds to its first token there, from what is queued now. */
  readonly nowMs: number;
  /** The wait a turn meets there on average, from its recent work. */
  readonly laterMs: number;
}

interface SessionEntry {
  home: string;
}

interface Flight {
  readonly engine: string;
  readonly ahead: number;
  prefilled: boolean;
  done: boolean;
}

/** Routes turns to engines; see the module doc. */
export class Router {
  readonly #policy: RoutePolicy;
  readonly #marginMs: number;
  readonly #defaultCacheTokens: number;
  readonly #halfLifeMs: number;
  readonly #loadMaxAgeMs: number;
  readonly #maxSessions: number;
  readonly #now: () => number;
  readonly #engines = new Map<string, EngineState>();
  readonly #order: readonly EngineState[];
  /** Sessions by key, least recently routed first. */
  readonly #sessions = new Map<string, SessionEntry>();
  readonly #flights = new WeakMap<RouteDecision, Flight>();
  /** The turn each decision was made for, until it ends. */
  readonly #turns = new WeakMap<RouteDecision, TurnToRoute>();
  readonly #ring: readonly { point: number; engine: EngineState }[];
  #next = 0;

  constructor(engines: readonly EngineSlot[], options: RouterOptions = {}) {
    this.#policy = options.policy ?? "cache-aware";
    if (!ROUTE_POLICIES.includes(this.#policy)) {
      throw new RangeError(`unknown route policy "${this.#policy}"`);
    }
    this.#marginMs = options.marginMs ?? 250;
    this.#defaultCacheTokens = options.cacheTokens ?? 500_000;
    this.#halfLifeMs = options.recentHalfLifeMs ?? 10_000;
    this.#loadMaxAgeMs = options.loadMaxAgeMs ?? 10_000;
    this.#maxSessions = options.maxSessions ?? 100_000;
    this.#now = options.now ?? (() => performance.now());
    const msPerToken = 1 / (options.prefillTokensPerMs ?? 10);
    const now = this.#now();
    for (const slot of engines) {
      if (this.#engines.has(slot.id)) throw new RangeError(`engine "${slot.id}" named twice`);
      this.#engines.set(slot.id, {
        slot,
        healthy: true,
        inFlight: 0,
        queued: 0,
        uncachedInFlight: 0,
        recent: 0,
        recentAt: now,
        uncachedTotal: 0,
        turnsTotal: 0,
        failuresTotal: 0,
        meanUncached: 0,
        msPerToken,
        sessions: 0,
        resident: new Map(),
        residentTokens: 0,
        cacheTokens: slot.cacheTokens ?? this.#defaultCacheTokens,
        loadAt: -Infinity,
        decisions: { home: 0, new: 0, moved_for_load: 0, rehomed: 0 },
      });
    }
    this.#order = [...this.#engines.values()];
    this.#ring = this.#order
      .flatMap((engine) =>
        Array.from({ length: RING_POINTS }, (_, i) => ({
          point: mixedHash32(`${engine.slot.id}#${i}`),
          engine,
        }))
      )
      .sort((a, b) => a.point - b.point || (a.engine.slot.id < b.engine.slot.id ? -1 : 1));
  }

  /** The policy in use. */
  get policy(): RoutePolicy {
    return this.#policy;
  }

  /**
   * The engine for a turn; `undefined` when no healthy engine serves its model
   * (none left once `exclude`, the engines this turn already failed on, is set aside).
   */
  route(turn: TurnToRoute, exclude?: ReadonlySet<string>): RouteDecision | undefined {
    const candidates = this.#order.filter((engine) =>
      engine.healthy && engine.slot.models.includes(turn.model) && !exclude?.has(engine.slot.id)
    );
    if (candidates.length === 0) return undefined;
    const entry = this.#sessions.get(turn.key);
    const home = entry && candidates.find((engine) => engine.slot.id === entry.home);
    let chosen: EngineState;
    switch (this.#policy) {
      case "round-robin":
        chosen = candidates[this.#next++ % candidates.length];
        break;
      case "least-loaded": {
        // Ties (idle engines) taken in turn, not always the first.
        const start = this.#next++;
        chosen = candidates[start % candidates.length];
        for (let i = 1; i < candidates.length; i++) {
          const engine = candidates[(start + i) % candidates.length];
          if (engine.inFlight < chosen.inFlight) chosen = engine;
        }
        break;
      }
      case "consistent-hash":
        chosen = this.#onRing(turn.key, new Set(candidates));
        break;
      default:
        chosen = this.#cheapest(turn, candidates, home);
    }
    const reason: RouteReason = !entry
      ? "new"
      : chosen === home
      ? "home"
      : home
      ? "moved_for_load"
      : "rehomed";
    const decision = {
      engine: chosen.slot.id,
      reason,
      uncachedTokens: this.#uncached(chosen, turn),
    };
    this.#turns.set(decision, turn);
    return decision;
  }

  /** A turn was sent where `decision` says: it is in flight there, and that engine is its session's home. */
  started(engine: string, decision: RouteDecision): void {
    const state = this.#engine(engine);
    const now = this.#now();
    state.recent = this.#decayed(state, now) + decision.uncachedTokens;
    state.recentAt = now;
    state.inFlight++;
    state.queued++;
    state.uncachedTotal += decision.uncachedTokens;
    state.turnsTotal++;
    state.decisions[decision.reason]++;
    state.meanUncached += (decision.uncachedTokens - state.meanUncached) * RATE_ALPHA;
    this.#flights.set(decision, {
      engine,
      ahead: state.uncachedInFlight,
      prefilled: false,
      done: false,
    });
    state.uncachedInFlight += decision.uncachedTokens;
    const turn = this.#turns.get(decision);
    if (turn) {
      this.#home(turn.key, state);
      this.#touch(state, sharedKey(turn.key), turn.sharedPrefixTokens ?? 0);
      this.#touch(state, turn.key, turn.promptTokens - (turn.sharedPrefixTokens ?? 0));
    }
  }

  /**
   * The turn's first token came (its prompt is prefilled): its tokens no longer wait ahead of
   * others'. Optional: {@linkcode finished} does it for a turn that did not call it.
   */
  prefilled(engine: string, decision: RouteDecision): void {
    const flight = this.#flights.get(decision);
    if (!flight || flight.prefilled || flight.engine !== engine) return;
    flight.prefilled = true;
    const state = this.#engine(engine);
    state.queued--;
    state.uncachedInFlight -= decision.uncachedTokens;
  }

  /** The turn ended: measures the engine's prefill rate from its time to first token. */
  finished(engine: string, decision: RouteDecision, outcome: RouteOutcome): void {
    const flight = this.#flights.get(decision);
    if (!flight || flight.done || flight.engine !== engine) return;
    this.prefilled(engine, decision);
    flight.done = true;
    const state = this.#engine(engine);
    state.inFlight--;
    const turn = this.#turns.get(decision);
    if (!outcome.ok) {
      state.failuresTotal++;
      // What a failed turn left in the cache is unknown: count on nothing.
      if (turn) this.#forget(state, turn.key);
      return;
    }
    const tokens = flight.ahead + decision.uncachedTokens;
    if (outcome.ttftMs !== undefined && tokens >= MIN_RATE_SAMPLE_TOKENS) {
      state.msPerToken += (outcome.ttftMs / tokens - state.msPerToken) * RATE_ALPHA;
    }
    if (turn && outcome.promptTokens !== undefined && state.resident.has(turn.key)) {
      // The engine's own count replaces the estimate.
      this.#touch(state, turn.key, outcome.promptTokens - (turn.sharedPrefixTokens ?? 0));
    }
  }

  /**
   * An engine went down (its circuit opened, its process died) or came back. Down, it is no
   * candidate and what it held is forgotten (a restarted engine's cache is empty); its sessions
   * are re-homed at their next turn, each by cost with ties broken by its rendezvous order.
   */
  setHealthy(engine: string, healthy: boolean): void {
    const state = this.#engine(engine);
    if (state.healthy === healthy) return;
    state.healthy = healthy;
    if (!healthy) {
      state.resident.clear();
      state.residentTokens = 0;
    }
  }

  /** What the engine's `/metrics` said (see `engine_load.ts`). */
  observe(engine: string, load: EngineLoad): void {
    const state = this.#engine(engine);
    state.load = load;
    state.loadAt = this.#now();
    if (load.cacheTokens !== undefined && load.cacheTokens > 0 && !state.slot.cacheTokens) {
      state.cacheTokens = load.cacheTokens;
      this.#evict(state);
    }
  }

  /**
   * Takes `engine` as the session's home, as another instance recorded it in the shared store
   * (`route_ledger.ts`): it is taken to hold the session's previous turn (of a size learnt at
   * the session's next turn there).
   */
  adopt(key: string, engine: string): void {
    const state = this.#engines.get(engine);
    if (!state) return;
    const entry = this.#sessions.get(key);
    if (entry?.home === engine) return;
    this.#home(key, state);
    if (!state.resident.has(key)) this.#touch(state, key, 1);
  }

  /** The session's home engine, if it has one. */
  homeOf(key: string): string | undefined {
    return this.#sessions.get(key)?.home;
  }

  /** Forgets a session (deleted or expired). */
  forgetSession(key: string): void {
    const entry = this.#sessions.get(key);
    if (!entry) return;
    this.#sessions.delete(key);
    this.#engines.get(entry.home)!.sessions--;
    for (const state of this.#order) this.#forget(state, key);
  }

  /** Per engine: in flight, uncached tokens in flight, sessions homed, decisions, prefill rate. */
  snapshot(): RouterSnapshot {
    const now = this.#now();
    return {
      policy: this.#policy,
      sessions: this.#sessions.size,
      engines: this.#order.map((state) => ({
        id: state.slot.id,
        models: state.slot.models,
        healthy: state.healthy,
        inFlight: state.inFlight,
        uncachedInFlight: state.uncachedInFlight,
        recentUncachedTokens: Math.round(this.#decayed(state, now)),
        uncachedTokensTotal: state.uncachedTotal,
        turnsTotal: state.turnsTotal,
        failuresTotal: state.failuresTotal,
        sessions: state.sessions,
        residentTokens: state.residentTokens,
        cacheTokens: state.cacheTokens,
        decisions: { ...state.decisions },
        prefillTokensPerMs: 1 / state.msPerToken,
        ...(state.load && { load: state.load }),
      })),
    };
  }

  /**
   * `cache-aware`. A session at home stays unless another engine, not busier in the long run,
   * gives this turn its first token `marginMs` sooner. Else (a new session, or its home gone):
   * the lowest sum of this turn's expected time to first token and the wait its next turns
   * will meet there; near-ties broken by the session's rendezvous order.
   */
  #cheapest(turn: TurnToRoute, candidates: EngineState[], home?: EngineState): EngineState {
    const now = this.#now();
    // A new session's system prompt counts as cached on every idle engine with room for it: one
    // that lacks it pays it once for every session of the project it will take, whereas all of
    // them placed where it is (as under light load, nothing in flight to tell the engines apart)
    // have to move, history and all, when the load comes.
    const estimates = candidates.map((engine) => this.#estimate(engine, turn, now, !home));
    if (home) {
      const here = estimates[candidates.indexOf(home)];
      let best: number | undefined;
      let bestMs = Infinity;
      for (let i = 0; i < candidates.length; i++) {
        // Not to an engine busier over time: moving there would only move the queue.
        if (candidates[i] === home || estimates[i].laterMs > here.laterMs) continue;
        // The history prefilled again there delays the turns that arrive meanwhile, the more
        // the busier it is (u / (1 - u) of them): a move is worth it only if it still saves the
        // margin counting that too.
        const { nowMs, uncached, msPerToken, utilization } = estimates[i];
        const ms = nowMs + Math.max(0, uncached - here.uncached) * msPerToken *
            utilization / (1 - utilization);
        if (ms < bestMs) [best, bestMs] = [i, ms];
      }
      return best !== undefined && bestMs < here.nowMs - this.#marginMs ? candidates[best] : home;
    }
    const costs = estimates.map(({ nowMs, laterMs }) => nowMs + laterMs);
    let best = 0;
    for (let i = 1; i < costs.length; i++) if (costs[i] < costs[best]) best = i;
    // Near-ties broken the same way by every instance: the session's rendezvous order.
    let chosen = best;
    let weight = -1;
    for (let i = 0; i < costs.length; i++) {
      if (costs[i] > costs[best] + this.#marginMs / 10) continue;
      const w = mixedHash32(`${turn.key}\u0000${candidates[i].slot.id}`);
      if (w > weight) [chosen, weight] = [i, w];
    }
    return candidates[chosen];
  }

  /**
   * `nowMs`: expected milliseconds to this turn's first token on `engine`, from what is queued
   * there now; `laterMs`: the wait a turn meets there on average, from its recent work.
   */
  #estimate(
    engine: EngineState,
    turn: TurnToRoute,
    now: number,
    sharedEverywhere: boolean,
  ): Estimate {
    // Paced sessions leave nothing in flight between turns: the wait over time comes from the
    // engine's recent work, u / (1 - u) mean prefills, u its recent share of time prefilling.
    const windowMs = this.#halfLifeMs / Math.LN2;
    const utilization = Math.min(
      MAX_UTILIZATION,
      (this.#decayed(engine, now) * engine.msPerToken) / windowMs,
    );
    // The system prompt where it is not yet: paid once for the project's next sessions there
    // when the engine is idle; busy, its caches fill, each copy of the prompt takes room from
    // histories, and sessions of a project kept together save that room. In between, in
    // proportion: all of it counted as held when idle, none from half busy on.
    const credit = sharedEverywhere ? Math.max(0, 1 - 2 * utilization) : 0;
    const uncached = this.#uncached(engine, turn, credit);
    // What is queued there: ours, and requests vLLM reports waiting beyond ours.
    let queuedTokens = engine.uncachedInFlight;
    if (engine.load?.waiting !== undefined && now - engine.loadAt <= this.#loadMaxAgeMs) {
      queuedTokens += Math.max(0, engine.load.waiting - engine.queued) * engine.meanUncached;
    }
    // Tokens it would have to evict from a full cache are prefilled again later by someone.
    const overflow = Math.max(0, engine.residentTokens + uncached - engine.cacheTokens);
    const evicted = Math.min(overflow, uncached);
    return {
      uncached,
      msPerToken: engine.msPerToken,
      utilization,
      nowMs: (queuedTokens + uncached + evicted) * engine.msPerToken,
      laterMs: utilization / (1 - utilization) * engine.meanUncached * engine.msPerToken,
    };
  }

  /**
   * Estimated tokens of the turn's prompt `engine` does not hold; where it does not hold the
   * project's system prompt but has room for it, that share of it (`sharedCredit`, 0 to 1) is
   * counted as held (a full engine would evict others' tokens to hold it).
   */
  #uncached(engine: EngineState, turn: TurnToRoute, sharedCredit = 0): number {
    const shared = turn.sharedPrefixTokens ?? 0;
    // The session's previous prompt, where the engine holds it (its size when the caller does
    // not say how much of it this prompt repeats), else the project's system prompt.
    const own = engine.resident.get(turn.key);
    const ownCached = own ? turn.prefixTokens ?? own.tokens + shared : 0;
    const sharedCached = engine.resident.has(sharedKey(turn.key))
      ? shared
      : engine.residentTokens + shared <= engine.cacheTokens
      ? shared * sharedCredit
      : 0;
    return Math.max(0, turn.promptTokens - Math.max(ownCached, sharedCached));
  }

  /** The session's decaying recent work on `engine` as of `now`. */
  #decayed(engine: EngineState, now: number): number {
    return engine.recent * 2 ** (-(now - engine.recentAt) / this.#halfLifeMs);
  }

  #onRing(key: string, candidates: ReadonlySet<EngineState>): EngineState {
    const point = mixedHash32(key);
    let low = 0;
    let high = this.#ring.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (this.#ring[mid].point < point) low = mid + 1;
      else high = mid;
    }
    for (let i = 0; i < this.#ring.length; i++) {
      const { engine } = this.#ring[(low + i) % this.#ring.length];
      if (candidates.has(engine)) return engine;
    }
    throw new Error("no candidate on the ring"); // unreachable: candidates is not empty
  }

  #home(key: string, state: EngineState): void {
    const entry = this.#sessions.get(key);
    if (entry) {
      this.#sessions.delete(key); // re-inserted as the most recently routed
      if (entry.home !== state.slot.id) {
        this.#engines.get(entry.home)!.sessions--;
        state.sessions++;
        entry.home = state.slot.id;
      }
      this.#sessions.set(key, entry);
      return;
    }
    this.#sessions.set(key, { home: state.slot.id });
    state.sessions++;
    while (this.#sessions.size > this.#maxSessions) {
      const [oldest] = this.#sessions.keys();
      this.forgetSession(oldest);
    }
  }

  /** `key` is the most recently used of what `state` holds, with `tokens` tokens. */
  #touch(state: EngineState, key: string, tokens: number): void {
    if (tokens <= 0) return;
    this.#forget(state, key);
    state.resident.set(key, { tokens });
    state.residentTokens += tokens;
    this.#evict(state);
  }

  #forget(state: EngineState, key: string): void {
    const held = state.resident.get(key);
    if (!held) return;
    state.resident.delete(key);
    state.residentTokens -= held.tokens;
  }

  /** LRU eviction beyond the cache's size, keeping the most recent entry. */
  #evict(state: EngineState): void {
    while (state.residentTokens > state.cacheTokens && state.resident.size > 1) {
      const [oldest] = state.resident.keys();
      this.#forget(state, oldest);
    }
  }

  #engine(id: string): EngineState {
    const state = this.#engines.get(id);
    if (!state) throw new RangeError(`no engine "${id}"`);
    return state;
  }
}

/** The resident key of a project's shared system prompt: `project/`. */
function sharedKey(sessionKey: string): string {
  return sessionKey.slice(0, sessionKey.indexOf("/") + 1);
}
