/**
 * Topic names of protocol v1. Every topic the program subscribes to or
 * publishes on is built (and every incoming one read) here, so the layout is
 * in one place.
 *
 * @module
 */

/**
 * The one rule for session ids: 1 to 128 characters (code points) that a
 * person can tell apart, which may stand as one topic level on any broker:
 *
 * - not what MQTT forbids in a level (`/ + #`, NUL) or asks senders to avoid
 *   (the other control characters, and the non-characters U+FDD0 to U+FDEF,
 *   U+FFFE and U+FFFF: a strict broker may drop a connection that publishes
 *   them), nor lone surrogates (not encodable as UTF-8);
 * - no white space of any kind (NATS's MQTT listener refuses a space in a
 *   topic, and `my session` and `my  session` look alike), and no invisible
 *   or direction-changing characters (Unicode format characters: zero-width
 *   spaces and joiners, the bidirectional controls such as the right-to-left
 *   override U+202E, the byte order mark; and the Hangul fillers), with which
 *   `bob\u200b` would be another session than `bob` that looks the same;
 * - not `all` (in any case): it addresses every session of a project on the
 *   control topics, and its reply topic carries their acknowledgements.
 *
 * Dots, `@`, `-`, `_` and any script are fine (`ann@example.com`, `Ω-ü-中文`).
 */
