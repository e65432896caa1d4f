/**
 * The program's one MQTT connection: options from the configuration (auth,
 * TLS, Last Will, persistent session), the protocol version negotiated (MQTT
 * 5, else 3.1.1), the broker's largest packet learnt from each CONNACK, TCP
 * no-delay on every socket, reconnection with exponential backoff and
 * jitter, and a bound on how often one message is sent again.
 *
 * @module
 */

import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient, type Packet } from "mqtt";
import { backoffDelay } from "../_util.ts";
import { logger } from "../log.ts";
import type { PacketLimit } from "./broker_limits.ts";

/**
 * Handles one incoming message. Messages are handed over one at a time, in
 * the order the broker sent them; a QoS 1 message is acknowledged only after
 * its handler returned.
 */
export type MessageHandler = (topic: string, payload: Uint8Array, packet: IPublishPacket) => void;

/** The broker gave our client id to another connection. */
export class SessionTakenOverError extends Error {
  readonly code = "session_taken_over";
  constructor(readonly clientId: string) {
    super(
      `another client connected with the MQTT client id "${clientId}" and took over our session ` +
        `(is a second instance running?): give each instance its own '--mqtt-client-id'`,
    );
    this.name = "SessionTakenOverError";
  }
}

/** What the connection needs to know. */
export interface ConnectOptions {
  readonly url: string;
  readonly clientId: string;
  /** `auto`: MQTT 5, else 3.1.1 when the broker refuses 5 (said in a log line). */
  readonly protocolVersion: 4 | 5 | "auto";
  /** Told each accepted connection's protocol and the broker's Maximum Packet Size. */
  readonly packetLimit?: PacketLimit;
  readonly username?: string;
  readonly password?: string;
  readonly tlsCa?: string;
  readonly tlsCert?: string;
  readonly tlsKey?: string;
  /** The Last Will: published by the broker, retained, when the connection is lost. */
  readonly will: { readonly topic: string; readonly payload: string };
  /**
   * Keep a persistent session: the broker keeps our subscriptions and queues
   * QoS 1 requests while we are away. Off for a member of a share group:
   * brokers go on handing a share of the requests to a member's persistent
   * session while it is offline (mosquitto does), where they wait for its
   * restart instead of going to the members that are up.
   * @default {true}
   */
  readonly persistentSession?: boolean;
  /**
   * Reconnect backoff: first delay and cap, in milliseconds.
   * @default {[250, 30000]}
   */
  readonly backoffMs?: readonly [number, number];
  /**
   * Who handles incoming messages, once it exists. Until it resolves, what the
   * broker delivers (requests it queued for our persistent session while we
   * were down) is held, unacknowledged and in order; if it rejects, nothing
   * held is acknowledged, so the broker delivers it again at the next start.
   */
  readonly handler: Promise<MessageHandler>;
  /** Tells a takeover of our client id from other disconnects. */
  readonly takeover: TakeoverWatch;
  /**
   * Called once when another connection takes our client id over and we
   * should stop rather than take it back (see {@link TakeoverWatch}).
   */
  readonly onTakeover: (error: SessionTakenOverError) => void;
}

const log = logger("mqtt");

/**
 * How many accepted connections may end while one message of ours is sent
 * and unacknowledged before it is dropped. The client sends unacknowledged
 * messages again, one at a time and before any other, after each reconnect:
 * one the broker closes the connection over would otherwise be sent for
 * ever, and hold up every reply behind it.
 */
export const MAX_SEND_TRIES = 3;

/** The broker would not speak the protocol version asked for. */
export class ProtocolRefusedError extends Error {
  readonly code = "protocol_refused";
  constructor(readonly version: 4 | 5, readonly reason: string) {
    super(`the broker does not take MQTT ${version === 5 ? "5" : "3.1.1"}: ${reason}`);
    this.name = "ProtocolRefusedError";
  }
}

/** Whether the broker kept a session for us at the last CONNACK. */
export function sessionPresent(client: MqttClient): boolean {
  // mqtt.js keeps the CONNACK; its typings call it private.
  const connack = (client as unknown as { connackPacket?: { sessionPresent?: boolean } })
    .connackPacket;
  return connack?.sessionPresent === true;
}

