/**
 * The projects' system prompts as served now (replaceable at run time through
 * the `template` control topic) and the experiments' variants' prompts, with
 * their token counts: counted once, when set, by the engine or else estimated
 * here, so that the workers need not load the tokenizer's tables for them (and
 * the router knows the shared prefix of a turn).
 *
 * @module
 */

import { estimateMessageTokens, MESSAGE_OVERHEAD_TOKENS } from "../tokens.ts";

/** The served projects' prompts and their token counts. */
export class Prompts {
  readonly #prompts: Map<string, string>;
  readonly #tokens = new Map<string, number>();
  readonly #count: (text: string) => Promise<number | undefined>;
  /** Prompts counted beside the projects' (the variants'), never replaced. */
  readonly #others: readonly string[];
  /** Settles once the start-up prompts are counted (or have failed to be). */
  readonly counted: Promise<unknown>;

  /**
   * @param prompts Each served project's prompt.
   * @param count The engine's own count of a text's tokens, where it offers one.
   * @param others Other prompts turns are given (the experiments' variants'), counted the same.
   */
  constructor(
    prompts: ReadonlyMap<string, string>,
    count: (text: string) => Promise<number | undefined>,
    others: readonly string[] = [],
  ) {
    this.#prompts = new Map(prompts);
    this.#others = others;
    this.#count = count;
    this.counted = Promise.all(
      [...this.#prompts.values(), ...others].map((p) => this.#countPrompt(p)),
    );
  }

  /** Whether `project` is served here. */
  has(project: string): boolean {
    return this.#prompts.has(project);
  }

  /** The served projects. */
  projects(): IterableIterator<string> {
    return this.#prompts.keys();
  }

  /** A served project's prompt. */
  get(project: string): string {
    return this.#prompts.get(project)!;
  }

  /** Replaces a project's prompt (the `template` control topic), and counts it. */
  set(project: string, prompt: string): void {
    this.#prompts.set(project, prompt);
    this.#countPrompt(prompt);
  }

  /** The prompt's tokens, once counted; until then the workers count them. */
  tokens(prompt: string): number | undefined {
    return this.#tokens.get(prompt);
  }

  async #countPrompt(prompt: string): Promise<void> {
    if (this.#tokens.has(prompt)) return;
    let tokens: number;
    try {
      const counted = await this.#count(prompt);
      tokens = counted === undefined
        ? await estimateMessageTokens(prompt)
        : counted + MESSAGE_OVERHEAD_TOKENS;
    } catch {
      return;
    }
    // Only the prompts in use are kept: one replaced through `template` is forgotten.
    const inUse = new Set([...this.#prompts.values(), ...this.#others]);
    for (const counted of this.#tokens.keys()) {
      if (!inUse.has(counted)) this.#tokens.delete(counted);
    }
    if (inUse.has(prompt)) this.#tokens.set(prompt, tokens);
  }
}
