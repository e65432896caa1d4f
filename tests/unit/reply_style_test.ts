/** The one rule that tells how a payload's replies are written. */

import { equal } from "node:assert/strict";
import { replyStyle } from "../../lib/protocol/reply_style.ts";

Deno.test("reply style: a named format wins; else the original's form gets text, v1 JSON", () => {
  equal(replyStyle("json", true), "json");
  equal(replyStyle("text", false), "text");
  equal(replyStyle(undefined, true), "text");
  equal(replyStyle(undefined, false), "json");
  // Anything else in `format` is no format (the request's schema refuses it afterwards).
  equal(replyStyle("xml", true), "text");
  equal(replyStyle("hint", false), "json");
  equal(replyStyle(1, false), "json");
});