/** The version a client speaks. */
export function protocolOf(client: MqttClient): 4 | 5 {
  return client.options.protocolVersion === 5 ? 5 : 4;
}

/**
 * Connects and resolves once the first CONNACK arrives. Later disconnects are
 * retried for ever with exponential backoff; the client emits `connect` again
 * after each reconnect. With `protocolVersion: "auto"`, a broker that refuses
 * MQTT 5 (a CONNACK saying so, or a close without a CONNACK, as RabbitMQ
 * before 3.13 does) is connected to with 3.1.1, and a log line says what is
 * lost.
 */
export async function connectMqtt(options: ConnectOptions): Promise<MqttClient> {
  if (options.protocolVersion !== "auto") {
    return await connectWith(options, options.protocolVersion, false);
  }
  try {
    return await connectWith(options, 5, true);
  } catch (error) {
    if (!(error instanceof ProtocolRefusedError)) throw error;
    log.warn(
      "The broker at {url} does not take MQTT 5 ({reason}): using MQTT 3.1.1, without Response " +
        "Topic and Correlation Data replies, the broker's Maximum Packet Size (set " +
        "--mqtt-max-packet-bytes to its limit), and its reason when it drops the connection",
      { url: redact(options.url), reason: error.reason },
    );
    return await connectWith(options, 4, false);
  }
}

/** Whether an error is the network's (no broker there), not the broker's answer. */
function isNetworkError(error: Error & { code?: unknown }): boolean {
  return typeof error.code === "string";
}

