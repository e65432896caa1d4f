/** Token estimates and bounds (lib/tokens.ts). */

import assert from "node:assert/strict";
import { messageTokenBound } from "../../lib/tokens.ts";

Deno.test("token bound: never below the UTF-8 size, whatever the script", () => {
  for (const text of ["hello", "héllo wörld", "迷宫的出口在哪里", "🙂🙃 emoji", "\ud800 lone"]) {
    const bytes = new TextEncoder().encode(text).length;
    assert(messageTokenBound(text) >= bytes, text);
  }
});
