/**
 * Images with a message (`images`): real PNG and JPEG files made here, a real
 * mosquitto, the service as a child process, and either a stand-in engine
 * that records what it is sent (and can play a text-only model) or the
 * simulated engine. Unit tests of the checks come first.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { parseConfig } from "../lib/config/config.ts";
import { startSimulator } from "../lib/engine/simulator.ts";
import { vllmArgs } from "../lib/engine/vllm_supervisor.ts";
import { readImageHeader } from "../lib/protocol/image_header.ts";
import {
  imageMarker,
  imageTokens,
  parseImages,
  payloadRoomForImages,
} from "../lib/protocol/images.ts";
import { parseRequest, type RequestLimits } from "../lib/protocol/request.ts";
import {
  mosquittoTest as test,
  removeTempDir,
  type ServiceProcess,
  startService,
  tempDir,
  type TestClient,
  withService,
} from "./_helpers.ts";
import {
  lastUserContent,
  type Recorded,
  type RecordingEngine,
  startRecordingEngine,
  withRecordingEngine,
} from "./_recording_engine.ts";

// ---------------------------------------------------------------------------------------------
// Images made by hand.

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

const u32 = (n: number) => {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, n);
  return bytes;
};
const ascii = (text: string) => new TextEncoder().encode(text);

function chunk(type: string, data: Uint8Array): Uint8Array {
  const body = concat(ascii(type), data);
  return concat(u32(data.length), body, u32(crc32(body)));
}

async function deflate(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([bytes as BlobPart]).stream().pipeThrough(
    new CompressionStream("deflate"),
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** A real PNG: 8-bit RGB, every scanline filter 0, a gradient; `size` pads it with a comment. */
async function makePng(width: number, height: number, size?: number): Promise<Uint8Array> {
  const ihdr = concat(u32(width), u32(height), new Uint8Array([8, 2, 0, 0, 0]));
  const raw = new Uint8Array(height * (1 + width * 3));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) raw[y * (1 + width * 3) + 1 + x * 3] = (x * 4) & 0xff;
  }
  const parts = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", await deflate(raw)),
  ];
  const end = chunk("IEND", new Uint8Array(0));
  if (size !== undefined) {
    const used = parts.reduce((n, p) => n + p.length, 0) + end.length + 12;
    assert(size >= used + 5, `a PNG of ${size} bytes is too small`);
    parts.push(
      chunk("tEXt", concat(ascii("Comment\0"), new Uint8Array(size - used - 8).fill(0x61))),
    );
  }
  return concat(...parts, end);
}

/** A JPEG's markers: SOI, APP0 (JFIF), DQT, SOF0 with the size, DHT, SOS and EOI. */
function makeJpeg(width: number, height: number): Uint8Array {
  const segment = (marker: number, data: number[]) =>
    new Uint8Array([0xff, marker, (data.length + 2) >> 8, (data.length + 2) & 0xff, ...data]);
  return concat(
    new Uint8Array([0xff, 0xd8]),
    segment(0xe0, [...ascii("JFIF\0"), 1, 1, 0, 0, 1, 0, 1, 0, 0]),
    segment(0xdb, [0, ...new Array(64).fill(1)]),
    segment(0xc0, [8, height >> 8, height & 0xff, width >> 8, width & 0xff, 1, 1, 0x11, 0]),
    segment(0xc4, [0, ...new Array(16).fill(0).map((_, i) => (i === 0 ? 1 : 0)), 0]),
    segment(0xda, [1, 1, 0, 0, 63, 0]),
    new Uint8Array([0x00, 0xff, 0xd9]),
  );
}

const base64 = (bytes: Uint8Array) => (bytes as unknown as { toBase64(): string }).toBase64();
const dataUrl = (type: string, bytes: Uint8Array) => `data:image/${type};base64,${base64(bytes)}`;

const PNG = await makePng(64, 48);
const JPEG = makeJpeg(320, 240);

// ---------------------------------------------------------------------------------------------
// Unit tests.

