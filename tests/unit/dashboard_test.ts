import { equal } from "node:assert/strict";
import { brokerLabel } from "../../lib/observability/dashboard.ts";

Deno.test("live page: the broker card names the broker and its port, and whether it is embedded", () => {
  const config = { embeddedBrokerPort: 18833 };
  equal(
    brokerLabel(config, { url: "mqtt://127.0.0.1:18833", embedded: true }),
    "mqtt://127.0.0.1:18833 (embedded, started by this program)",
  );
  equal(
    brokerLabel(config, { url: "mqtt://127.0.0.1:1883", embedded: false }),
    "mqtt://127.0.0.1:1883",
  );
  equal(brokerLabel(config), "localhost:18833, or an embedded broker there (not chosen yet)");
});
