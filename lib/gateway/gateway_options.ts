/**
 * The options of the gateway: what it is built from.
 *
 * @module
 */

import type { RequestLimits, Topics } from "../protocol/mod.ts";
import type { SessionDirectory } from "../sessions/session_directory.ts";
import type { SessionStore } from "../sessions/session_store.ts";
import type { TurnOrder } from "../sessions/turn_order.ts";
import type { EngineHealth } from "../engine/engine_health.ts";
import type { StorageHealth } from "../sessions/storage_health.ts";
import type { ExperimentMonitor } from "../observability/experiment_monitor.ts";
import type { Stats } from "../observability/stats.ts";
import type { Project } from "../projects/project_file.ts";
import type { BrokerRules, Publish } from "./reply_publisher.ts";
import type { SessionSigner } from "./session_signer.ts";
import type { Experiments } from "./experiments.ts";
import type { TurnPool } from "../workers/turn_pool.ts";
import type { TurnEngines } from "./turn_engines.ts";

/** What the gateway is built from. */
export interface GatewayOptions {
  /** Publishes a message on the broker. */
  readonly publish: Publish;
  /**
   * What the broker takes (its largest packet, the topics it can carry).
   * @default {ANY_BROKER}
   */
  readonly broker?: BrokerRules;
  /** Subscribes to topic filters at the options' QoS. */
  readonly subscribe: (filters: string[], qos: 0 | 1 | 2) => Promise<void>;
  /** Unsubscribes from topic filters (leaving a share group at shutdown). */
  readonly unsubscribe: (filters: string[]) => Promise<void>;
  /** Runs the admitted turns: the request workers, or the gateway's own thread (`--workers 0`). */
  readonly pool: TurnPool;
  readonly topics: Topics;
  readonly projects: ReadonlyMap<string, string>;
  readonly directory: SessionDirectory;
  readonly stats: Stats;
  /** Gate in front of the engine: a request waits while it is down. */
  readonly engineHealth: Pick<EngineHealth, "ready" | "succeeded" | "failed" | "confirmDown">;
  /**
   * Gives each turn its engine (several engines: the router); without it,
   * every turn goes to the one engine behind `engineHealth`.
   * @default {oneEngine(engineHealth)}
   */
  readonly engines?: TurnEngines;
  /**
   * Whether the session store can be written: while it cannot (a full disk),
   * turns are refused before anything is generated.
   */
  readonly storageHealth?: StorageHealth;
  /** Milliseconds a request waits for an engine that is down. */
  readonly engineWaitMs: number;
  readonly limits: RequestLimits;
  readonly qos: 0 | 1 | 2;
  readonly maxQueue: number;
  readonly maxInFlight: number;
  /**
   * Bytes of heap the requests in flight may hold, parsed or waiting, before
   * new ones get `overloaded` (`--payload-memory`); 0 turns the budget off.
   * @default {0}
   */
  readonly payloadMemory?: number;
  readonly dedupWindowMs: number;
  /** Requests per minute per session and per client id (0: off), after a burst. */
  readonly rateLimit: {
    readonly perSession: number;
    readonly perClient: number;
    readonly burst: number;
    /**
     * Sessions a project may start per minute, after a burst of as many (0: off).
     * @default {0}
     */
    readonly newSessions?: number;
  };
  /** The session store, for the control topics; undefined turns them off. */
  readonly controlStore: SessionStore | undefined;
  /** The order of a session's turns across instances (a share group); undefined: one instance. */
  readonly turnOrder: TurnOrder | undefined;
  /** Subscribe every project's input and answer `unknown_project` for those not served. */
  readonly answerUnknownProjects: boolean;
  /** Take requests only on per-session input topics (`--session-topics-only`). */
  readonly sessionTopicsOnly: boolean;
  /**
   * The reply topics a request may name (`--reply-topics`): MQTT topic filters
   * under the topic prefix, with `{project}`, `{session_id}` and `{username}`.
   * @default {DEFAULT_REPLY_TOPICS}
   */
  readonly replyTopics?: readonly string[];
  /**
   * The secret project-wide control commands must carry (`--operator-token`).
   * @default {undefined}
   */
  readonly operatorToken?: string;
  /** Takes only signed session ids, and hands out new ones (`--session-secret`). */
  readonly signer: SessionSigner | undefined;
  /** The engine's own count of a text's tokens, where it offers one (vLLM's `/tokenize`). */
  readonly engineTokenCount: (text: string) => Promise<number | undefined>;
  /**
   * The projects as their files declare them (state and hint topics, response
   * format, tools, model, sampling defaults); a project not here has only its prompt.
   */
  readonly projectFiles?: ReadonlyMap<string, Project>;
  /** Where turns of a project with an experiment are counted per variant. @default {undefined} */
  readonly experimentMonitor?: ExperimentMonitor;
  /**
   * The sessions' experiment variants and the feedback store; undefined when
   * no project runs an experiment (then no feedback topic is served).
   * @default {undefined}
   */
  readonly experiments?: Experiments;
  /**
   * The sessions' stored histories, where the feedback topic looks for the
   * request_id rated; undefined: no feedback topic.
   * @default {undefined}
   */
  readonly historyStore?: Pick<SessionStore, "load">;
  /**
   * The clock of queue times, rate limits and the dedup window (milliseconds).
   * @default {performance.now}
   */
  readonly now?: () => number;
}

/** The request limits of a project: its file's sampling defaults over the options'. */
export function projectLimits(options: GatewayOptions, project: string): RequestLimits {
  const file = options.projectFiles?.get(project);
  const { limits } = options;
  if (file?.temperature === undefined && file?.maxTokens === undefined) return limits;
  return {
    ...limits,
    temperature: file.temperature ?? limits.temperature,
    maxTokens: file.maxTokens ?? limits.maxTokens,
  };
}