function connectWith(
  options: ConnectOptions,
  protocolVersion: 4 | 5,
  fallback: boolean,
): Promise<MqttClient> {
  const [firstDelay, maxDelay] = options.backoffMs ?? [250, 30_000];
  const persistent = options.persistentSession ?? true;
  const clientOptions: IClientOptions = {
    clientId: options.clientId,
    protocolVersion,
    // With a persistent session we also keep unacknowledged replies and resend them.
    clean: !persistent,
    ...(protocolVersion === 5 && persistent &&
      { properties: { sessionExpiryInterval: 3600 } }),
    reconnectPeriod: firstDelay,
    connectTimeout: 10_000,
    keepalive: 30,
    resubscribe: true,
    // A refusal after the start (credentials changed, the broker restarting) is retried,
    // with its reason logged, rather than leaving the service unconnected for good.
    reconnectOnConnackError: true,
    will: { topic: options.will.topic, payload: options.will.payload, qos: 1, retain: true },
    ...(options.username !== undefined && { username: options.username }),
    ...(options.password !== undefined && { password: options.password }),
    ...(options.tlsCa && { ca: Deno.readTextFileSync(options.tlsCa) }),
    ...(options.tlsCert && { cert: Deno.readTextFileSync(options.tlsCert) }),
    ...(options.tlsKey && { key: Deno.readTextFileSync(options.tlsKey) }),
  };
  const client = mqtt.connect(options.url, clientOptions);
  holdMessagesFor(client, options.handler);
  boundResends(client);
  const { takeover } = options;
  let reported = false;
  let saidTakenOver = false;
  // Whether this attempt got a CONNACK, and whether it failed in the network (no broker).
  let accepted = false;
  let networkError = false;
  let saidRefused = false;
  client.on("packetreceive", (packet: Packet) => {
    if (packet.cmd !== "connack") return;
    accepted = (packet.reasonCode ?? packet.returnCode ?? 0) === 0;
    if (accepted) {
      // Here, not at the client's `connect` event: messages the broker sends at once (a Will
      // fired by this takeover) may be handled before that event.
      takeover.connected(performance.now());
      options.packetLimit?.connected(
        protocolVersion === 5,
        packet.properties?.maximumPacketSize,
      );
    }
  });
  // MQTT 5 brokers may say why (reason code 142, "session taken over"); others just close.
  client.on("disconnect", (packet) => {
    saidTakenOver = packet.reasonCode === 142;
    if (packet.reasonCode !== undefined && packet.reasonCode !== 0) {
      log.warn("The broker ends the connection: {reason} (reason code {code})", {
        reason: packet.properties?.reasonString ?? reasonText(packet.reasonCode),
        code: packet.reasonCode,
      });
    }
  });
  client.on("close", () => {
    const stop = takeover.closed(performance.now(), saidTakenOver);
    saidTakenOver = false;
    if (stop && !reported) {
      reported = true;
      // No reconnect: it would knock the other instance off again.
      client.end(true);
      options.onTakeover(new SessionTakenOverError(options.clientId));
    }
  });
  let failures = 0;
  let connectedOnce = false;
  client.on("connect", () => {
    connectedOnce = true;
    failures = 0;
    saidRefused = false;
    client.options.reconnectPeriod = firstDelay;
    setNoDelay(client);
  });
  client.on("close", () => {
    // A broker that closes a connection it never accepted says no without a reason.
    // (With `fallback`, the start-up tries 3.1.1 next, and says so.)
    if (!accepted && !networkError && !saidRefused && !client.disconnecting && !fallback) {
      saidRefused = true;
      log.warn(
        "The broker at {url} closed the connection without accepting it (a broker that does " +
          "not speak MQTT {version} does so: see --mqtt-version)",
        { url: redact(options.url), version: protocolVersion === 5 ? "5" : "3.1.1" },
      );
    }
    // Said once an outage, not at each failed attempt; not at all when we are the ones leaving.
    if (failures === 0 && accepted && !client.disconnecting) {
      log.warn("Lost the connection to the broker; reconnecting");
    }
    accepted = false;
    networkError = false;
    // Full jitter, so many instances do not reconnect in step.
    failures++;
    client.options.reconnectPeriod = backoffDelay(failures, {
      firstMs: firstDelay,
      maxMs: maxDelay,
      jitter: "full",
    });
  });
  client.on("error", (error: Error & { code?: unknown }) => {
    if (isNetworkError(error)) networkError = true;
    // Before any connection, a network error or a silent listener means no broker is there yet.
    if (!connectedOnce && (isNetworkError(error) || error.message === "connack timeout")) {
      return log.warn("Cannot reach the broker at {url}: {message}; retrying", {
        url: redact(options.url),
        message: error.message === "connack timeout"
          ? "it accepted the connection but did not answer as an MQTT broker within 10 s " +
            "(connack timeout): is the program listening there an MQTT broker?"
          : error.message,
      });
    }
    // mosquitto acknowledges a message over its message_size_limit with reason code 0x95,
    // which MQTT 5 does not list for a PUBACK: the client can only say it is invalid.
    const hint = /puback reason code/.test(error.message)
      ? " (a broker refusing a message as too large, such as mosquitto over its " +
        "message_size_limit: give the service that limit as --mqtt-max-packet-bytes)"
      : "";
    log.warn("MQTT error: {message}{hint}", { message: error.message, hint });
  });

  return new Promise((resolve, reject) => {
    const fail = (error: Error) => {
      client.off("connect", onConnect);
      client.off("error", onFirstError);
      client.off("close", onFirstClose);
      client.end(true);
      reject(error);
    };
    const onConnect = () => {
      client.off("error", onFirstError);
      client.off("close", onFirstClose);
      resolve(client);
    };
    // Refusals that retrying cannot fix (bad credentials, unsupported protocol) fail start-up.
    const onFirstError = (error: Error & { code?: unknown }) => {
      if (typeof error.code !== "number" || error.code === 0) return;
      // 1: a 3.1.1 broker's "unacceptable protocol version"; 132: an MQTT 5 broker's.
      if (fallback && (error.code === 1 || error.code === 132)) {
        return fail(new ProtocolRefusedError(protocolVersion, error.message));
      }
      const hint = error.code === 1 || error.code === 132
        ? " (set --mqtt-version auto, or 4 for MQTT 3.1.1)"
        : "";
      fail(
        new Error(
          `broker at ${redact(options.url)} refused the connection: ${error.message}${hint}`,
        ),
      );
    };
    const onFirstClose = () => {
      if (fallback && !networkError && !accepted) {
        fail(new ProtocolRefusedError(protocolVersion, "it closed the connection unanswered"));
      }
    };
    client.once("connect", onConnect);
    client.on("error", onFirstError);
    // Before the logging listener above resets what the attempt saw.
    client.prependListener("close", onFirstClose);
  });
}

