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
 * any case, for every session; a payload that is neither empty nor a JSON
 * object is refused, never read as naming none; a session id in the payload
 * that is not valid is counted, not answered: it has no reply topic). A project-wide command needs
 * the operator token when one is set, and always in the secure mode
 * (`--session-topics-only`). Each command is acknowledged on the session's reply topic
 * in the session's reply style (plain text unless the payload uses `session_id`
 * or asks for `"format":"json"`).
 *
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";
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
import type { Stats } from "../observability/stats.ts";
import {
  type Mqtt5Reply,
  type ReplyTarget,
  replyTarget,
  type ReplyTopics,
} from "./reply_target.ts";

/** What the control topics act on. */
export interface ControlTopicsOptions {
  readonly store: SessionStore;
  readonly directory: SessionDirectory;
  readonly topics: Topics;
  /** The reply topics a command may name (its MQTT 5 Response Topic). */
  readonly replyTopics: ReplyTopics;
  readonly stats: Pick<Stats, "error" | "replyTopicRefused" | "unaddressable">;
  /** The secret a project-wide command must carry (`--operator-token`); undefined: none. */
  readonly operatorToken: string | undefined;
  /** The secure mode (`--session-topics-only`): project-wide commands need the operator token. */
  readonly sessionTopicsOnly: boolean;
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
  /**
   * Told of each session whose history was cleared or that was deleted, so that its engine is
   * chosen again (several engines: what they hold of it is no prefix of its next prompt).
   * @default {undefined}
   */
  readonly forgetRoute?: (project: string, sessionId: string) => Promise<void>;
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
    mqtt5: Mqtt5Reply | undefined,
  ): void {
    const { topics, replyTopics, stats } = this.#options;
    // Too large or nested too deep: refused before it is parsed.
    const unparsable = unparsableReason(payload, this.#options.maxPayloadBytes);
    const body = unparsable ? undefined : parseBody(payload);
    const named = target.sessionId ?? (body && sessionField(body));
    const sessionId = named === undefined || named.toLowerCase() === ALL ? ALL : named;
    if (
      target.sessionId === undefined && sessionId !== ALL && !SESSION_ID_PATTERN.test(sessionId)
    ) {
      // A session id the payload names that could not be one has no reply topic: built from it,
      // the topic could hold a wildcard (`{"session_id":"#"}`), for which the broker drops the
      // service's connection. Counted, not answered.
      stats.unaddressable("invalid_request");
      log.debug("Control command {command} for session id {session}, which is not valid", {
        command: target.command,
        session: JSON.stringify(sessionId),
      });
      return;
    }
    // The original answered its commands in plain text; a v1 payload (`session_id`) in JSON.
    const style = replyStyle(body?.format, !(body && "session_id" in body));
    const who = { project: target.project, sessionId, username: undefined };
    const address = {
      style,
      requestId: body && stringField(body, "requestId", "request_id"),
      replyTopic: undefined,
    };
    const { target: reply, refused } = replyTarget(replyTopics, topics, who, address, mqtt5);
    const refuse = (message: string) => {
      stats.error(target.project, "forbidden");
      this.#options.publish(reply, errorBody(message, "forbidden"));
    };
    if (refused) {
      stats.replyTopicRefused(target.project);
      return refuse(refused.message);
    }
    if (unparsable) {
      const { code, message } = unparsable;
      stats.error(target.project, code);
      this.#options.publish(reply, { type: "error", error: { code, message } });
      return;
    }
    if (!body) {
      // Never read as "every session": a command is carried out only as it was written.
      stats.error(target.project, "invalid_request");
      // Not echoed: it may hold a secret (a mistyped operator token) and the reply is readable.
      this.#options.publish(
        reply,
        errorBody(`the ${target.command} payload must be a JSON object (or empty)`),
      );
      return;
    }
    if (sessionId !== ALL && !SESSION_ID_PATTERN.test(sessionId)) {
      stats.error(target.project, "invalid_request");
      this.#options.publish(
        reply,
        errorBody(`session id ${JSON.stringify(sessionId)} is not valid`),
      );
      return;
    }
    if (sessionId === ALL) {
      const why = this.#operatorRefusal(body);
      if (why) return refuse(why);
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

  /**
   * Why a project-wide command may not be carried out, if it may not: with an
   * operator token, a payload must carry it; in the secure mode
   * (`--session-topics-only`) a token is needed at all, so that more than
   * the broker's ACL stands between a client and every session.
   */
  #operatorRefusal(body: Record<string, unknown>): string | undefined {
    const { operatorToken, sessionTopicsOnly } = this.#options;
    if (operatorToken === undefined) {
      return sessionTopicsOnly
        ? "commands for every session of a project need an operator token (--operator-token), and none is set"
        : undefined;
    }
    const given = body.operator_token;
    if (typeof given === "string" && sameSecret(given, operatorToken)) return undefined;
    return "commands for every session of a project need the operator token ('operator_token')";
  }

  async #run(
    project: string,
    command: ControlCommand,
    sessionId: string,
    body: Record<string, unknown>,
  ): Promise<string> {
    const { store, directory, forgetRoute } = this.#options;
    const sessions = sessionId === ALL ? directory.sessionsOf(project) : [sessionId];
    const scope = sessionId === ALL
      ? `all ${sessions.length} sessions of ${project}`
      : `session ${sessionId}`;
    switch (command) {
      case "clear_history":
        for (const id of sessions) {
          await store.clear(project, id);
          await forgetRoute?.(project, id);
        }
        return `History cleared for ${scope}.`;
      case "delete_session":
        for (const id of sessions) {
          await store.clear(project, id, true);
          directory.forget(project, id);
          await forgetRoute?.(project, id);
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
          for (const id of sessions) {
            await store.clear(project, id);
            await forgetRoute?.(project, id);
          }
        }
        return `System prompt ${prompt === undefined ? "restored" : "set"} for ${
          sessionId === ALL ? `project ${project}` : scope
        }${reset ? "; history cleared" : ""}.`;
      }
    }
  }
}

/** The payload's JSON object (an empty payload: no fields); undefined for anything else. */
function parseBody(payload: Uint8Array): Record<string, unknown> | undefined {
  const text = DECODER.decode(payload);
  if (text.trim() === "") return {};
  try {
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

/** Whether two secrets are equal, in a time that does not tell how much of them is. */
function sameSecret(given: string, expected: string): boolean {
  const a = createHash("sha256").update(given).digest();
  const b = createHash("sha256").update(expected).digest();
  return timingSafeEqual(a, b);
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

function errorBody(
  message: string,
  code: "invalid_request" | "forbidden" = "invalid_request",
): ReplyBody {
  return { type: "error", error: { code, message } };
}
