/** The scan of a payload's shape before it is parsed: nesting and arrays and objects counted. */

import { deepEqual } from "node:assert/strict";
import { jsonShape } from "../../lib/protocol/json_shape.ts";

const shape = (text: string, maxDepth?: number) =>
  jsonShape(new TextEncoder().encode(text), maxDepth);

Deno.test("json shape: nesting and arrays and objects, brackets in strings not counted", () => {
  deepEqual(shape('{"a":[1,{"b":[]}],"c":{}}'), { depth: 4, containers: 5 });
  deepEqual(shape('"just a string"'), { depth: 0, containers: 0 });
  deepEqual(shape('{"a":"[[[{{{","b":"\\\\"}'), { depth: 1, containers: 1 });
  // An escaped quote does not end the string; an escaped backslash before a quote does.
  deepEqual(shape('{"a":"x\\"[[[","b":["\\\\\\\\"]}'), { depth: 2, containers: 2 });
  deepEqual(shape('["unterminated [[['), { depth: 1, containers: 1 });
});

Deno.test("json shape: the scan stops once the nesting passes the limit", () => {
  deepEqual(shape("[".repeat(1_000_000), 32), { depth: 33, containers: 33 });
  deepEqual(shape("[[[]]]", 3), { depth: 3, containers: 3 });
});