/**
 * Drops a message of ours once {@linkcode MAX_SEND_TRIES} accepted
 * connections have ended while it was sent and unacknowledged; its sender
 * is told (the promise of its publish rejects).
 */
function boundResends(client: MqttClient): void {
  const sentNow = new Map<number, string>();
  const tries = new Map<number, number>();
  let accepted = false;
  client.on("packetreceive", (packet: Packet) => {
    if (packet.cmd === "connack") accepted = (packet.reasonCode ?? packet.returnCode ?? 0) === 0;
    if (packet.cmd === "puback" || packet.cmd === "pubcomp" || packet.cmd === "pubrec") {
      if (packet.messageId !== undefined) tries.delete(packet.messageId);
    }
  });
  client.on("packetsend", (packet: Packet) => {
    if (packet.cmd === "publish" && packet.qos > 0 && packet.messageId !== undefined) {
      sentNow.set(packet.messageId, packet.topic);
    }
  });
  client.prependListener("close", () => {
    if (accepted) {
      for (const [id, topic] of sentNow) {
        const pending = client.outgoing[id];
        if (!pending) {
          tries.delete(id);
          continue;
        }
        const count = (tries.get(id) ?? 0) + 1;
        tries.set(id, count);
        if (count < MAX_SEND_TRIES) continue;
        tries.delete(id);
        delete client.outgoing[id];
        client.outgoingStore.del({ messageId: id } as never, () => {});
        log.warn(
          "Dropped a message to {topic}: the broker closed the connection {count} times while it " +
            "was unacknowledged (does the broker refuse it?)",
          { topic, count },
        );
        pending.cb(
          new Error(`dropped after ${count} connections ended with it unacknowledged`),
          undefined as never,
        );
      }
    }
    sentNow.clear();
    accepted = false;
  });
}

/** Words for an MQTT 5 DISCONNECT reason code that came without a reason string. */
function reasonText(code: number): string {
  const known: Record<number, string> = {
    128: "unspecified error",
    129: "malformed packet",
    130: "protocol error",
    131: "implementation specific error",
    135: "not authorized",
    137: "server busy",
    139: "server shutting down",
    141: "keep alive timeout",
    142: "session taken over",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
    158: "shared subscriptions not supported",
  };
  return known[code] ?? "see the broker's log";
}

/** Messages on a topic of a probe, taken before the handler sees them: by client. */
const probes = new WeakMap<MqttClient, Map<string, (payload: Uint8Array) => void>>();

/**
 * Replaces the client's message hook (which runs before the acknowledgement)
 * with one that waits for the handler: the client reads no further packet
 * until it returns, so a message is never acknowledged before it is handled.
 * A probe's messages go to the probe at once.
 */
function holdMessagesFor(client: MqttClient, handler: Promise<MessageHandler>): void {
  let ready: MessageHandler | undefined;
  handler.then((h) => ready = h, () => {});
  const taps = new Map<string, (payload: Uint8Array) => void>();
  probes.set(client, taps);
  client.handleMessage = (packet, callback) => {
    const tap = taps.get(packet.topic);
    if (tap) {
      tap(packet.payload as Uint8Array);
      callback();
      return;
    }
    if (ready) {
      ready(packet.topic, packet.payload as Uint8Array, packet);
      callback();
      return;
    }
    handler.then(
      (h) => {
        h(packet.topic, packet.payload as Uint8Array, packet);
        callback();
      },
      (error) => callback(error),
    );
  };
}

/** How long the probe for shared subscriptions waits for its own message. */
const PROBE_MS = 5000;

/**
 * Why the broker cannot split requests between the members of a share
 * group, or undefined when it can. An MQTT 5 CONNACK says so (Shared
 * Subscription Available); with MQTT 3.1.1 a probe finds out: it subscribes
 * `$share/{group}/{topic}` and publishes on `topic`, which a broker without
 * shared subscriptions refuses or never delivers (it takes `$share/...` as
 * a topic of its own).
 */
