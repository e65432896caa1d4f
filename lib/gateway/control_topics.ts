/**
 * The original deployment's control topics, kept so its tools keep working:
 *
 * - `{project}/clear_history[/{sessionId}]`: forget a session's history (`all`: every session of the project);
 * - `{project}/delete_session[/{sessionId}]`: delete sessions the same way;
 * - `{project}/template[/{sessionId}]` with `{"template": "...", "reset": true}`:
 *   replace the system prompt of one session, or of the whole project until restart.
 *   As the original, it also takes `system_prompt` or `prompt_template`, each a
 *   string or an object with `content`, and `reset` is true unless it says false.
 *
 * The session id comes from the topic's last level or the payload (`sessionId`,
 * `session_id` or `target`; a number stands for its decimal string; `all`, in
 * any case, for every session). Each command is acknowledged on the session's reply topic
 * in the session's reply style (plain text unless the payload uses `session_id`
 * or asks for `"format":"json"`).
 *
 * @module
 */

import { logger } from "../log.ts";
import {
  CONTROL_COMMANDS,
  type ControlCommand,
  type ReplyBody,
  replyStyle,
  SESSION_ID_PATTERN,
  type Topics,
  unparsableReason,
} from "../protocol/mod.ts";
import type { SessionDirectory } from "../sessions/session_directory.ts";
import type { SessionStore } from "../sessions/session_store.ts";
import type { ReplyTarget } from "./reply_target.ts";

/** What the control topics act on. */
export interface ControlTopicsOptions {
  readonly store: SessionStore;
  readonly directory: SessionDirectory;
  readonly topics: Topics;
  /** A larger payload (or one nested too deep) is refused before it is parsed. */
  readonly maxPayloadBytes: number;
  readonly publish: (target: ReplyTarget, body: ReplyBody) => void;
  readonly setPrompt: (project: string, prompt: string) => void;
  /** The project's prompt from its file, restored by an empty template. */
  readonly defaultPrompt: (project: string) => string;
  /**
   * Runs a command for one session in that session's order: after its turns
   * sent before, before those sent after (a history cleared under a running
   * turn would come back with that turn's save).
   */
  readonly inOrder: (target: ReplyTarget, run: () => Promise<void>) => void;
  /** Told of each command carried out for one session (a game's hint topic acknowledges some). */
  readonly acknowledged?: (project: string, command: ControlCommand, sessionId: string) => void;
}

/** The word that addresses every session of a project. */
const ALL = "all";
const DECODER = new TextDecoder();
const MAX_TEMPLATE_CHARS = 32_768;

const log = logger("control");

/** Handles messages on the control topics. */
export class ControlTopics {
  readonly #options: ControlTopicsOptions;

  constructor(options: ControlTopicsOptions) {
    this.#options = options;
  }

