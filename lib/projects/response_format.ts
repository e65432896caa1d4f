/**
 * A project's `response_format`: the JSON Schema its answers must follow,
 * sent to the engine as OpenAI's structured-output request.
 *
 * @module
 */

import { deepFreeze, type Fail, isObject, show, TOOL_NAME } from "./_util.ts";

/** A JSON Schema (or any JSON object), as read from the front matter. */
export type JsonObject = { readonly [key: string]: unknown };

/** OpenAI's structured-output request: `response_format: {type: "json_schema", ...}`. */
export interface ResponseFormat {
  readonly type: "json_schema";
  readonly json_schema: {
    readonly name: string;
    readonly schema: JsonObject;
    readonly strict?: boolean;
  };
}

/**
 * Reads the `response_format` of `project`'s front matter. With a hint
 * topic, the schema must declare the string `hint` every hint carries.
 */
export function parseResponseFormat(
  project: string,
  value: unknown,
  hintTopic: boolean,
  fail: Fail,
): ResponseFormat {
  const key = "response_format";
  if (!isObject(value)) return fail(key, "must be a mapping with a 'schema' (and a 'name')");
  for (const inner of Object.keys(value)) {
    if (!["name", "schema", "strict"].includes(inner)) {
      fail(`${key}.${inner}`, "unknown key (known: name, schema, strict)");
    }
  }
  const name = value.name ?? `${project}_answer`;
  if (typeof name !== "string" || !TOOL_NAME.test(name)) {
    fail(`${key}.name`, `must be letters, digits, _ or - (at most 64), not ${show(name)}`);
  }
  const schema = value.schema;
  if (!isObject(schema)) return fail(`${key}.schema`, "must be a JSON Schema (a mapping)");
  if (schema.type !== "object") {
    fail(`${key}.schema`, `must describe an object ('type: object'), not ${show(schema.type)}`);
  }
  if (schema.properties !== undefined && !isObject(schema.properties)) {
    fail(`${key}.schema.properties`, "must be a mapping of property names to schemas");
  }
  if (hintTopic) {
    const hint = isObject(schema.properties) ? schema.properties.hint : undefined;
    if (!isObject(hint) || hint.type !== "string") {
      fail(
        `${key}.schema`,
        "must declare a string 'hint' property: answers on the hint topic always carry one",
      );
    }
  }
  const strict = value.strict;
  if (strict !== undefined && typeof strict !== "boolean") {
    fail(`${key}.strict`, `must be true or false, not ${show(strict)}`);
  }
  return Object.freeze({
    type: "json_schema",
    json_schema: Object.freeze({
      name: name as string,
      schema: deepFreeze(schema),
      ...(strict !== undefined && { strict: strict as boolean }),
    }),
  });
}
