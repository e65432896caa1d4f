/**
 * The program's one MQTT connection: options from the configuration (auth,
 * TLS, Last Will, persistent session), TCP no-delay on every socket, and
 * reconnection with exponential backoff and jitter.
 *
 * @module
 */

import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { logger } from "../log.ts";

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
  let failures = 0;
  client.on("connect", () => {
    failures = 0;
    client.options.reconnectPeriod = firstDelay;
    setNoDelay(client);
  });
  client.on("close", () => {
    // Exponential backoff with full jitter, so many instances do not reconnect in step.
    failures++;
    const ceiling = Math.min(maxDelay, firstDelay * 2 ** failures);
    client.options.reconnectPeriod = Math.max(firstDelay, Math.round(Math.random() * ceiling));
  });
  client.on("error", (error) => log.warn("MQTT error: {message}", { message: error.message }));

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
