/**
 * Sends replies: encodes each in its request's style and publishes it on its
 * target's topic, with the request's MQTT 5 Correlation Data, or hands it to
 * an in-process caller. Knows the broker only as a `publish` function.
 *
 * @module
 */

import { logger } from "../log.ts";
import { encodeReply, type ReplyBody, type ServiceError } from "../protocol/mod.ts";
import type { Stats } from "../observability/stats.ts";
import type { ReplyTarget } from "./reply_target.ts";

/** How a message is published. */
export interface PublishOptions {
  readonly qos: 0 | 1 | 2;
  /** MQTT 5 Correlation Data to echo; none for MQTT 3.1.1 requests. */
  readonly correlationData?: Uint8Array;
}

/** Publishes one message; rejects when it could not be sent. */
export type Publish = (
  topic: string,
  payload: string,
  options: PublishOptions,
) => Promise<void>;

/** Options of {@linkcode ReplyPublisher}. */
export interface ReplyPublisherOptions {
  readonly publish: Publish;
  /** The QoS of every reply. */
  readonly qos: 0 | 1 | 2;
  /** Counts each error reply. */
  readonly stats: Pick<Stats, "error">;
}

const log = logger("gateway");

/** Publishes replies to their targets. */
export class ReplyPublisher {
  readonly #options: ReplyPublisherOptions;

  constructor(options: ReplyPublisherOptions) {
    this.#options = options;
  }

  /** Sends `body` to `target` in its style (a style that sends nothing for it: nothing). */
  reply(target: ReplyTarget, body: ReplyBody): void {
    if (target.deliver) {
      target.deliver(body);
      return;
    }
    const payload = encodeReply(body, target.style, target.sessionId, target.requestId);
    if (payload === undefined) return;
    const { qos } = this.#options;
    const options = target.correlationData
      ? { qos, correlationData: target.correlationData }
      : { qos };
    this.#options.publish(target.topic, payload, options).catch((error) =>
      log.warn("Reply to {topic} not sent: {message}", {
        topic: target.topic,
        message: (error as Error).message,
      })
    );
  }

  /** Sends `error` to `target` as an error reply, and counts it. */
  fail(target: ReplyTarget, error: ServiceError): void {
    this.#options.stats.error(target.project, error.code);
    if (error.code === "internal") {
      log.error("Request failed: {message}", { message: error.message });
    }
    this.reply(target, {
      type: "error",
      error: {
        code: error.code,
        message: error.message,
        ...(error.retryAfterMs !== undefined && { retry_after_ms: error.retryAfterMs }),
      },
    });
  }

  /** Publishes a message that is not a reply (a hint, a session id); a failure is ignored. */
  send(topic: string, payload: string): void {
    this.#options.publish(topic, payload, { qos: this.#options.qos }).catch(() => {});
  }
}
