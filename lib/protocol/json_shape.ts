/**
 * A scan of a JSON text's bytes before it is parsed: how deep its arrays and
 * objects nest and how many there are. `JSON.parse` builds every one of them
 * on the heap (a 5.8 MB payload of nested `[` is three million arrays, about
 * 100 times its size), so a payload is judged by its shape before it is parsed.
 * The scan allocates nothing and reads each byte once.
 *
 * @module
 */

/** Nesting of arrays and objects a payload may have: a request needs 3, a game state 3. */
export const MAX_JSON_DEPTH = 32;

/** What {@linkcode jsonShape} finds. */
export interface JsonShape {
  /** The deepest nesting of arrays and objects, or `maxDepth + 1` where the scan stopped. */
  readonly depth: number;
  /** Arrays and objects (those before the scan stopped). */
  readonly containers: number;
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN_ARRAY = 0x5b;
const CLOSE_ARRAY = 0x5d;
const OPEN_OBJECT = 0x7b;
const CLOSE_OBJECT = 0x7d;

/**
 * The nesting and the number of arrays and objects of a JSON text, brackets
 * inside strings not counted; it stops once the nesting passes `maxDepth`.
 * Not a validation: a text that is not JSON is left for the parser to refuse.
 */
export function jsonShape(bytes: Uint8Array, maxDepth = MAX_JSON_DEPTH): JsonShape {
  let depth = 0;
  let deepest = 0;
  let containers = 0;
  for (let i = 0; i < bytes.length; i++) {
    const byte = bytes[i];
    if (byte === QUOTE) {
      i = stringEnd(bytes, i);
    } else if (byte === OPEN_ARRAY || byte === OPEN_OBJECT) {
      containers++;
      if (++depth > deepest) {
        deepest = depth;
        if (deepest > maxDepth) break;
      }
    } else if (byte === CLOSE_ARRAY || byte === CLOSE_OBJECT) {
      depth--;
    }
  }
  return { depth: deepest, containers };
}

/**
 * The index of the quote that closes the string opened at `start` (the end of
 * the text if none does): the next quote not escaped by an odd number of
 * backslashes, found by `indexOf` (a long string, such as an image, is skipped
 * at memory speed).
 */
function stringEnd(bytes: Uint8Array, start: number): number {
  let quote = start;
  while (true) {
    quote = bytes.indexOf(QUOTE, quote + 1);
    if (quote === -1) return bytes.length;
    let backslashes = 0;
    while (bytes[quote - 1 - backslashes] === BACKSLASH) backslashes++;
    if (backslashes % 2 === 0) return quote;
  }
}
