/**
 * Signed session ids, for brokers without per-user ACLs: with a secret, the
 * service takes only session ids of the form `{name}~{signature}`, where the
 * signature is an HMAC-SHA256 of the name under the secret. The separator is
 * `~`, which every major broker takes in a topic level (NATS's MQTT listener
 * refuses `.` and spaces in topics: a dot would keep signed ids off it). Nobody without
 * the secret can make one, so a session id cannot be guessed; a client that
 * has seen an id can still use it (per-session topics behind a broker ACL
 * are what protects against that).
 *
 * @module
 */

import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { LruMap } from "../_util.ts";

/** Base64url characters of the signature: 128 bits. */
const SIGNATURE_CHARS = 22;
/** Between a signed id's name and its signature. */
const SEPARATOR = "~";

/** Checks and makes signed session ids. */
export class SessionSigner {
  readonly #secret: string;
  /** Ids already checked (the last 100,000 used), so that a session's every turn does not pay for an HMAC. */
  readonly #valid = new LruMap<string, true>(100_000);

  constructor(secret: string) {
    if (secret.length < 16) {
      throw new RangeError("a session secret must be at least 16 characters long");
    }
    this.#secret = secret;
  }

  /** `name` with its signature: a session id this service takes. */
  sign(name: string): string {
    return `${name}${SEPARATOR}${this.#signature(name)}`;
  }

  /** A new session id under a random name (unguessable, as a client's first id should be). */
  issue(): string {
    return this.sign(randomBytes(9).toString("base64url"));
  }

  /** Whether `id` carries a valid signature of its name. */
  verify(id: string): boolean {
    if (this.#valid.get(id)) return true;
    const at = id.lastIndexOf(SEPARATOR);
    if (at <= 0 || id.length - at - 1 !== SIGNATURE_CHARS) return false;
    const given = new TextEncoder().encode(id.slice(at + 1));
    const expected = new TextEncoder().encode(this.#signature(id.slice(0, at)));
    if (!timingSafeEqual(given, expected)) return false;
    this.#valid.set(id, true);
    return true;
  }

  #signature(name: string): string {
    return createHmac("sha256", this.#secret).update(name).digest("base64url").slice(
      0,
      SIGNATURE_CHARS,
    );
  }
}
