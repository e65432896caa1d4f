/**
 * The embedded MQTT broker (`npm:aedes`, MQTT 3.1.1 only), started when no
 * broker URL is configured and nothing answers on localhost:1883, so that a
 * first run needs nothing but this program.
 *
 * @module
 */

import { Aedes } from "aedes";
import { createServer, type Server } from "node:net";

/** A running embedded broker. */
export interface EmbeddedBroker {
  readonly port: number;
  close(): Promise<void>;
}

/** Starts an embedded broker on `port` (0: a free one) on the loopback interface. */
export async function startEmbeddedBroker(
  port: number,
  hostname = "127.0.0.1",
): Promise<EmbeddedBroker> {
  const aedes = await Aedes.createBroker();
  const server: Server = createServer((socket) => {
    socket.setNoDelay(true);
    aedes.handle(socket);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, hostname, () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === "object" && address ? address.port : port,
    close: () =>
      new Promise<void>((resolve) => {
        aedes.close(() => server.close(() => resolve()));
      }),
  };
}

/** Whether something accepts TCP connections at `hostname:port`. */
export async function isListening(hostname: string, port: number): Promise<boolean> {
  try {
    const connection = await Deno.connect({ hostname, port });
    connection.close();
    return true;
  } catch {
    return false;
  }
}
