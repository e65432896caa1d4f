/**
 * Where and how the replies to one request go: the types the gateway, its
 * control topics and its state topics share, and how a target is made from a
 * request's address and its MQTT 5 properties.
 *
 * @module
 */

import type { IPublishPacket } from "mqtt";
import type { ReplyAddress, ReplyBody, ReplyStyle, Topics } from "../protocol/mod.ts";

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
}

/** The MQTT 5 Response Topic and Correlation Data of a request. */
export interface Mqtt5Reply {
  readonly topic: string;
  readonly correlationData: Uint8Array | undefined;
}

/** The MQTT 5 reply properties of a request, when it has a usable Response Topic. */
export function mqtt5Reply(packet: IPublishPacket): Mqtt5Reply | undefined {
  const topic = packet.properties?.responseTopic;
  if (!topic || /[+#]/.test(topic) || topic.startsWith("$")) return undefined;
  return { topic, correlationData: packet.properties?.correlationData };
}

/**
 * The target of a request's replies: its MQTT 5 Response Topic, else the
 * reply topic it names, else its session's reply topic.
 */
export function replyTarget(
  topics: Topics,
  project: string,
  address: ReplyAddress,
  mqtt5: Mqtt5Reply | undefined,
): ReplyTarget {
  return {
    project,
    topic: mqtt5?.topic ?? address.replyTopic ?? topics.response(project, address.sessionId),
    style: address.style,
    sessionId: address.sessionId,
    requestId: address.requestId,
    correlationData: mqtt5?.correlationData,
  };
}
