/**
 * Game state topics: `{prefix}{project}/state` (and `.../state/{session_id}`)
 * for projects whose file says `state_topic: true`. Each state message becomes
 * a turn of its session (see `games/maze_state.ts`), answered with one hint
 * object on `{prefix}{project}/hint/{session_id}` (`hint_topic: true`; else on
 * the session's reply topic, in v1 JSON).
 *
 * **Latest state wins.** A session has at most one state turn in the service
 * (queued or running) and one waiting here: a newer state replaces the
 * waiting one, which is dropped and counted `superseded`, so a slow engine
 * never builds a backlog of stale positions. The hint of the state that
 * replaced it answers the game.
 *
 * @module
 */

import { leftOut, logger, LogThrottle } from "../log.ts";
import type { Project } from "../projects/project_file.ts";
import {
  type ChatRequest,
  type ControlCommand,
  parseRequest,
  type ReplyBody,
  type RequestLimits,
  ServiceError,
  SESSION_ID_PATTERN,
  type Topics,
  unparsableReason,
} from "../protocol/mod.ts";
import type { Stats } from "../observability/stats.ts";
import { parseState, StateError } from "../games/maze_state.ts";
import { sessionKey } from "../sessions/session_key.ts";
import type { ReplyTarget } from "./reply_target.ts";

/** What the state topics act through (the gateway). */
export interface StateTopicsOptions {
  readonly topics: Topics;
  readonly projects: ReadonlyMap<string, Project>;
  readonly stats: Stats;
  /** The request limits of a project (its sampling defaults applied). */
  readonly limits: (project: string) => RequestLimits;
  /** Refuses the shared state topic (`--session-topics-only`). */
  readonly sessionTopicsOnly: boolean;
  /** Whether a session id may be used (signed, under `--session-secret`). */
  readonly verify: (sessionId: string) => boolean;
  /**
   * Hands a state turn to the scheduler; `settled` is called (once or more)
   * when it has been answered, or failed.
   */
  readonly submit: (request: ChatRequest, target: ReplyTarget, settled: () => void) => void;
  readonly publish: (target: ReplyTarget, body: ReplyBody) => void;
}

interface Waiting {
  readonly request: ChatRequest;
  readonly target: ReplyTarget;
}

const log = logger("state");

/** The hint that acknowledges a control command on the hint topic, as the original sent it. */
export function controlHint(command: ControlCommand): string | undefined {
  switch (command) {
    case "template":
      return "Template updated";
    case "clear_history":
      return "History cleared";
    default:
      return undefined;
  }
}

/** Takes state messages, one turn per session at a time, the latest first. */
export class StateTopics {
  readonly #options: StateTopicsOptions;
  /** Sessions with a state turn in the service, and the state waiting behind it, if any. */
  readonly #sessions = new Map<string, { waiting: Waiting | undefined }>();
  /** Unanswerable states are logged, but a flood of them only once a minute per project. */
  readonly #unanswerable = new LogThrottle();

  constructor(options: StateTopicsOptions) {
    this.#options = options;
  }

  /** The subscription filters of `project`: none unless its file asks for a state topic. */
  filters(project: string): string[] {
    return this.#options.projects.get(project)?.stateTopic
      ? this.#options.topics.state(project)
      : [];
  }

  /** Where a session's hints go. */
  hintTarget(project: string, sessionId: string): ReplyTarget {
    const { topics, projects } = this.#options;
    const hint = projects.get(project)?.hintTopic ?? false;
    return {
      project,
      topic: hint ? topics.hint(project, sessionId) : topics.response(project, sessionId),
      style: hint ? "hint" : "json",
      sessionId,
      requestId: undefined,
      correlationData: undefined,
    };
  }

  /** Handles one message on a state topic. Never throws. */
  handle(project: string, topicSessionId: string | undefined, payload: Uint8Array): void {
    const { stats, projects } = this.#options;
    if (!projects.get(project)?.stateTopic) return;
    const unparsable = unparsableReason(payload, this.#options.limits(project).maxPayloadBytes);
    let state;
    try {
      if (unparsable) throw unparsable;
      state = parseState(payload, SESSION_ID_PATTERN, topicSessionId);
    } catch (error) {
      const sessionId = topicSessionId ?? (error as Partial<StateError>).sessionId;
      const failure = error instanceof ServiceError
        ? error
        : new ServiceError("invalid_request", (error as Error).message);
      if (sessionId === undefined || !SESSION_ID_PATTERN.test(sessionId)) {
        stats.request();
        stats.unaddressable(failure.code);
        // A client's doing: a flood of it is one line a minute, as for requests.
        const left = this.#unanswerable.take(project);
        if (left === undefined) return;
        log.warn("Unanswerable state on {project}: {message}{left}", {
          project,
          message: failure.message,
          left: leftOut(left),
        });
        return;
      }
      this.#refuse(this.hintTarget(project, sessionId), failure);
      return;
    }
    const sessionId = state.sessionId;
    if (topicSessionId !== undefined && topicSessionId !== sessionId) {
      this.#refuse(
        this.hintTarget(project, topicSessionId),
        new ServiceError("forbidden", `the state names session ${sessionId}, not this topic's`),
      );
      return;
    }
    const target = this.hintTarget(project, sessionId);
    if (topicSessionId === undefined && this.#options.sessionTopicsOnly) {
      this.#refuse(
        target,
        new ServiceError(
          "forbidden",
          `state is taken only on the session's own topic, ${
            this.#options.topics.state(project)[0]
          }/${sessionId}`,
        ),
      );
      return;
    }
    if (!this.#options.verify(sessionId)) {
      this.#refuse(
        target,
        new ServiceError("forbidden", `session id ${sessionId} is not signed by this service`),
      );
      return;
    }
    // The request path's checks and clamps, on the turn the state makes.
    const body = JSON.stringify({
      session_id: sessionId,
      message: state.message,
      stream: false,
      ...(state.systemPrompt !== undefined && { system_prompt: state.systemPrompt }),
      ...(Object.keys(state.params).length > 0 && { params: state.params }),
    });
    const outcome = parseRequest(
      new TextEncoder().encode(body),
      project,
      this.#options.topics.responseRoot(project),
      { ...this.#options.limits(project), maxPayloadBytes: Number.MAX_SAFE_INTEGER },
    );
    if (!outcome.ok) {
      this.#refuse(target, outcome.error);
      return;
    }
    this.#offer({ request: outcome.request, target });
  }

  /** Runs the state now, or has it wait (replacing an older waiting one). */
  #offer(state: Waiting): void {
    const key = sessionKey(state.request.project, state.request.sessionId);
    const session = this.#sessions.get(key);
    if (session) {
      if (session.waiting) this.#options.stats.ignored("superseded");
      session.waiting = state;
      return;
    }
    this.#sessions.set(key, { waiting: undefined });
    this.#start(key, state);
  }

  #start(key: string, state: Waiting): void {
    let done = false;
    this.#options.submit(state.request, state.target, () => {
      if (done) return;
      done = true;
      const next = this.#sessions.get(key)?.waiting;
      if (next) {
        this.#sessions.set(key, { waiting: undefined });
        this.#start(key, next);
      } else {
        this.#sessions.delete(key);
      }
    });
  }

  #refuse(target: ReplyTarget, error: ServiceError): void {
    this.#options.stats.request();
    this.#options.stats.error(target.project, error.code);
    this.#options.publish(target, {
      type: "error",
      error: { code: error.code, message: error.message },
    });
  }
}