const LIMITS = { maxImages: 2, maxImageBytes: 8192, remoteImages: false };

Deno.test("images: headers read from real files (PNG IHDR, JPEG SOF0, GIF, WebP)", () => {
  deepEqual(readImageHeader(PNG), { kind: "png", width: 64, height: 48 });
  deepEqual(readImageHeader(JPEG), { kind: "jpeg", width: 320, height: 240 });
  const gif = concat(ascii("GIF89a"), new Uint8Array([0x20, 0x01, 0xc8, 0x00, 0, 0, 0]));
  deepEqual(readImageHeader(gif), { kind: "gif", width: 288, height: 200 });
  const vp8x = concat(
    ascii("RIFF"),
    u32(30),
    ascii("WEBPVP8X"),
    new Uint8Array([10, 0, 0, 0, 0, 0, 0, 0, 0x3f, 0x01, 0x00, 0xef, 0x00, 0x00]),
  );
  deepEqual(readImageHeader(vp8x), { kind: "webp", width: 320, height: 240 });
  // Cut short after the signature: a PNG, but its header cannot be read.
  equal(readImageHeader(PNG.subarray(0, 12)), undefined);
});

Deno.test("images: each is checked, and a refusal names its index and reason", () => {
  const ok = parseImages([dataUrl("png", PNG), base64(JPEG)], LIMITS);
  assert(ok.ok);
  deepEqual(ok.images.map(({ kind, width, height, bytes }) => ({ kind, width, height, bytes })), [
    { kind: "png", width: 64, height: 48, bytes: PNG.length },
    { kind: "jpeg", width: 320, height: 240, bytes: JPEG.length },
  ]);
  // Raw base64 goes on as a data URL of its real type; so does a URL claiming another type.
  match(ok.images[1].url, /^data:image\/jpeg;base64,\/9j\//);
  const claimed = parseImages([dataUrl("png", JPEG)], LIMITS);
  assert(claimed.ok);
  match(claimed.images[0].url, /^data:image\/jpeg;base64,/);

  const refused = (images: unknown, limits = LIMITS) => {
    const outcome = parseImages(images, limits);
    assert(!outcome.ok, `accepted: ${JSON.stringify(images).slice(0, 100)}`);
    return outcome.message;
  };
  match(
    refused([dataUrl("png", PNG), dataUrl("png", ascii("hello, not an image"))]),
    /^'images\[1\]' is not a PNG, JPEG, WebP or GIF image \(its first bytes are 68 65 6c 6c\)/,
  );
  match(
    refused([dataUrl("png", new Uint8Array(9000))]),
    /^'images\[0\]' is 9,000 bytes, more than the limit of 8,192 \(--max-image-bytes\)/,
  );
  match(
    refused([PNG, PNG, PNG].map((p) => dataUrl("png", p))),
    /'images' holds 3 images, more than the limit of 2/,
  );
  match(
    refused(["https://example.com/cat.png"]),
    /^'images\[0\]' is a remote URL, and remote images are off/,
  );
  match(refused(["data:image/png;base64,@@@@"]), /^'images\[0\]' is not valid base64/);
  match(
    refused([dataUrl("png", PNG.subarray(0, 20))]),
    /^'images\[0\]' is a PNG whose header is damaged/,
  );
  match(refused(["file:///etc/passwd"]), /^'images\[0\]' is neither a data:image/);
  match(refused("abc"), /'images' must be a list/);
  match(
    refused([PNG].map((p) => dataUrl("png", p)), { ...LIMITS, maxImages: 0 }),
    /takes no images/,
  );

  const remote = parseImages(["https://example.com/cat.png"], { ...LIMITS, remoteImages: true });
  assert(remote.ok);
  equal(remote.images[0].kind, "remote");
  equal(
    imageMarker(ok.images),
    `[2 images attached: png 64×48, ${PNG.length} B; jpeg 320×240, ${JPEG.length} B]`,
  );
});

Deno.test("images: a request takes them in both field styles; null is none; images alone are a message", () => {
  const limits: RequestLimits = {
    maxPayloadBytes: 1 << 20,
    maxMessageChars: 1000,
    maxPriority: 10,
    maxTokens: 100,
    temperature: 0.6,
    topP: 0.9,
    stream: true,
    maxImages: 4,
    maxImageBytes: 1 << 16,
  };
  const parse = (body: unknown) =>
    parseRequest(
      new TextEncoder().encode(JSON.stringify(body)),
      "maze",
      "maze/assistant_response/",
      limits,
    );
  const v1 = parse({ session_id: "s", message: "look", images: [dataUrl("png", PNG)] });
  assert(v1.ok);
  equal(v1.request.images?.length, 1);
  const camel = parse({ sessionId: "s", message: "look", images: [base64(JPEG)] });
  assert(camel.ok);
  equal(camel.request.style, "text");
  equal(camel.request.images?.[0].kind, "jpeg");
  const none = parse({ session_id: "s", message: "hi", images: null });
  assert(none.ok);
  equal(none.request.images, undefined);
  const alone = parse({ sessionId: "s", images: [base64(PNG)] });
  assert(alone.ok);
  equal(alone.request.message, "");
  const bad = parse({ session_id: "s", message: "x", images: [dataUrl("png", PNG), "Zm9v"] });
  assert(!bad.ok);
  equal(bad.error.code, "invalid_request");
  match(bad.error.message, /'images\[1\]' is not a PNG/);
  equal(bad.address?.sessionId, "s");
});

Deno.test("images: the payload limit leaves room for the image limits (defaults agree; a config that does not is refused)", () => {
  const parsed = parseConfig([], {});
  assert(!parsed.help);
  const { config } = parsed;
  equal(config.maxImages, 4);
  equal(config.maxImageBytes, 1048576);
  assert(
    config.maxPayloadBytes >= payloadRoomForImages(config.maxImages, config.maxImageBytes),
    `${config.maxPayloadBytes} < ${payloadRoomForImages(config.maxImages, config.maxImageBytes)}`,
  );
  let error: Error | undefined;
  try {
    parseConfig(["--max-payload-bytes=65536"], {});
  } catch (e) {
    error = e as Error;
  }
  assert(error, "a 64 KiB payload limit with 4 images of 1 MiB was accepted");
  match(error.message, /'--max-payload-bytes'.*'--max-images'.*'--max-image-bytes'/s);
  // Without images, or with images small enough, it is fine.
  parseConfig(["--max-payload-bytes=65536", "--max-images=0"], {});
  parseConfig(["--max-payload-bytes=65536", "--max-images=2", "--max-image-bytes=16384"], {});
});

Deno.test("images: managed vLLM gets --limit-mm-per-prompt as JSON for a vision model, not otherwise", () => {
  const argsOf = (argv: string[]) => {
    const parsed = parseConfig(argv, {});
    assert(!parsed.help);
    return vllmArgs(parsed.config, 8000);
  };
  const vision = argsOf([
    "--model=Qwen/Qwen2.5-VL-7B-Instruct",
    "--vision-model",
    "--max-images=3",
  ]);
  const at = vision.indexOf("--limit-mm-per-prompt");
  assert(at > 0, vision.join(" "));
  equal(vision[at + 1], '{"image":3}');
  assert(!argsOf([]).includes("--limit-mm-per-prompt"));
});

Deno.test("images: token estimate follows Qwen2.5-VL's 28-pixel patches", () => {
  equal(imageTokens(64, 48), 6);
  equal(imageTokens(1280, 720), 46 * 26 + 2);
  // Large images are scaled down to at most 16,384 patches.
  assert(imageTokens(8000, 8000) <= 16_386);
});

// ---------------------------------------------------------------------------------------------
// End to end, against a stand-in engine that records what it is sent.

interface StandIn extends RecordingEngine {
  /** `vision` answers; `text-only` refuses images as vLLM does for a text-only model. */
  mode: "vision" | "text-only" | "text-only-old";
}

const hasImages = (body: Recorded) =>
  body.messages.some((m) =>
    Array.isArray(m.content) && m.content.some((p) => p?.type === "image_url")
  );

function startStandIn(): StandIn {
  const standIn = { mode: "vision" as StandIn["mode"] };
  const engine = startRecordingEngine({
    text: "Answer.",
    usage: { prompt_tokens: 400, completion_tokens: 3 },
    refuse: (body) => {
      if (!hasImages(body)) return undefined;
      if (standIn.mode === "text-only") {
        return Response.json({
          error: {
            message: "stand-in is not a multimodal model None",
            type: "BadRequestError",
            param: null,
            code: 400,
          },
        }, { status: 400 });
      }
      if (standIn.mode === "text-only-old") {
        // vLLM before 0.10.1: the error at the top level.
        return Response.json({
          object: "error",
          message: "stand-in is not a multimodal model None",
          type: "BadRequestError",
          param: null,
          code: 400,
        }, { status: 400 });
      }
    },
  });
  return Object.assign(standIn, engine);
}

/** Runs `fn` against a fresh broker, stand-in engine, service (one worker) and client. */
const withStandIn = (
  args: string[],
  fn: (f: { engine: StandIn; client: TestClient; service: ServiceProcess }) => Promise<void>,
) => withRecordingEngine(startStandIn(), args, fn);

test("a PNG and a JPEG reach the engine as content parts; the next turn's history holds their marker, not them", async () => {
  await withStandIn([], async ({ engine, client }) => {
    const png = dataUrl("png", PNG);
    await client.send("maze/user_input", {
      session_id: "s1",
      request_id: "r1",
      message: "What do you see?",
      images: [png, base64(JPEG)],
    });
    const done = (await client.final("s1", "r1")).json!;
    equal(done.type, "done", JSON.stringify(done));
    deepEqual(lastUserContent(engine), [
      { type: "text", text: "What do you see?" },
      { type: "image_url", image_url: { url: png } },
      { type: "image_url", image_url: { url: `data:image/jpeg;base64,${base64(JPEG)}` } },
    ]);
    // The engine's usage is reported as it counted (images included).
    equal((done.usage as { prompt_tokens: number }).prompt_tokens, 400);

    await client.send("maze/user_input", {
      session_id: "s1",
      request_id: "r2",
      message: "And now?",
    });
    equal((await client.final("s1", "r2")).json!.type, "done");
    const history = engine.requests.at(-1)!.messages;
    const earlier = history.find((m) => m.role === "user")!;
    equal(
      earlier.content,
      `What do you see?\n[2 images attached: png 64×48, ${PNG.length} B; jpeg 320×240, ${JPEG.length} B]`,
    );
    assert(!JSON.stringify(history).includes("base64"), "an image was replayed");
    equal(lastUserContent(engine), "And now?");
  });
});

test("the OwOGPT client's request (camelCase, raw base64, no text) reaches the model and is answered as text", async () => {
  await withStandIn([], async ({ engine, client }) => {
    await client.send("maze/user_input", {
      sessionId: "owo",
      requestId: "q1",
      message: "",
      images: [base64(PNG)],
      replyTopic: "maze/assistant_response/owo/client/q1",
      clientId: "owogpt_backend",
    });
    const reply = await client.next((m) => m.topic === "maze/assistant_response/owo/client/q1");
    equal(reply.text, "Answer.");
    deepEqual(lastUserContent(engine), [
      { type: "image_url", image_url: { url: `data:image/png;base64,${base64(PNG)}` } },
    ]);
  });
});

test("vLLM: an image sent without its base64 padding reaches vLLM padded (it decodes with validate=True)", async () => {
  // A PNG whose base64 needs padding, sent without it.
  let png = PNG;
  while (png.length % 3 === 0) png = concat(png, new Uint8Array([0]));
  const unpadded = base64(png).replace(/=+$/, "");
  await withService({}, async ({ sim, client }) => {
    await client.send("maze/user_input", {
      session_id: "pad",
      message: "what is this?",
      images: [`data:image/png;base64,${unpadded}`],
    });
    const done = await client.final("pad");
    equal(done.json!.type, "done", JSON.stringify(done.json));
    const parts = (sim.received.at(-1)!.messages as { content: unknown }[]).at(-1)!.content as {
      image_url?: { url: string };
    }[];
    equal(parts[1].image_url!.url, `data:image/png;base64,${base64(png)}`);
  });
  // The simulator refuses what vLLM refuses: the unpadded image, top_p 0.
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0 });
  try {
    const chat = (body: Record<string, unknown>) =>
      fetch(`${sim.url}/chat/completions`, { method: "POST", body: JSON.stringify(body) });
    const image = await chat({
      messages: [{
        role: "user",
        content: [{ type: "image_url", image_url: { url: `data:image/png;base64,${unpadded}` } }],
      }],
    });
    equal(image.status, 400);
    equal((await image.json()).error.message, "Incorrect padding");
    const topP = await chat({ messages: [{ role: "user", content: "hi" }], top_p: 0 });
    equal(topP.status, 400);
    equal((await topP.json()).error.message, "top_p must be in (0, 1], got 0.0.");
  } finally {
    await sim.close();
  }
});

