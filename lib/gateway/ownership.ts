/**
 * Who may act on a session: under `--session-topics-only` only requests on
 * the session's own input topic, and under `--session-secret` only holders
 * of a session id this service signed.
 *
 * @module
 */

import { ServiceError, type Topics } from "../protocol/mod.ts";
import type { SessionSigner } from "./session_signer.ts";

/** What the ownership check needs. */
export interface Ownership {
  readonly topics: Topics;
  /** Take requests only on per-session input topics. */
  readonly sessionTopicsOnly: boolean;
  /** Takes only signed session ids; undefined: any. */
  readonly signer: SessionSigner | undefined;
}

/**
 * Why a request may not act on its session, if it may not: it came
 * on the shared input topic where only per-session topics are taken, or its
 * session id is not signed by this service.
 */
export function ownershipRefusal(
  options: Ownership,
  project: string,
  topicSessionId: string | undefined,
  sessionId: string,
): ServiceError | undefined {
  const { topics, sessionTopicsOnly, signer } = options;
  if (topicSessionId === undefined && sessionTopicsOnly) {
    const own = topics.sessionInput(project, sessionId);
    return new ServiceError(
      "forbidden",
      `requests are taken only on the session's own topic, ${own}`,
    );
  }
  if (signer && !signer.verify(sessionId)) {
    return new ServiceError(
      "forbidden",
      `session id ${sessionId} is not signed by this service: ask for one on ${
        topics.newSession(project).slice(0, -1)
      }{nonce} and read it on ${topics.responseRoot(project)}{nonce}`,
    );
  }
  return undefined;
}
