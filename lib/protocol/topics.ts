/**
 * Topic names of protocol v1. Every topic the program reads or writes is built
 * here, so the layout is in one place.
 *
 * @module
 */

/**
 * A session id as it may stand in a topic level: 1 to 128 characters (code
 * points) of UTF-8, without what MQTT forbids in a level (`/ + #`, NUL) or
 * asks senders to avoid (the other C0 and C1 control characters, DEL and
 * Unicode non-characters: a strict broker may drop a connection that
 * publishes them), and without lone surrogates (not encodable as UTF-8).
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

  /** The subscription for a topic filter: `$share/{group}/{filter}` within a share group. */
  /** Whether input is subscribed as a shared subscription (several instances). */
  get shared(): boolean {
    return this.#shareGroup !== undefined;
  }

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

  /** `{prefix}{project}/{command}` and `.../{command}/+`, for the control topics. */
  control(project: string, command: ControlCommand): string[] {
    return [`${this.#prefix}${project}/${command}`, `${this.#prefix}${project}/${command}/+`];
  }

  /**
   * `{prefix}{project}/new_session/{nonce}`: asks for a new signed session id,
   * answered on `.../assistant_response/{nonce}`.
   */
  newSession(project: string): string {
    return `${this.#prefix}${project}/new_session/+`;
  }

  /**
   * `{prefix}{project}/state` and `.../state/+`: where a game publishes its
   * state (projects whose file says `state_topic: true`).
   */
  state(project: string): string[] {
    return [`${this.#prefix}${project}/state`, `${this.#prefix}${project}/state/+`];
  }

  /** `{prefix}{project}/hint/{sessionId}`: where a game reads the hints for its state. */
  hint(project: string, sessionId: string): string {
    return `${this.#prefix}${project}/hint/${sessionId}`;
  }

  /** The retained online/offline message. */
  get status(): string {
    return this.#shareGroup === undefined
      ? `${this.#service}/status`
      : `${this.#service}/status/${this.#instance}`;
  }

  /** The periodic statistics message. */
  get stats(): string {
    return `${this.#service}/stats`;
  }

  /**
   * What an incoming topic addresses: a project's input, a control command
   * (with the session id of its last level, if any), or nothing of ours.
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

/** The control topics the original deployment served. */
export type ControlCommand = "clear_history" | "delete_session" | "template";

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
