/**
 * Reading a key range past records that cannot be read. Deno KV fails a whole
 * `list` when one value in it cannot be read (a value it cannot deserialize,
 * a damaged page), and says nothing of which key it was. So after a failure
 * the range is read again one entry at a time up to the bad one, whose key is
 * then found by bisection: `list` with `limit: 1` over `[after last good key,
 * end)` fails exactly when the bad key comes before `end`, and the key's
 * string parts are found one character at a time. Private to `lib/sessions/`.
 *
 * @module
 */

import { isDamage } from "./session_store_error.ts";

/** Code points, surrogates left out, so that their order is UTF-8's (the keys' order). */
const CODE_POINTS = 0x110000 - 0x800;
/** Reads a search may make to find one bad key before giving up. */
const PROBE_BUDGET = 20_000;
const LONGEST_PART = 1024;

const codePoint = (index: number) => String.fromCodePoint(index < 0xd800 ? index : index + 0x800);

/** A record under the prefix that could not be read. */
export interface Unreadable {
  /** The first `depth` parts of its key after the prefix: the group it belongs to. */
  readonly parts: readonly string[];
  readonly error: Error;
}

/**
 * Yields the readable entries under `prefix` in key order. A record that
 * cannot be read is reported to `onUnreadable` with the first `depth` (string)
 * parts of its key after the prefix, and every other key with those parts is
 * skipped too (they belong to the same session). Throws the read's error when
 * the bad key cannot be told (a store damaged beyond single records).
 */
export async function* readableEntries<T>(
  kv: Deno.Kv,
  prefix: Deno.KvKey,
  depth: number,
  onUnreadable: (unreadable: Unreadable) => void,
): AsyncGenerator<Deno.KvEntry<T>> {
  /** Where to go on: after the last entry read or skipped. */
  let start: Deno.KvKey | undefined;
  /** Right after a failure: read one entry at a time, to stop just before the bad one. */
  let careful = false;
  for (;;) {
    let last: Deno.KvKey | undefined;
    try {
      const entries = kv.list<T>(start ? { prefix, start } : { prefix }, {
        batchSize: careful ? 1 : 500,
      });
      for await (const entry of entries) {
        last = entry.key;
        yield entry;
      }
      return;
    } catch (error) {
      if (!isDamage(error)) throw error;
      if (last) start = after(last);
      if (!careful) {
        careful = true;
        continue;
      }
      const parts = await locate(kv, prefix, start ?? prefix, depth);
      if (!parts) throw error;
      onUnreadable({ parts, error: error as Error });
      // Past every key that starts with these parts: the last one with a NUL appended.
      start = [...prefix, ...parts.slice(0, -1), `${parts.at(-1)}\0`];
      careful = false;
    }
  }
}

/** The smallest key after `key` (and after every key it is a prefix of is not needed here). */
function after(key: Deno.KvKey): Deno.KvKey {
  return [...key, new Uint8Array()];
}

/**
 * The first `depth` string parts (after `prefix`) of the first key at or after
 * `from`, whose record cannot be read; undefined if they cannot be found.
 */
async function locate(
  kv: Deno.Kv,
  prefix: Deno.KvKey,
  from: Deno.KvKey,
  depth: number,
): Promise<string[] | undefined> {
  let probes = 0;
  /** Whether the bad key comes before `end`. */
  const before = async (end: Deno.KvKey): Promise<boolean> => {
    if (++probes > PROBE_BUDGET) throw new RangeError("probe budget");
    try {
      for await (const _ of kv.list({ start: from, end }, { limit: 1 })) { /* readable */ }
      return false;
    } catch (error) {
      if (/start key is greater than end key/i.test((error as Error).message)) return false;
      if (isDamage(error)) return true;
      throw error;
    }
  };
  try {
    const parts: string[] = [];
    for (let j = 0; j < depth; j++) {
      const key = (text: string) => [...prefix, ...parts, text];
      let text = "";
      // Is the part `text` itself? Else find its next character: the largest one for which
      // the key made of `text` and it does not come after the bad key.
      while (!(await before(key(`${text}\0`)))) {
        if (text.length > LONGEST_PART) return undefined;
        let low = 1;
        let high = CODE_POINTS - 1;
        if (await before(key(text + codePoint(low)))) {
          text += "\0";
          continue;
        }
        if (!(await before(key(text + codePoint(high))))) low = high;
        while (high - low > 1) {
          const middle = Math.floor((low + high) / 2);
          if (await before(key(text + codePoint(middle)))) high = middle;
          else low = middle;
        }
        text += codePoint(low);
      }
      parts.push(text);
    }
    // The bad key starts with these parts: not before the first key that does, before the last.
    const first = [...prefix, ...parts];
    const beyond = [...prefix, ...parts.slice(0, -1), `${parts.at(-1)}\0`];
    if (await before(first) || !(await before(beyond))) return undefined;
    return parts;
  } catch (error) {
    if (error instanceof RangeError) return undefined;
    throw error;
  }
}
