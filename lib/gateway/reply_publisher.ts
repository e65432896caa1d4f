/**
 * Sends replies: encodes each in its request's style and publishes it on its
 * target's topic, with the request's MQTT 5 Correlation Data, or hands it to
 * an in-process caller. Knows the broker only as a `publish` function and
 * what it takes (the largest packet, the topics it can carry).
 *
 * What the broker cannot take is never sent: an answer whose `done` would
 * be over the largest packet comes as deltas (each within it) and a `done`
 * without the text (`"response":""`, `"response_in_deltas":true`); a reply
 * style that cannot carry that (plain text, a game's hint) gets a
 * `reply_too_large` error instead; a reply that cannot be sent at all (its
 * topic is refused, or even its error is too large) is dropped, logged and
 * counted.
 *
 * @module
 */

import { logger } from "../log.ts";
import { encodeReply, type ReplyBody, ServiceError } from "../protocol/mod.ts";
import type { Stats } from "../observability/stats.ts";
import { splitToFit } from "../mqtt/broker_limits.ts";
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

/** What the broker takes. */
export interface BrokerRules {
  /** Whether a PUBLISH of `payload` on `topic` is within the broker's largest packet. */
  fits(topic: string, payload: string, qos: 0 | 1 | 2, correlationData?: Uint8Array): boolean;
  /** The largest packet in bytes (Infinity: none known), for error messages. */
  readonly maxPacketBytes: number;
  /** Why the broker cannot carry `topic`, or undefined. */
  topicRefusal(topic: string): string | undefined;
}

/** A broker that takes everything MQTT allows. */
export const ANY_BROKER: BrokerRules = {
  fits: () => true,
  maxPacketBytes: Infinity,
  topicRefusal: () => undefined,
};

/** Options of {@linkcode ReplyPublisher}. */
export interface ReplyPublisherOptions {
  readonly publish: Publish;
  /** The QoS of every reply. */
  readonly qos: 0 | 1 | 2;
  /** Counts each error reply, and each reply that could not be sent. */
  readonly stats: Pick<Stats, "error" | "unaddressable">;
  /**
   * What the broker takes.
   * @default {ANY_BROKER}
   */
  readonly broker?: BrokerRules;
  /**
   * The experiment variant answering a session, for a reply whose target
   * does not name one (a refusal before the turn ran, a repeated answer).
   * @default {() => undefined}
   */
  readonly variantOf?: (project: string, sessionId: string) => string | undefined;
}

/** What has been sent of one answer in JSON: its deltas' next `seq`, and their length. */
interface Streamed {
  seq: number;
  chars: number;
}

const log = logger("gateway");

/** Publishes replies to their targets. */
export class ReplyPublisher {
  readonly #options: ReplyPublisherOptions;
  readonly #broker: BrokerRules;
  readonly #streamed = new WeakMap<ReplyTarget, Streamed>();

  constructor(options: ReplyPublisherOptions) {
    this.#options = options;
    this.#broker = options.broker ?? ANY_BROKER;
  }

  /** Why the broker cannot carry `topic`, or undefined when it can. */
  topicRefusal(topic: string): string | undefined {
    return this.#broker.topicRefusal(topic);
  }

