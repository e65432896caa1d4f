/**
 * The reply publisher against a broker's limits: what would be over the
 * largest packet is split into deltas that fit, or refused with
 * `reply_too_large` where the reply style cannot be split; nothing is ever
 * published over the limit or on a topic the broker refuses.
 */

import { deepEqual, equal, ok } from "node:assert/strict";
import { type BrokerRules, ReplyPublisher } from "../../lib/gateway/reply_publisher.ts";
import type { ReplyTarget } from "../../lib/gateway/reply_target.ts";
import {
  PacketLimit,
  publishPacketBytes,
  splitToFit,
  topicRefusal,
} from "../../lib/mqtt/broker_limits.ts";
import type { ReplyBody } from "../../lib/protocol/reply.ts";

const LIMIT = 400;

interface Sent {
  topic: string;
  payload: string;
  bytes: number;
}

function publisher(limitBytes = LIMIT, profile: "standard" | "nats" = "standard") {
  const sent: Sent[] = [];
  const counted: string[] = [];
  const limit = new PacketLimit(limitBytes, false);
  const broker: BrokerRules = {
    fits: (topic, payload, qos, data) => limit.fits(topic, payload, qos, data),
    maxPacketBytes: limit.bytes,
    topicRefusal: (topic) => topicRefusal(profile, topic),
  };
  const replies = new ReplyPublisher({
    qos: 1,
    broker,
    publish: (topic, payload) => {
      const bytes = publishPacketBytes(
        new TextEncoder().encode(topic).length,
        new TextEncoder().encode(payload).length,
        1,
        false,
      );
      sent.push({ topic, payload, bytes });
      return Promise.resolve();
    },
    stats: {
      error: (_project, code) => counted.push(`error:${code}`),
      unaddressable: (code) => counted.push(`unaddressable:${code}`),
    },
  });
  return { replies, sent, counted };
}

function target(style: ReplyTarget["style"], topic = "maze/assistant_response/s"): ReplyTarget {
  return {
    project: "maze",
    topic,
    style,
    sessionId: "s",
    requestId: "r",
    correlationData: undefined,
  };
}

function done(response: string): ReplyBody {
  return {
    type: "done",
    response,
    finish_reason: "stop",
    usage: null,
    timing: { queue_ms: 0, ttft_ms: 1, total_ms: 2 },
  };
}

// Multi-byte characters and ones JSON escapes, so that bytes and characters differ.
const LONG = Array.from({ length: 300 }, (_, i) => `wörd${i} "é" 😀\n`).join("");

Deno.test("reply publisher: a done over the limit comes as deltas that fit and a short done", () => {
  const { replies, sent } = publisher();
  const to = target("json");
  replies.reply(to, { type: "delta", seq: 0, delta: LONG.slice(0, 100) });
  replies.reply(to, done(LONG));
  ok(sent.length > 3);
  ok(sent.every((message) => message.bytes <= LIMIT), "every packet within the limit");
  const messages = sent.map((message) => JSON.parse(message.payload));
  const deltas = messages.filter((m) => m.type === "delta");
  deepEqual(deltas.map((m) => m.seq), deltas.map((_, i) => i));
  equal(deltas.map((m) => m.delta).join(""), LONG);
  const last = messages.at(-1);
  equal(last.type, "done");
  equal(last.response, "");
  equal(last.response_in_deltas, true);
  equal(last.request_id, "r");
});

Deno.test("reply publisher: an answer that fits is one done, as before", () => {
  const { replies, sent } = publisher();
  replies.reply(target("json"), done("short"));
  equal(sent.length, 1);
  equal(JSON.parse(sent[0].payload).response, "short");
  equal(JSON.parse(sent[0].payload).response_in_deltas, undefined);
});

Deno.test("reply publisher: plain text and hints over the limit get reply_too_large", () => {
  for (const style of ["text", "hint"] as const) {
    const { replies, sent, counted } = publisher();
    replies.reply(target(style), done(LONG));
    equal(sent.length, 1);
    ok(sent[0].bytes <= LIMIT);
    ok(sent[0].payload.includes("larger than the broker takes"), sent[0].payload);
    deepEqual(counted, ["error:reply_too_large"]);
  }
});

Deno.test("reply publisher: nothing goes to a topic the broker refuses; it is counted", () => {
  const { replies, sent, counted } = publisher(0, "nats");
  replies.reply(target("json", "maze/assistant_response/abc.def"), done("hi"));
  replies.send("maze/hint/a b", "{}");
  equal(sent.length, 0);
  deepEqual(counted, ["unaddressable:invalid_request"]);
});

Deno.test("packet size: counted as mqtt-packet encodes a PUBLISH", () => {
  // 1 fixed header + 1 length + 2+5 topic + 2 packet id + 3 payload.
  equal(publishPacketBytes(5, 3, 1, false), 14);
  // MQTT 5 adds the properties' length, and Correlation Data's 3 + its bytes.
  equal(publishPacketBytes(5, 3, 1, true, 4), 22);
  equal(publishPacketBytes(5, 200, 0, false), 210);
});

Deno.test("splitToFit: pieces in order, none over, no surrogate pair cut", () => {
  const text = "a😀".repeat(50);
  const pieces = splitToFit(text, (piece) => piece.length <= 7)!;
  equal(pieces.join(""), text);
  ok(pieces.every((piece) => piece.length <= 7 && !/^[\udc00-\udfff]/.test(piece)));
  equal(splitToFit("😀", (piece) => piece.length < 2), undefined);
});