export const SESSION_ID_PATTERN =
  /^(?![Aa][Ll][Ll]$)[^/+#\p{Cc}\p{Cf}\p{Cs}\p{Zs}\p{Zl}\p{Zp}\s\u{FDD0}-\u{FDEF}\u{FFFE}\u{FFFF}\u115f\u1160\u3164\uffa0]{1,128}$/u;

/** The rule of {@linkcode SESSION_ID_PATTERN} in words, for error messages. */
export const SESSION_ID_RULE =
  "session id must be 1 to 128 characters without / + #, white space, control, invisible or direction-changing characters, and not 'all' (it is a topic level)";

/** The topics of one deployment, given its prefix and service name. */
export class Topics {
  readonly #prefix: string;
  readonly #service: string;
  readonly #shareGroup: string | undefined;
  readonly #instance: string | undefined;

  /**
   * With `shareGroup`, input is subscribed as an MQTT shared subscription and
   * the status topic is this `instance`'s own.
   */
  constructor(prefix: string, serviceName: string, shareGroup?: string, instance?: string) {
    this.#prefix = prefix;
    this.#service = serviceName;
    this.#shareGroup = shareGroup;
    this.#instance = instance;
  }

  /** The prefix of every topic but the service's own (`--topic-prefix`). */
  get prefix(): string {
    return this.#prefix;
  }

  /** Whether input is subscribed as a shared subscription (several instances). */
  get shared(): boolean {
    return this.#shareGroup !== undefined;
  }

  /** The subscription for a topic filter: `$share/{group}/{filter}` within a share group. */
  subscription(filter: string): string {
    return this.#shareGroup === undefined ? filter : `$share/${this.#shareGroup}/${filter}`;
  }

  /** `{prefix}{project}/user_input`: where clients send requests. */
  input(project: string): string {
    return `${this.#prefix}${project}/user_input`;
  }

  /**
   * `{prefix}{project}/user_input/{sessionId}`: a session's own input topic,
   * which a broker ACL can grant to that session's user alone.
   */
  sessionInput(project: string, sessionId: string): string {
    return `${this.input(project)}/${sessionId}`;
  }

  /** `{prefix}{project}/assistant_response/{sessionId}`: where replies go. */
  response(project: string, sessionId: string): string {
    return `${this.responseRoot(project)}${sessionId}`;
  }

  /** `{prefix}{project}/assistant_response/`: every reply topic of a project starts so. */
  responseRoot(project: string): string {
    return `${this.#prefix}${project}/assistant_response/`;
  }

  /** The filters of one control command: `{prefix}{project}/{command}` and `.../{command}/+`. */
  control(project: string, command: ControlCommand): string[] {
    return [`${this.#prefix}${project}/${command}`, `${this.#prefix}${project}/${command}/+`];
  }

  /**
   * The filter `{prefix}{project}/new_session/+`: a message on
   * `.../new_session/{nonce}` asks for a new signed session id, answered on
   * `.../assistant_response/{nonce}`.
   */
  newSession(project: string): string {
    return `${this.#prefix}${project}/new_session/+`;
  }

  /**
   * The filters `{prefix}{project}/state` and `.../state/+`: where a game
   * publishes its state (projects whose file says `state_topic: true`).
   */
  state(project: string): string[] {
    return [`${this.#prefix}${project}/state`, `${this.#prefix}${project}/state/+`];
  }

  /**
   * The filter `{prefix}{project}/feedback/+`: where a session's client rates
   * its answers (projects with an experiment), `.../feedback/{sessionId}`.
   */
  feedback(project: string): string {
    return `${this.#prefix}${project}/feedback/+`;
  }

  /** `{prefix}{project}/hint/{sessionId}`: where a game reads the hints for its state. */
  hint(project: string, sessionId: string): string {
    return `${this.#prefix}${project}/hint/${sessionId}`;
  }

  /**
   * `{service}/status`, or `{service}/status/{instance}` within a share group:
   * where the retained online/offline message goes. Not under the prefix.
   */
  get status(): string {
    return this.#shareGroup === undefined
      ? `${this.#service}/status`
      : `${this.#service}/status/${this.#instance}`;
  }

  /** `{service}/stats`: where the periodic statistics report goes. Not under the prefix. */
  get stats(): string {
    return `${this.#service}/stats`;
  }

  /**
   * What an incoming topic addresses: a project's input, a game's state, a
   * request for a new session id, a session's feedback, or a control command (each with the
   * session id or nonce of its last level, if any); undefined for a topic
   * that is none of ours. The project is not checked against those served.
   */
  parse(topic: string): TopicTarget | undefined {
    if (!topic.startsWith(this.#prefix)) return undefined;
    const levels = topic.slice(this.#prefix.length).split("/");
    const [project, kind, sessionId] = levels;
    if (kind === "user_input") {
      if (levels.length === 2) return { kind: "input", project, sessionId: undefined };
      if (levels.length === 3) return { kind: "input", project, sessionId };
    }
    if (kind === "state" && (levels.length === 2 || levels.length === 3)) {
      return { kind: "state", project, sessionId };
    }
    if (levels.length === 3 && kind === "feedback") {
      return { kind: "feedback", project, sessionId };
    }
    if (levels.length === 3 && kind === "new_session") {
      return { kind: "new_session", project, nonce: sessionId };
    }
    if ((levels.length === 2 || levels.length === 3) && isControlCommand(kind)) {
      return { kind: "control", project, command: kind, sessionId };
    }
    return undefined;
  }
}

/**
 * Whether `topic` matches the MQTT topic filter `filter` (`+` one level, `#`
 * as the last level that level and all below, the parent included); a
 * shared subscription's `$share/{group}/` is not part of the filter.
 */
export function topicMatches(filter: string, topic: string): boolean {
  const shared = /^\$share\/[^/]+\//.exec(filter);
  const wanted = (shared ? filter.slice(shared[0].length) : filter).split("/");
  const levels = topic.split("/");
  // A wildcard at the first level does not match a `$` topic (MQTT 5, 4.7.2).
  if (topic.startsWith("$") && (wanted[0] === "+" || wanted[0] === "#")) return false;
  for (let i = 0; i < wanted.length; i++) {
    if (wanted[i] === "#") return true;
    if (i >= levels.length) return false;
    if (wanted[i] !== "+" && wanted[i] !== levels[i]) return false;
  }
  return wanted.length === levels.length;
}

/** The control topics the original deployment served. */
export type ControlCommand = "clear_history" | "delete_session" | "template";

/** Every control command, in the order their topics are subscribed. */
export const CONTROL_COMMANDS: readonly ControlCommand[] = [
  "clear_history",
  "delete_session",
  "template",
];

function isControlCommand(value: string): value is ControlCommand {
  return (CONTROL_COMMANDS as readonly string[]).includes(value);
}

/** What an incoming topic addresses. */
export type TopicTarget =
  /** `sessionId`: the session named by a per-session input topic. */
  | { kind: "input"; project: string; sessionId: string | undefined }
  | { kind: "control"; project: string; command: ControlCommand; sessionId: string | undefined }
  | { kind: "new_session"; project: string; nonce: string }
  | { kind: "feedback"; project: string; sessionId: string }
  /** `sessionId`: the session named by a per-session state topic. */
  | { kind: "state"; project: string; sessionId: string | undefined };