  /** Sends `body` to `target` in its style (a style that sends nothing for it: nothing). */
  reply(target: ReplyTarget, body: ReplyBody): void {
    if (target.deliver) {
      // Named as on MQTT (`encodeReply`): "try it" shows which variant answered.
      const named = target.variant !== undefined && body.type !== "delta";
      target.deliver(named ? Object.assign({ variant: target.variant }, body) : body);
      return;
    }
    const refusal = this.#broker.topicRefusal(target.topic);
    if (refusal !== undefined) {
      const code = body.type === "error" ? body.error.code : "invalid_request";
      return this.#undeliverable(target, code, refusal);
    }
    if (body.type === "delta") {
      if (target.style === "json") this.#deltas(target, body.delta);
      return;
    }
    const streamed = this.#streamed.get(target);
    this.#streamed.delete(target);
    const variant = target.variant ?? this.#options.variantOf?.(target.project, target.sessionId);
    const payload = encodeReply(body, target.style, target.sessionId, target.requestId, variant);
    if (payload === undefined) return;
    if (this.#fits(target, payload)) return this.#publish(target, payload);
    if (body.type === "done" && target.style === "json") {
      // The text the deltas have not carried yet (all of it when nothing was streamed).
      const rest = body.response.slice(streamed?.chars ?? 0);
      const short = encodeReply(
        { ...body, response: "", response_in_deltas: true },
        "json",
        target.sessionId,
        target.requestId,
        variant,
      )!;
      if (this.#fits(target, short)) {
        this.#streamed.set(target, streamed ?? { seq: 0, chars: 0 });
        if (this.#deltas(target, rest)) {
          this.#streamed.delete(target);
          return this.#publish(target, short);
        }
      }
      this.#streamed.delete(target);
    }
    if (body.type !== "error") {
      const bytes = new TextEncoder().encode(payload).length;
      return this.refuse(
        target,
        new ServiceError(
          "reply_too_large",
          `the answer (${bytes} bytes) is larger than the broker takes in one message ` +
            `(${this.#broker.maxPacketBytes} bytes a packet); ask for a shorter answer, or ` +
            `for the JSON reply style ("format":"json"), which splits it`,
        ),
      );
    }
    this.#undeliverable(target, body.error.code, "it is larger than the broker takes");
  }

  /** Sends `error` to `target` as an error reply, and counts it. */
  refuse(target: ReplyTarget, error: ServiceError): void {
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

  /**
   * Publishes a message that is not a reply (a hint, a session id); a failure
   * is ignored, one the broker cannot take is not sent.
   */
  send(topic: string, payload: string): void {
    const { qos } = this.#options;
    const refusal = this.#broker.topicRefusal(topic) ??
      (this.#broker.fits(topic, payload, qos) ? undefined : "it is larger than the broker takes");
    if (refusal !== undefined) {
      log.warn("Not sent to {topic}: {reason}", { topic, reason: refusal });
      return;
    }
    this.#options.publish(topic, payload, { qos }).catch(() => {});
  }

  /**
   * Publishes `text` as the next deltas of `target`'s answer, split so that
   * each fits; whether it could be.
   */
  #deltas(target: ReplyTarget, text: string): boolean {
    let streamed = this.#streamed.get(target);
    if (!streamed) this.#streamed.set(target, streamed = { seq: 0, chars: 0 });
    const state = streamed;
    const encode = (delta: string, seq: number) =>
      encodeReply({ type: "delta", seq, delta }, "json", target.sessionId, target.requestId)!;
    const publish = (piece: string, payload = encode(piece, state.seq)) => {
      this.#publish(target, payload);
      state.seq++;
      state.chars += piece.length;
    };
    if (text === "") return true;
    // Nearly always one delta that fits: encoded once.
    const whole = encode(text, state.seq);
    if (this.#fits(target, whole)) {
      publish(text, whole);
      return true;
    }
    // Sized with the largest `seq` any piece can get, so that a longer number still fits.
    const last = state.seq + text.length;
    const pieces = splitToFit(text, (piece) => this.#fits(target, encode(piece, last)));
    if (!pieces) return false;
    for (const piece of pieces) publish(piece);
    return true;
  }

  #fits(target: ReplyTarget, payload: string): boolean {
    return this.#broker.fits(target.topic, payload, this.#options.qos, target.correlationData);
  }

  #publish(target: ReplyTarget, payload: string): void {
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

  /** A reply that cannot be sent at all: logged and counted. */
  #undeliverable(target: ReplyTarget, code: ServiceError["code"], reason: string): void {
    this.#options.stats.unaddressable(code);
    log.warn("Reply to {topic} not sent: {reason}", { topic: target.topic, reason });
  }
}