test("vLLM: a prompt that only its images make too long is refused inside a 200 stream (v0.11.0's decoder-prompt error)", async () => {
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0, maxModelLen: 256 });
  try {
    const big = dataUrl("jpeg", makeJpeg(1024, 1024));
    const response = await fetch(`${sim.url}/chat/completions`, {
      method: "POST",
      body: JSON.stringify({
        stream: true,
        max_tokens: 16,
        messages: [{
          role: "user",
          content: [{ type: "text", text: "hi" }, { type: "image_url", image_url: { url: big } }],
        }],
      }),
    });
    equal(response.status, 200);
    const events = (await response.text()).split("\n\n").filter((e) => e.startsWith("data: "));
    equal(events.at(-1), "data: [DONE]");
    const { error } = JSON.parse(events[0].slice(6));
    equal(error.code, 400);
    match(
      error.message,
      /^The decoder prompt \(length \d+\) is longer than the maximum model length of 256\./,
    );
  } finally {
    await sim.close();
  }
});

test("wrong magic bytes, a too-large image, too many images and a remote URL are refused with their reasons; nothing reaches the engine", async () => {
  await withStandIn(["--max-images=2", "--max-image-bytes=4096"], async ({ engine, client }) => {
    const refusal = async (id: string, images: unknown[]) => {
      await client.send("maze/user_input", {
        session_id: "bad",
        request_id: id,
        message: "look",
        images,
      });
      const reply = (await client.final("bad", id)).json!;
      equal(reply.type, "error", JSON.stringify(reply));
      const error = reply.error as { code: string; message: string };
      equal(error.code, "invalid_request");
      return error.message;
    };
    const png = dataUrl("png", PNG);
    match(
      await refusal("magic", [png, `data:image/png;base64,${base64(ascii("<svg></svg>"))}`]),
      /'images\[1\]' is not a PNG, JPEG, WebP or GIF image/,
    );
    match(
      await refusal("large", [dataUrl("png", await makePng(64, 48, 5000))]),
      /'images\[0\]' is 5,000 bytes, more than the limit of 4,096 \(--max-image-bytes\)/,
    );
    match(
      await refusal("many", [png, png, png]),
      /'images' holds 3 images, more than the limit of 2/,
    );
    match(
      await refusal("remote", [png, "http://169.254.169.254/latest/meta-data"]),
      /'images\[1\]' is a remote URL, and remote images are off/,
    );
    equal(engine.requests.length, 0);
  });
});