export async function sharedSubscriptionRefusal(
  client: MqttClient,
  group: string,
  topic: string,
): Promise<string | undefined> {
  if (protocolOf(client) === 5) {
    return client.serverProperties?.sharedSubscriptionAvailable === false
      ? "the broker says it has no shared subscriptions (its MQTT 5 CONNACK)"
      : undefined;
  }
  const filter = `$share/${group}/${topic}`;
  const nonce = crypto.randomUUID();
  const arrived = Promise.withResolvers<void>();
  const taps = probes.get(client)!;
  taps.set(topic, (payload) => {
    if (new TextDecoder().decode(payload) === nonce) arrived.resolve();
  });
  try {
    const granted = await client.subscribeAsync(filter, { qos: 1 });
    if (granted.some((grant) => grant.qos >= 128)) {
      return `the broker refused the subscription ${filter}`;
    }
    await client.publishAsync(topic, nonce, { qos: 1 });
    const timer = Promise.withResolvers<"timeout">();
    const id = setTimeout(() => timer.resolve("timeout"), PROBE_MS);
    const outcome = await Promise.race([arrived.promise, timer.promise]);
    clearTimeout(id);
    return outcome === "timeout"
      ? `a message published on ${topic} did not arrive through ${filter} within ` +
        `${PROBE_MS / 1000} s: the broker has no shared subscriptions (MQTT 3.1.1 probe)`
      : undefined;
  } finally {
    await client.unsubscribeAsync(filter).catch(() => {});
    taps.delete(topic);
  }
}

/**
 * Tells a fight over our client id from ordinary disconnects. Two instances
 * with one id knock each other off for ever; the newcomer should stop. It
 * knows it is the newcomer when, in {@link TakeoverWatch.STRIKES}
 * connections in a row, an instance with its id that started earlier showed
 * itself during the connection (its `online` status, or its Last Will fired
 * by our taking its session over) and the connection was then closed within
 * {@link TakeoverWatch.QUICK_MS} of being accepted: the other one
 * reconnected, taking the id back, each time.
 *
 * Only what the other instance said after our own `online` came back to us
 * counts: our announcement replaced the retained status, so an older
 * instance's status seen after it was published after it, by a live
 * instance. A run that is gone left a retained `online` (it stopped while the
 * broker was down) or a Will that fires as we take its session; both come
 * before our announcement, and must not make a broker restart look like a
 * takeover. An MQTT 5 broker that says "session taken over" is believed at
 * once. A network that drops connections shows no such announcement, and is
 * ridden out like any other.
 */
export class TakeoverWatch {
  static readonly QUICK_MS = 2000;
  static readonly STRIKES = 2;

  #connectedAt: number | undefined;
  #olderInstance = false;
  #strikes = 0;
  #announced = false;

  /** Our own `online` came back to us: it is the retained status now. */
  announced(): void {
    this.#announced = true;
  }

  /** A status of an instance with our client id that started before us arrived. */
  olderInstanceSeen(): void {
    if (this.#announced) this.#olderInstance = true;
  }

  /** The broker accepted the connection at `now`; what an earlier one saw is forgotten. */
  connected(now: number): void {
    this.#connectedAt = now;
    this.#olderInstance = false;
  }

  /**
   * The connection ended at `now` (`takenOver`: an MQTT 5 broker said so,
   * which mosquitto 2.0 does not); whether to stop.
   */
  closed(now: number, takenOver: boolean): boolean {
    const quick = this.#connectedAt !== undefined &&
      now - this.#connectedAt < TakeoverWatch.QUICK_MS;
    this.#connectedAt = undefined;
    if (quick && takenOver) return true;
    this.#strikes = quick && this.#olderInstance ? this.#strikes + 1 : 0;
    return this.#strikes >= TakeoverWatch.STRIKES;
  }
}

/**
 * Nagle's algorithm holds small packets for ~40 ms on loopback; replies are
 * small packets. The `mqtt` client does not disable it, so do it on each socket.
 */
function setNoDelay(client: MqttClient): void {
  const stream = client.stream as unknown as { setNoDelay?: (on: boolean) => void };
  stream.setNoDelay?.(true);
}

/** A URL without its password, for log lines. */
export function redact(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return url;
  }
}
