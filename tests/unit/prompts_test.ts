/**
 * Unit tests of the served prompts' token counts (lib/gateway/prompts.ts):
 * the projects' prompts and the experiments' variants' are counted once, by
 * the engine where it counts, and a prompt replaced through `template` is
 * forgotten while the others are kept.
 */

import { equal } from "node:assert/strict";
import { Prompts } from "../../lib/gateway/prompts.ts";

Deno.test("prompts: the projects' and the variants' prompts are counted; a replaced one forgotten", async () => {
  const count = (text: string) => Promise.resolve(text.length);
  const prompts = new Prompts(new Map([["maze", "# Maze"]]), count, ["# Maze, variant b"]);
  await prompts.counted;
  const maze = prompts.tokens("# Maze")!;
  const b = prompts.tokens("# Maze, variant b")!;
  equal(b - maze, "# Maze, variant b".length - "# Maze".length);
  prompts.set("maze", "# Maze again");
  await prompts.counted;
  await new Promise((resolve) => setTimeout(resolve, 0));
  equal(prompts.tokens("# Maze"), undefined);
  equal(prompts.tokens("# Maze again"), "# Maze again".length + maze - "# Maze".length);
  equal(prompts.tokens("# Maze, variant b"), b, "the variant's prompt stays counted");
});
