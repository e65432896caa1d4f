/**
 * Where and how the replies to one request go: the types the gateway, its
 * control topics and its state topics share, how a target is made from a
 * request's address and its MQTT 5 properties, and which topics a requester
 * may name for its replies.
 *
 * The service publishes with its own broker rights, which include topics no
 * client may write (the control topics it listens to, its status topic). A
 * reply topic a request names (the MQTT 5 Response Topic, or the payload's
 * `replyTopic`) is therefore taken only when the requester is entitled to
 * read it: by default its session's own reply topic or a topic below it,
 * `{project}/assistant_response/{session_id}[/...]`. Operators may allow
 * more with patterns (`--reply-topics`), but never a topic the service
 * subscribes to, one under its service name (status, stats) or a `$` topic.
 * A refused reply topic is answered `forbidden` on the session's usual topic.
 *
 * @module
 */

import type { IPublishPacket } from "mqtt";
import {
  type ReplyAddress,
  type ReplyBody,
  type ReplyStyle,
  ServiceError,
  topicMatches,
  type Topics,
} from "../protocol/mod.ts";

/** Where and how the replies to one request go. */
export interface ReplyTarget {
  readonly project: string;
  readonly topic: string;
  readonly style: ReplyStyle;
  readonly sessionId: string;
  readonly requestId: string | undefined;
  /** MQTT 5 Correlation Data of the request, echoed on every reply. */
  readonly correlationData: Uint8Array | undefined;
  /** Replies go here instead of to the broker (a request from the gateway's `ask`). */
  readonly deliver?: (body: ReplyBody) => void;
  /** The experiment variant that answers the session, named in JSON replies and hints. */
  readonly variant?: string;
}

/** The MQTT 5 Response Topic and Correlation Data of a request. */
export interface Mqtt5Reply {
  readonly topic: string;
  readonly correlationData: Uint8Array | undefined;
}

/** The reply topic patterns taken by default: a session's own reply topic and those below it. */
export const DEFAULT_REPLY_TOPICS: readonly string[] = Object.freeze([
  "{project}/assistant_response/{session_id}/#",
]);

/** The MQTT 5 reply properties of a request, when it names a Response Topic. */
export function mqtt5Reply(packet: IPublishPacket): Mqtt5Reply | undefined {
  const topic = packet.properties?.responseTopic;
  if (!topic) return undefined;
  return { topic, correlationData: packet.properties?.correlationData };
}

/** Who asks for a reply: the session it acts on, and the user name the broker vouches for. */
export interface Requester {
  readonly project: string;
  readonly sessionId: string;
  /**
   * The session named by the per-session input topic the request came on.
   * MQTT does not tell a subscriber who published; with the shipped ACL
   * (`pattern write +/user_input/%u`) only user `%u` can publish there, so
   * the topic is what the broker vouches for. Undefined on a shared topic.
   */
  readonly username: string | undefined;
}

/** The reply topics requesters may name. */
export class ReplyTopics {
  readonly #topics: Topics;
  readonly #patterns: readonly string[];
  #reserved: readonly string[] = [];

  /** `patterns`: MQTT topic filters under the topic prefix, with placeholders. */
  constructor(topics: Topics, patterns: readonly string[] = DEFAULT_REPLY_TOPICS) {
    this.#topics = topics;
    this.#patterns = patterns;
  }

  /** The filters the service subscribes to: no reply is ever published where it listens. */
  reserve(filters: readonly string[]): void {
    this.#reserved = [...filters];
  }

  /** Why `topic` may not carry the replies of `who`, if it may not. */
  refusal(topic: string, who: Requester): string | undefined {
    const named = JSON.stringify(topic);
    // Control characters are what is being refused here.
    // deno-lint-ignore no-control-regex
    if (topic === "" || topic.length > 512 || /[+#\u0000-\u001f\u007f-\u009f]/.test(topic)) {
      return `reply topic ${named} is not a topic name`;
    }
    if (topic.startsWith("$")) return `reply topic ${named} is a broker topic`;
    const { status, stats } = this.#topics;
    const service = status.slice(0, status.indexOf("/") + 1);
    if (topic === status || topic === stats || topic.startsWith(service)) {
      return `reply topic ${named} is the service's own`;
    }
    if (this.#reserved.some((filter) => topicMatches(filter, topic))) {
      return `reply topic ${named} is one the service listens to`;
    }
    const prefix = this.#topics.prefix;
    if (topic.startsWith(prefix)) {
      const rest = topic.slice(prefix.length);
      for (const pattern of this.#patterns) {
        const filter = fill(pattern, who);
        if (filter !== undefined && topicMatches(filter, rest)) return undefined;
      }
    }
    return `reply topic ${named} is not one session ${who.sessionId} may read: replies go to ${
      this.#topics.response(who.project, who.sessionId)
    } or a topic below it`;
  }
}

/** `pattern` with the requester's values; undefined when it names a user the request has not. */
function fill(pattern: string, who: Requester): string | undefined {
  if (pattern.includes("{username}") && who.username === undefined) return undefined;
  return pattern
    .replaceAll("{project}", who.project)
    .replaceAll("{session_id}", who.sessionId)
    .replaceAll("{username}", who.username ?? "");
}

/** A target, and why the reply topic the request named was refused, if it was. */
export interface ReplyDecision {
  readonly target: ReplyTarget;
  /** `forbidden`, saying why; the target is then the session's usual reply topic. */
  readonly refused: ServiceError | undefined;
}

/**
 * The target of a request's replies: its MQTT 5 Response Topic, else the
 * reply topic it names, else its session's reply topic; a named topic the
 * requester may not read is refused, and the target is its session's topic.
 */
export function replyTarget(
  rules: ReplyTopics,
  topics: Topics,
  who: Requester,
  address: Omit<ReplyAddress, "sessionId">,
  mqtt5: Mqtt5Reply | undefined,
): ReplyDecision {
  const usual = topics.response(who.project, who.sessionId);
  const requested = mqtt5?.topic ?? address.replyTopic;
  const why = requested === undefined ? undefined : rules.refusal(requested, who);
  return {
    target: {
      project: who.project,
      topic: requested === undefined || why !== undefined ? usual : requested,
      style: address.style,
      sessionId: who.sessionId,
      requestId: address.requestId,
      correlationData: mqtt5?.correlationData,
    },
    refused: why === undefined ? undefined : new ServiceError("forbidden", why),
  };
}
