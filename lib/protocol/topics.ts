/**
 * Topic names of protocol v1. Every topic the program subscribes to or
 * publishes on is built (and every incoming one read) here, so the layout is
 * in one place.
 *
 * @module
 */

/**
 * A session id as it may stand in a topic level: 1 to 128 characters (code
 * points) of UTF-8, without what MQTT forbids in a level (`/ + #`, NUL) or
 * asks senders to avoid (the other C0 and C1 control characters, DEL and the
 * non-characters U+FDD0 to U+FDEF, U+FFFE and U+FFFF: a strict broker may
 * drop a connection that publishes them), and without lone surrogates (not
 * encodable as UTF-8).
 * Spaces, `@`, dots and any script are fine (`my session`, `ann@example.com`).
 */
export const SESSION_ID_PATTERN =
  // Control characters are what is being refused here.
  // deno-lint-ignore no-control-regex
  /^[^/+#\u0000-\u001f\u007f-\u009f\ufdd0-\ufdef\ufffe\uffff\ud800-\udfff]{1,128}$/u;

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
   * request for a new session id, or a control command (each with the
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
 * Whether a topic `filter` (MQTT wildcards `+` and `#`; a shared
 * subscription's `$share/{group}/` prefix is read past) matches `topic`.
 */
export function filterMatches(filter: string, topic: string): boolean {
  const shared = /^\$share\/[^/]+\//.exec(filter);
  const levels = (shared ? filter.slice(shared[0].length) : filter).split("/");
  const names = topic.split("/");
  for (let i = 0; i < levels.length; i++) {
    if (levels[i] === "#") return true;
    if (i >= names.length) return false;
    if (levels[i] !== "+" && levels[i] !== names[i]) return false;
  }
  return levels.length === names.length;
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
  /** `sessionId`: the session named by a per-session state topic. */
  | { kind: "state"; project: string; sessionId: string | undefined };