test("a text-only model's refusal of images is a clear invalid_request, not retried; text still works", async () => {
  await withStandIn([], async ({ engine, client }) => {
    for (const mode of ["text-only", "text-only-old"] as const) {
      engine.mode = mode;
      const before = engine.requests.length;
      await client.send("maze/user_input", {
        session_id: mode,
        request_id: "img",
        message: "look",
        images: [dataUrl("png", PNG)],
      });
      const reply = (await client.final(mode, "img")).json!;
      const error = reply.error as { code: string; message: string };
      equal(error?.code, "invalid_request", JSON.stringify(reply));
      match(error.message, /the served model does not accept images/);
      equal(engine.requests.length - before, 1, `${mode}: retried`);
      await client.send("maze/user_input", { session_id: mode, request_id: "txt", message: "hi" });
      equal((await client.final(mode, "txt")).json!.type, "done");
      // The refused turn left nothing in the history.
      equal(engine.requests.at(-1)!.messages.length, 2);
    }
  });
});

// ---------------------------------------------------------------------------------------------
// End to end with the simulated engine, and the default limits.

test("with the simulated engine the answer says what the images are; the payload limit takes what the image limits allow", async () => {
  await withService({}, async ({ client, sim }) => {
    await client.send("maze/user_input", {
      session_id: "sim",
      request_id: "1",
      message: "what is this?",
      images: [dataUrl("png", PNG), dataUrl("jpeg", JPEG)],
    });
    const done = (await client.final("sim", "1")).json!;
    match(
      String(done.response),
      /you said "what is this\?"\. Saw 2 images: png 64×48, jpeg 320×240\./,
    );
    const usage = done.usage as { prompt_tokens: number };
    // 6 tokens for 64×48, 11 × 9 + 2 for 320×240, over the text.
    await client.send("maze/user_input", {
      session_id: "sim2",
      request_id: "1",
      message: "what is this?",
    });
    const text = (await client.final("sim2", "1")).json!.usage as { prompt_tokens: number };
    equal(usage.prompt_tokens - text.prompt_tokens, imageTokens(64, 48) + imageTokens(320, 240));
    // The next turn carries the marker.
    await client.send("maze/user_input", { session_id: "sim", request_id: "2", message: "and?" });
    equal((await client.final("sim", "2")).json!.type, "done");
    const replayed = sim.received.at(-1)!.messages as { role: string; content: unknown }[];
    match(String(replayed[1].content), /^what is this\?\n\[2 images attached: png 64×48/);

    // Four images of exactly --max-image-bytes (the default, 1 MiB) fit the default payload limit.
    const big = dataUrl("png", await makePng(64, 48, 1048576));
    await client.send("maze/user_input", {
      session_id: "big",
      request_id: "1",
      message: "four at the limit",
      images: [big, big, big, big],
    });
    const four = (await client.final("big", "1", 30_000)).json!;
    equal(four.type, "done", JSON.stringify(four).slice(0, 300));
    match(String(four.response), /Saw 4 images: png 64×48, png 64×48, png 64×48, png 64×48\./);
    // One byte more is refused for the image, not for the payload.
    const over = dataUrl("png", await makePng(64, 48, 1048577));
    await client.send("maze/user_input", {
      session_id: "big",
      request_id: "2",
      message: "one over",
      images: [big, big, big, over],
    });
    const error = (await client.final("big", "2", 30_000)).json!.error as {
      code: string;
      message: string;
    };
    equal(error.code, "invalid_request");
    match(error.message, /'images\[3\]' is 1,048,577 bytes, more than the limit of 1,048,576/);
  });
});

test("a payload limit too small for the image limits stops the start, naming both", async () => {
  const dataDir = await tempDir("vllm-mqtt-images-");
  try {
    const service = await startService(
      ["--engine=sim", `--data-dir=${dataDir}`, "--max-payload-bytes=65536"],
      { expectExit: true },
    );
    const code = await service.stop();
    equal(code, 2);
    match(
      service.log(),
      /'--max-payload-bytes' \(65536\) is too small for what '--max-images' \(4\) and '--max-image-bytes' \(1048576\) allow/,
    );
  } finally {
    await removeTempDir(dataDir);
  }
});
