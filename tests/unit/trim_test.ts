/**
 * Unit tests of prefix-cache-friendly trimming (lib/sessions/trim.ts): the
 * edges of the budget, the low-water mark, turns that do not start with a
 * user message, and the budget left by the context.
 */

import { equal } from "node:assert/strict";
import {
  historyBudget,
  LOW_WATER_RATIO,
  messagesToDrop,
  type Sized,
} from "../../lib/sessions/trim.ts";

const user = (tokens: number): Sized => ({ role: "user", tokens });
const answer = (tokens: number): Sized => ({ role: "assistant", tokens });

Deno.test("trim: exactly the budget fits; one token more trims down to the low-water mark", () => {
  const history = [user(20), answer(20), user(20), answer(20), user(10), answer(10)];
  equal(messagesToDrop(history, 0, 100), 0);
  equal(messagesToDrop(history, 1, 100), 4); // 101 → 61 → 21, under 60% of 100
  equal(LOW_WATER_RATIO, 0.6);
  // An explicit low-water mark: one turn suffices to reach 70.
  equal(messagesToDrop(history, 1, 100, 70), 2);
});

Deno.test("trim: leading answers go with the turn they end; all goes when nothing else fits", () => {
  // A history that starts with an answer (its question trimmed earlier): dropped alone first.
  const history = [answer(30), user(10), answer(10), answer(10), user(5)];
  equal(messagesToDrop(history, 0, 60), 1);
  // The incoming message alone is over the low-water mark: the whole history goes.
  equal(messagesToDrop(history, 80, 100), history.length);
  equal(messagesToDrop([], 500, 100), 0);
});

Deno.test("trim: the budget is the cap, or what the context leaves, never below zero", () => {
  const budget = (maxHistoryTokens: number, maxModelLen: number, systemTokens = 0) =>
    historyBudget({ maxHistoryTokens, maxModelLen, maxTokens: 100, systemTokens });
  equal(budget(1_000, 100_000), 1_000);
  // Margin: 2% of the context, at least 16 tokens.
  equal(budget(100_000, 10_000), 10_000 - 100 - 200);
  equal(budget(100_000, 500, 50), 500 - 100 - 50 - 16);
  equal(budget(100_000, 100), 0);
});

Deno.test("trim: nothing while under budget, whole turns down to the low-water mark beyond it", () => {
  const turn = (
    u: number,
    a: number,
  ) => [{ role: "user" as const, tokens: u }, { role: "assistant" as const, tokens: a }];
  const history = [...turn(50, 50), ...turn(50, 50), ...turn(50, 50), ...turn(50, 50)];
  equal(messagesToDrop(history, 100, 500), 0);
  // 400 + 150 > 500: drop turns until history and message fit 300 (60%): three turns.
  equal(messagesToDrop(history, 150, 500), 6);
  // Never splits a turn: a user message with two answers goes as one.
  const odd = [{ role: "user" as const, tokens: 10 }, { role: "assistant" as const, tokens: 10 }, {
    role: "assistant" as const,
    tokens: 10,
  }, ...turn(10, 10)];
  equal(messagesToDrop(odd, 100, 100), 5);
  equal(
    historyBudget({ maxHistoryTokens: 3000, maxModelLen: 4096, maxTokens: 512, systemTokens: 200 }),
    3000,
  );
  equal(
    historyBudget({ maxHistoryTokens: 3000, maxModelLen: 2048, maxTokens: 512, systemTokens: 200 }),
    2048 - 512 - 200 - 41,
  );
});
