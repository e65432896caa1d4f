/**
 * The original deployment's request form, read as protocol v1 fields: its
 * camelCase names, its sampling parameters at the top level, its prompt
 * template, session ids sent as numbers or with spaces around them, and
 * `null` for a field not given. A v1 payload passes through unchanged but
 * for its nulls. Nothing is validated here: the v1 schema does that next.
 *
 * @module
 */

/** A payload's fields under their v1 names, and whether it came in the original's form. */
export interface V1Fields {
  readonly fields: Record<string, unknown>;
  /** The payload is in the original's camelCase form (its clients read plain-text replies). */
  readonly camelCase: boolean;
}

/** camelCase fields of the original deployment and the v1 fields they stand for. */
const ALIASES: Readonly<Record<string, string>> = {
  sessionId: "session_id",
  requestId: "request_id",
  maxTokens: "max_tokens",
  topP: "top_p",
  topK: "top_k",
  systemPrompt: "system_prompt",
  replyTopic: "reply_topic",
  clientId: "client_id",
};

/** Sampling fields the original took at the top level of the request. */
const TOP_LEVEL_PARAMS = ["temperature", "top_p", "max_tokens"] as const;

/**
 * The fields of a parsed JSON object under their v1 names. `session_id` is
 * left undefined when the payload names none: the caller knows the default.
 */
export function v1Fields(raw: object): V1Fields {
  // A field sent as null is a field not given, as the original took it: a relay sends every
  // option its user left empty as null.
  const given = withoutNulls(raw);
  const fields: Record<string, unknown> = {};
  // The original's clients name the session `sessionId`, or leave it out and use other
  // camelCase fields.
  const camelCase = "sessionId" in raw ||
    (!("session_id" in raw) && Object.keys(raw).some((key) => key in ALIASES));
  for (const [key, value] of Object.entries(given)) {
    const v1 = ALIASES[key];
    if (v1 !== undefined) {
      if (!(v1 in given)) fields[v1] = value;
    } else {
      fields[key] = value;
    }
  }
  // The original took a prompt template (a string, or an object with `content`) as the
  // request's system prompt.
  const template = fields.prompt_template;
  delete fields.prompt_template;
  if (fields.system_prompt === undefined && template !== undefined) {
    fields.system_prompt = isObject(template) ? template.content : template;
  }
  fields.session_id = normalizeSessionId(fields.session_id);
  // The original took sampling parameters at the top level; v1 takes them in `params`.
  const topLevel: Record<string, unknown> = {};
  for (const name of TOP_LEVEL_PARAMS) {
    if (name in fields) {
      topLevel[name] = fields[name];
      delete fields[name];
    }
  }
  if (Object.keys(topLevel).length > 0) {
    const params = fields.params;
    fields.params = typeof params === "object" && params !== null
      ? { ...topLevel, ...params }
      : topLevel;
  }
  if (isObject(fields.params)) fields.params = withoutNulls(fields.params);
  return { fields, camelCase };
}

/** `default-` and 8 hexadecimal digits: the original's id for a request that names none. */
export function generatedSessionId(): string {
  return `default-${crypto.randomUUID().slice(0, 8)}`;
}

/**
 * A session id as the original read it: a number stands for its decimal
 * string, spaces around an id are not part of it, and an empty one is none.
 * Anything else is left for validation to refuse.
 */
function normalizeSessionId(value: unknown): unknown {
  if (typeof value === "number" && Number.isFinite(value)) return String(value);
  if (typeof value !== "string") return value;
  const trimmed = value.trim();
  return trimmed === "" ? undefined : trimmed;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The fields of `object` whose value is not null. */
function withoutNulls(object: object): Record<string, unknown> {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== null));
}
