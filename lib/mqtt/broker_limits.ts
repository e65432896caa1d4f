/**
 * What the broker will take from the service: the largest packet, and which
 * topic names. A packet over the broker's limit makes it drop the
 * connection (mosquitto's `max_packet_size`, an MQTT 5 CONNACK's Maximum
 * Packet Size) or the message (mosquitto's `message_size_limit`); a topic
 * name it cannot carry makes it drop the connection (NATS). Either, re-sent
 * by the client after each reconnect, would stop every other reply: so what
 * does not fit is never sent.
 *
 * @module
 */

/**
 * Brokers whose topic rules differ from MQTT's: `nats` (its MQTT listener,
 * up to nats-server 2.10, refuses `.` and ` ` in a topic name and drops the
 * connection); `standard`: MQTT's own rules (mosquitto, EMQX, HiveMQ,
 * RabbitMQ, aedes).
 */
export type BrokerProfile = "standard" | "nats";

/** Every broker profile, for the option's choices. */
export const BROKER_PROFILES: readonly BrokerProfile[] = ["standard", "nats"];

/**
 * Why `topic` cannot be a topic name on a broker of `profile`, or undefined
 * when it can.
 */
export function topicRefusal(profile: BrokerProfile, topic: string): string | undefined {
  if (profile === "nats" && /[. ]/.test(topic)) {
    return "a NATS broker's MQTT listener takes no '.' or ' ' in a topic";
  }
  return undefined;
}

/** The largest packet the broker takes, as known now. */
export class PacketLimit {
  readonly #configured: number;
  #advertised: number | undefined;
  #mqtt5: boolean;

  /** `configured`: bytes, 0 for none; `mqtt5`: the connection's protocol. */
  constructor(configured: number, mqtt5: boolean) {
    this.#configured = configured;
    this.#mqtt5 = mqtt5;
  }

  /** A connection was accepted: its protocol, and the Maximum Packet Size its CONNACK gave. */
  connected(mqtt5: boolean, advertised: number | undefined): void {
    this.#mqtt5 = mqtt5;
    this.#advertised = advertised;
  }

  /** The largest packet in bytes (Infinity: no limit known). */
  get bytes(): number {
    const configured = this.#configured > 0 ? this.#configured : Infinity;
    return Math.min(configured, this.#advertised ?? Infinity);
  }

  /** Whether a PUBLISH of `payload` on `topic` fits. */
  fits(topic: string, payload: string, qos: 0 | 1 | 2, correlationData?: Uint8Array): boolean {
    const limit = this.bytes;
    if (limit === Infinity) return true;
    // A UTF-16 code unit is at most 3 bytes of UTF-8: most replies fit without encoding them.
    const most = publishPacketBytes(
      topic.length * 3,
      payload.length * 3,
      qos,
      this.#mqtt5,
      correlationData?.length,
    );
    if (most <= limit) return true;
    return publishPacketBytes(
      utf8Length(topic),
      utf8Length(payload),
      qos,
      this.#mqtt5,
      correlationData?.length,
    ) <= limit;
  }
}

/**
 * The size in bytes of an MQTT PUBLISH packet: fixed header, topic, packet
 * id (QoS 1 and 2), MQTT 5 properties (Correlation Data only, the one the
 * service sets), payload.
 */
export function publishPacketBytes(
  topicBytes: number,
  payloadBytes: number,
  qos: 0 | 1 | 2,
  mqtt5: boolean,
  correlationDataBytes?: number,
): number {
  const properties = correlationDataBytes === undefined ? 0 : 3 + correlationDataBytes;
  const remaining = 2 + topicBytes + (qos > 0 ? 2 : 0) +
    (mqtt5 ? varIntBytes(properties) + properties : 0) + payloadBytes;
  return 1 + varIntBytes(remaining) + remaining;
}

function varIntBytes(value: number): number {
  return value < 128 ? 1 : value < 16_384 ? 2 : value < 2_097_152 ? 3 : 4;
}

const encoder = new TextEncoder();

function utf8Length(text: string): number {
  return encoder.encode(text).length;
}

/**
 * Splits `text` into pieces, in order, each of which `fits`; never inside a
 * surrogate pair. Undefined when a single character does not fit.
 */
export function splitToFit(text: string, fits: (piece: string) => boolean): string[] | undefined {
  if (fits(text)) return [text];
  if (text.length <= 1 || (text.length === 2 && isPair(text, 0))) return undefined;
  let middle = Math.floor(text.length / 2);
  if (isPair(text, middle - 1)) middle++;
  const head = splitToFit(text.slice(0, middle), fits);
  const tail = head && splitToFit(text.slice(middle), fits);
  return head && tail && [...head, ...tail];
}

/** Whether a surrogate pair starts at `index`. */
function isPair(text: string, index: number): boolean {
  const code = text.charCodeAt(index);
  return code >= 0xd800 && code <= 0xdbff && index + 1 < text.length;
}
