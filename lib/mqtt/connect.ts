/**
 * The program's one MQTT connection: options from the configuration (auth,
 * TLS, Last Will, persistent session), TCP no-delay on every socket, and
 * reconnection with exponential backoff and jitter.
 *
 * @module
 */

import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from "mqtt";
import { backoffDelay } from "../_util.ts";
import { logger } from "../log.ts";

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
  readonly protocolVersion: 4 | 5;
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
 * Connects and resolves once the first CONNACK arrives. Later disconnects are
 * retried for ever with exponential backoff; the client emits `connect` again
 * after each reconnect.
 */
export function connectMqtt(options: ConnectOptions): Promise<MqttClient> {
  const [firstDelay, maxDelay] = options.backoffMs ?? [250, 30_000];
  const persistent = options.persistentSession ?? true;
  const clientOptions: IClientOptions = {
    clientId: options.clientId,
    protocolVersion: options.protocolVersion,
    // With a persistent session we also keep unacknowledged replies and resend them.
    clean: !persistent,
    ...(options.protocolVersion === 5 && persistent &&
      { properties: { sessionExpiryInterval: 3600 } }),
    reconnectPeriod: firstDelay,
    connectTimeout: 10_000,
    keepalive: 30,
    resubscribe: true,
    will: { topic: options.will.topic, payload: options.will.payload, qos: 1, retain: true },
    ...(options.username !== undefined && { username: options.username }),
    ...(options.password !== undefined && { password: options.password }),
    ...(options.tlsCa && { ca: Deno.readTextFileSync(options.tlsCa) }),
    ...(options.tlsCert && { cert: Deno.readTextFileSync(options.tlsCert) }),
    ...(options.tlsKey && { key: Deno.readTextFileSync(options.tlsKey) }),
  };
  const client = mqtt.connect(options.url, clientOptions);
  holdMessagesFor(client, options.handler);
  const { takeover } = options;
  let reported = false;
  let saidTakenOver = false;
  // MQTT 5 brokers may say why (reason code 142, "session taken over"); others just close.
  client.on("disconnect", (packet) => saidTakenOver = packet.reasonCode === 142);
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
    takeover.connected(performance.now());
    failures = 0;
    client.options.reconnectPeriod = firstDelay;
    setNoDelay(client);
  });
  client.on("close", () => {
    // Said once an outage, not at each failed attempt; not at all when we are the ones leaving.
    if (failures === 0 && connectedOnce && !client.disconnecting) {
      log.warn("Lost the connection to the broker; reconnecting");
    }
    // Full jitter, so many instances do not reconnect in step.
    failures++;
    client.options.reconnectPeriod = backoffDelay(failures, {
      firstMs: firstDelay,
      maxMs: maxDelay,
      jitter: "full",
    });
  });
  client.on("error", (error) => {
    if (connectedOnce) return log.warn("MQTT error: {message}", { message: error.message });
    log.warn("Cannot reach the broker at {url}: {message}; retrying", {
      url: redact(options.url),
      message: error.message === "connack timeout"
        ? "it accepted the connection but did not answer as an MQTT broker within 10 s " +
          "(connack timeout): is the program listening there an MQTT broker?"
        : error.message,
    });
  });

  return new Promise((resolve, reject) => {
    const onConnect = () => {
      client.off("error", onFirstError);
      resolve(client);
    };
    // Refusals that retrying cannot fix (bad credentials, unsupported protocol) fail start-up.
    const onFirstError = (error: Error & { code?: number }) => {
      if (typeof error.code === "number" && error.code !== 0) {
        client.off("connect", onConnect);
        client.end(true);
        reject(
          new Error(`broker at ${redact(options.url)} refused the connection: ${error.message}`),
        );
      }
    };
    client.once("connect", onConnect);
    client.on("error", onFirstError);
  });
}

/**
 * Replaces the client's message hook (which runs before the acknowledgement)
 * with one that waits for the handler: the client reads no further packet
 * until it returns, so a message is never acknowledged before it is handled.
 */
function holdMessagesFor(client: MqttClient, handler: Promise<MessageHandler>): void {
  let ready: MessageHandler | undefined;
  handler.then((h) => ready = h, () => {});
  client.handleMessage = (packet, callback) => {
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

/**
 * Tells a fight over our client id from ordinary disconnects. Two instances
 * with one id knock each other off for ever; the newcomer should stop. It
 * knows it is the newcomer when an instance with its id that started earlier
 * showed itself (its `online` status, or its Last Will fired by our taking
 * its session over), and then its own connection is
 * closed within {@link TakeoverWatch.QUICK_MS} of being accepted: the other
 * one reconnected, taking the id back. A network that drops connections
 * shows no such announcement, and is ridden out like any other.
 */
export class TakeoverWatch {
  static readonly QUICK_MS = 2000;

  #connectedAt: number | undefined;
  #olderInstance = false;

  /** An instance with our client id that started before us is (or was lately) online. */
  olderInstanceSeen(): void {
    this.#olderInstance = true;
  }

  /** The broker accepted the connection at `now`. */
  connected(now: number): void {
    this.#connectedAt = now;
  }

  /**
   * The connection ended at `now` (`takenOver`: an MQTT 5 broker said so,
   * which mosquitto 2.0 does not); whether to stop.
   */
  closed(now: number, takenOver: boolean): boolean {
    const quick = this.#connectedAt !== undefined &&
      now - this.#connectedAt < TakeoverWatch.QUICK_MS;
    this.#connectedAt = undefined;
    return quick && (takenOver || this.#olderInstance);
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