  /** The subscription filters of one project. */
  filters(project: string): string[] {
    return CONTROL_COMMANDS.flatMap((command) => this.#options.topics.control(project, command));
  }

  /** Carries out one control message. Never throws. */
  handle(
    target: { project: string; command: ControlCommand; sessionId: string | undefined },
    payload: Uint8Array,
    mqtt5: { topic: string; correlationData: Uint8Array | undefined } | undefined,
  ): void {
    const unparsable = unparsableReason(payload, this.#options.maxPayloadBytes);
    const body = unparsable ? {} : parseBody(payload);
    const named = target.sessionId ?? sessionField(body);
    const sessionId = named === undefined || named.toLowerCase() === ALL ? ALL : named;
    // The original answered its commands in plain text; a v1 payload (`session_id`) in JSON.
    const style = replyStyle(body.format, !("session_id" in body));
    const reply: ReplyTarget = {
      project: target.project,
      topic: mqtt5?.topic ?? this.#options.topics.response(target.project, sessionId),
      style,
      sessionId,
      requestId: stringField(body, "requestId", "request_id"),
      correlationData: mqtt5?.correlationData,
    };
    // Refused rather than taken as an empty body: that would clear or reset.
    if (unparsable) {
      const { code, message } = unparsable;
      this.#options.publish(reply, { type: "error", error: { code, message } });
      return;
    }
    if (sessionId !== ALL && !SESSION_ID_PATTERN.test(sessionId)) {
      this.#options.publish(
        reply,
        errorBody(`session id ${JSON.stringify(sessionId)} is not valid`),
      );
      return;
    }
    const run = () =>
      this.#run(target.project, target.command, sessionId, body)
        .then((done) => {
          this.#options.publish(reply, doneBody(done));
          if (sessionId !== ALL) {
            this.#options.acknowledged?.(target.project, target.command, sessionId);
          }
        })
        .catch((error) => {
          log.warn("Control command {command} failed: {message}", {
            command: target.command,
            message: (error as Error).message,
          });
          this.#options.publish(reply, errorBody((error as Error).message));
        });
    // Every session of a project at once is not ordered with any one session's turns.
    if (sessionId === ALL) run();
    else this.#options.inOrder(reply, run);
  }

  async #run(
    project: string,
    command: ControlCommand,
    sessionId: string,
    body: Record<string, unknown>,
  ): Promise<string> {
    const { store, directory } = this.#options;
    const sessions = sessionId === ALL ? directory.sessionsOf(project) : [sessionId];
    const scope = sessionId === ALL
      ? `all ${sessions.length} sessions of ${project}`
      : `session ${sessionId}`;
    switch (command) {
      case "clear_history":
        for (const id of sessions) await store.clear(project, id);
        return `History cleared for ${scope}.`;
      case "delete_session":
        for (const id of sessions) {
          await store.clear(project, id, true);
          directory.forget(project, id);
        }
        return `Deleted ${scope}.`;
      case "template": {
        const template = templateField(body);
        if (typeof template !== "string" || template.length > MAX_TEMPLATE_CHARS) {
          throw new Error(
            `'template' must be a string, or an object with a string 'content', of at most ${MAX_TEMPLATE_CHARS} characters`,
          );
        }
        const prompt = template.trim() === "" ? undefined : template;
        // The original cleared the history with a new template unless told not to.
        const reset = body.reset !== false;
        if (sessionId === ALL) {
          this.#options.setPrompt(project, prompt ?? this.#options.defaultPrompt(project));
        } else {
          await store.setSystemPrompt(project, sessionId, prompt);
        }
        if (reset) {
          for (const id of sessions) await store.clear(project, id);
        }
        return `System prompt ${prompt === undefined ? "restored" : "set"} for ${
          sessionId === ALL ? `project ${project}` : scope
        }${reset ? "; history cleared" : ""}.`;
      }
    }
  }
}

function parseBody(payload: Uint8Array): Record<string, unknown> {
  try {
    const value = JSON.parse(DECODER.decode(payload));
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : {};
  } catch {
    return {};
  }
}

/** The session a payload names (`sessionId`, `session_id` or `target`), as a string. */
function sessionField(body: Record<string, unknown>): string | undefined {
  for (const name of ["sessionId", "session_id", "target"]) {
    const value = body[name];
    if (typeof value === "number" && Number.isFinite(value)) return String(value);
    if (typeof value === "string" && value.trim() !== "") return value.trim();
  }
  return undefined;
}

/**
 * The template of a payload: `template`, `system_prompt` or `prompt_template`,
 * each a string or an object holding it as `content` (or `template`).
 */
function templateField(body: Record<string, unknown>): unknown {
  for (const name of ["template", "system_prompt", "prompt_template"]) {
    let value = body[name];
    if (typeof value === "object" && value !== null && !Array.isArray(value)) {
      const inner = value as Record<string, unknown>;
      value = inner.content ?? inner.template;
    }
    if (value !== undefined && value !== null) return value;
  }
  return undefined;
}

function stringField(body: Record<string, unknown>, ...names: string[]): string | undefined {
  for (const name of names) if (typeof body[name] === "string") return body[name] as string;
  return undefined;
}

function doneBody(text: string): ReplyBody {
  return {
    type: "done",
    response: text,
    finish_reason: "control",
    usage: null,
    timing: { queue_ms: 0, ttft_ms: null, total_ms: 0 },
  };
}

function errorBody(message: string): ReplyBody {
  return { type: "error", error: { code: "invalid_request", message } };
}
