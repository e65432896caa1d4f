/**
 * Players of an A/B experiment for the end-to-end tests: a project file with
 * two variants (`a` the served model, `b` a LoRA adapter with a prompt of its
 * own), and sessions that play turns and rate each answer as the simulated
 * engine graded it (its signature says `outcome=good` or `bad`), so that the
 * truth the figures must show is known.
 *
 * @module
 */

import assert, { equal } from "node:assert/strict";
import { join } from "node:path";
import type { TestClient } from "./_helpers.ts";

/** The adapter variant `b` asks for. */
export const AB_ADAPTER = "maze-lora-v2";

/**
 * Writes `maze.md` (an experiment `maze-ab`: `a` and `b` at equal weights,
 * `b` on {@linkcode AB_ADAPTER} with the prompt `bPrompt`) and `general.md`
 * into `dir`; `frontMatter`: more lines of the project's front matter.
 */
export async function writeExperimentPrompts(
  dir: string,
  bPrompt: string,
  frontMatter: readonly string[] = [],
): Promise<void> {
  await Deno.writeTextFile(
    join(dir, "maze.md"),
    [
      "---",
      "experiment: maze-ab",
      ...frontMatter,
      "variants:",
      "  - name: a",
      "    weight: 50",
      "  - name: b",
      "    weight: 50",
      `    model: ${AB_ADAPTER}`,
      "    prompt: maze_b.txt",
      "---",
      "# Maze guide",
      "Guide the player through the maze.",
      "",
    ].join("\n"),
  );
  await Deno.writeTextFile(join(dir, "maze_b.txt"), bPrompt);
  await Deno.writeTextFile(join(dir, "general.md"), "You are a helpful assistant.\n");
}

/** What the players saw, per variant as the replies named it. */
export interface Played {
  /** Each session's variant. */
  readonly variantOf: Map<string, string>;
  /** Turns answered `done`, per variant. */
  readonly answered: Record<string, number>;
  /** Turns answered with an error, per variant (as the session's variant). */
  readonly errors: Record<string, number>;
  /** Each session's scores, in order. */
  readonly scores: Map<string, number[]>;
  /** Answers the engine graded bad, per variant. */
  readonly bad: Record<string, number>;
}

/**
 * Plays `sessions` sessions of `turns` turns each on `maze/user_input`, all
 * sessions at once, each session's turns one after the other; rates every
 * answer 1 (good) or 0 (bad) on the feedback topic when `feedback`, and
 * waits for each rating's acknowledgement.
 */
export async function playSessions(
  client: TestClient,
  options: { sessions: number; turns: number; prefix: string; feedback: boolean },
): Promise<Played> {
  const played: Played = {
    variantOf: new Map(),
    answered: {},
    errors: {},
    scores: new Map(),
    bad: {},
  };
  const play = async (sessionId: string) => {
    for (let t = 0; t < options.turns; t++) {
      const requestId = `${sessionId}-r${t}`;
      await client.send("maze/user_input", {
        session_id: sessionId,
        request_id: requestId,
        // The session in the text: the engine draws its grade from the conversation.
        message: `move ${t} of ${sessionId}`,
      });
      const reply = (await client.final(sessionId, requestId, 60_000)).json!;
      if (reply.type === "error") {
        const variant = played.variantOf.get(sessionId) ?? (reply.variant as string) ?? "?";
        played.errors[variant] = (played.errors[variant] ?? 0) + 1;
        continue;
      }
      const variant = reply.variant as string;
      assert(typeof variant === "string", `a reply without its variant: ${JSON.stringify(reply)}`);
      played.variantOf.set(sessionId, variant);
      played.answered[variant] = (played.answered[variant] ?? 0) + 1;
      const outcome = /outcome=(good|bad)>/.exec(reply.response as string)?.[1];
      assert(outcome, `no graded outcome in ${reply.response}`);
      if (outcome === "bad") played.bad[variant] = (played.bad[variant] ?? 0) + 1;
      if (!options.feedback) continue;
      const score = outcome === "good" ? 1 : 0;
      played.scores.set(sessionId, [...(played.scores.get(sessionId) ?? []), score]);
      await client.send(`maze/feedback/${sessionId}`, { request_id: requestId, score });
      const ack = await client.next((m) =>
        m.json?.type === "feedback" && m.json.request_id === requestId
      );
      equal(ack.json!.accepted, true, ack.text);
    }
  };
  await Promise.all(
    Array.from({ length: options.sessions }, (_, i) => play(`${options.prefix}${i}`)),
  );
  return played;
}

/** The mean over sessions of each session's mean score, for the sessions of `variant`. */
export function meanSessionScore(played: Played, variant: string): number {
  const means = [...played.scores].filter(([session]) => played.variantOf.get(session) === variant)
    .map(([, scores]) => scores.reduce((a, b) => a + b, 0) / scores.length);
  return means.reduce((a, b) => a + b, 0) / means.length;
}
