/**
 * Audio with a message (`audio`): real clips of each format taken (WAV, MP3,
 * FLAC, Ogg Opus, Ogg Vorbis) and of two refused (WebM, M4A), made once with
 * real encoders (tests/fixtures/audio/README.md says how); a real mosquitto,
 * the service as a child process, and either a stand-in engine that records
 * what it is sent (and can play a model that takes no audio, as vLLM answers
 * for one) or the simulated engine. Unit tests of the checks come first.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { parseConfig } from "../lib/config/config.ts";
import { audioPart, heardAudio } from "../lib/engine/audio_content.ts";
import { userContent } from "../lib/engine/multimodal.ts";
import { startSimulator } from "../lib/engine/simulator.ts";
import { vllmArgs } from "../lib/engine/vllm_supervisor.ts";
import {
  audioMarker,
  audioTokens,
  parseAudio,
  payloadRoomForAudio,
} from "../lib/protocol/audio.ts";
import { readAudioHeader } from "../lib/protocol/audio_header.ts";
import { payloadRoomForImages } from "../lib/protocol/images.ts";
import { parseRequest, type RequestLimits } from "../lib/protocol/request.ts";
import {
  mosquittoTest as test,
  type ServiceProcess,
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

const FIXTURES = new URL("./fixtures/audio/", import.meta.url);
const clip = (name: string) => Deno.readFileSync(new URL(name, FIXTURES));

const WAV = clip("hello.wav");
const MP3 = clip("hello.mp3");
const MP3_VBR = clip("hello_vbr.mp3");
const MP3_BARE = clip("hello_bare.mp3");
const FLAC = clip("hello.flac");
const OPUS = clip("hello.opus");
const VORBIS = clip("hello.ogg");
const WEBM = clip("hello.webm");
const M4A = clip("hello.m4a");

const base64 = (bytes: Uint8Array) => (bytes as unknown as { toBase64(): string }).toBase64();
const dataUrl = (type: string, bytes: Uint8Array) => `data:${type};base64,${base64(bytes)}`;
const ascii = (text: string) => new TextEncoder().encode(text);

/** The source the fixtures were made from: 18,701 samples at 22,050 Hz. */
const SPOKEN = 0.848125;
/** The MP3s: 26 frames of 576 samples at 16 kHz (the encoder's delay and padding included). */
const MP3_SECONDS = 26 * 576 / 16_000;

// ---------------------------------------------------------------------------------------------
// Unit tests.

const LIMITS = { maxAudioClips: 2, maxAudioBytes: 16_384, maxAudioMs: 5_000 };

Deno.test("audio: format, codec, rate and duration read from real clips' headers", () => {
  const read = (bytes: Uint8Array) => {
    const header = readAudioHeader(bytes);
    assert(header);
    return { ...header, seconds: Math.round(header.seconds * 1e6) / 1e6 };
  };
  const fixed = { estimated: false, channels: 1 };
  deepEqual(read(WAV), { kind: "wav", codec: "pcm", sampleRate: 8000, seconds: SPOKEN, ...fixed });
  deepEqual(read(FLAC), {
    kind: "flac",
    codec: "flac",
    sampleRate: 8000,
    seconds: SPOKEN,
    ...fixed,
  });
  // Opus: the granule position less the pre-skip, at 48 kHz; the rate is the input's.
  deepEqual(read(OPUS), {
    kind: "ogg",
    codec: "opus",
    sampleRate: 16000,
    seconds: SPOKEN,
    ...fixed,
  });
  deepEqual(read(VORBIS), {
    kind: "ogg",
    codec: "vorbis",
    sampleRate: 16000,
    seconds: SPOKEN,
    ...fixed,
  });
  // From the Info frame of a CBR file and the Xing frame of a VBR one.
  for (const mp3 of [MP3, MP3_VBR]) {
    deepEqual(read(mp3), {
      kind: "mp3",
      codec: "mp3",
      sampleRate: 16000,
      seconds: MP3_SECONDS,
      ...fixed,
    });
  }
  // Without one: the size over the first frame's bitrate, said to be an estimate.
  const bare = read(MP3_BARE);
  equal(bare.estimated, true);
  equal(bare.seconds, MP3_BARE.length * 8 / 24_000);
  // Formats the engine does not decode are not read as audio.
  equal(readAudioHeader(WEBM), undefined);
  equal(readAudioHeader(M4A), undefined);
});

Deno.test("audio: each clip is checked by its content; a refusal names its index and what was found", () => {
  const ok = parseAudio([dataUrl("audio/wav", WAV), base64(OPUS)], LIMITS);
  assert(ok.ok, ok.ok ? "" : ok.message);
  deepEqual(
    ok.audio.map(({ kind, codec, bytes, seconds }) => ({ kind, codec, bytes, seconds })),
    [
      { kind: "wav", codec: "pcm", bytes: WAV.length, seconds: SPOKEN },
      { kind: "ogg", codec: "opus", bytes: OPUS.length, seconds: SPOKEN },
    ],
  );
  // A data URL naming the real type goes on as it came; bare base64 gets its real type.
  equal(ok.audio[0].url, dataUrl("audio/wav", WAV));
  equal(ok.audio[1].url, dataUrl("audio/ogg", OPUS));
  // Other names of the same types, parameters, and claims that say nothing are taken.
  for (
    const url of [
      dataUrl("audio/x-wav", WAV),
      `data:audio/ogg;codecs=opus;base64,${base64(OPUS)}`,
      dataUrl("application/octet-stream", FLAC),
      `data:;base64,${base64(MP3)}`,
    ]
  ) {
    const outcome = parseAudio([url], LIMITS);
    assert(outcome.ok, `${url.slice(0, 40)}: ${outcome.ok ? "" : outcome.message}`);
    // What goes on is `data:{type};base64,`: vLLM reads what follows the first ';' as the encoding.
    match(outcome.audio[0].url, /^data:audio\/[a-z-]+;base64,[A-Za-z0-9+/]/);
  }

  const refused = (audio: unknown, limits = LIMITS) => {
    const outcome = parseAudio(audio, limits);
    assert(!outcome.ok, `accepted: ${JSON.stringify(audio).slice(0, 100)}`);
    return outcome.message;
  };
  // Renamed: a WAV sent as an MP3, an MP3 as an Ogg.
  equal(
    refused([dataUrl("audio/mpeg", WAV)]),
    "'audio[0]' says it is audio/mpeg but is a WAV (by its header)",
  );
  equal(
    refused([dataUrl("audio/wav", WAV), dataUrl("audio/ogg", MP3)]),
    "'audio[1]' says it is audio/ogg but is an MP3 (by its header)",
  );
  // What browsers record: named, with the conversion that makes it one the engine decodes.
  match(
    refused([dataUrl("audio/webm", WEBM)]),
    /^'audio\[0\]' is a WebM \(Matroska\) file, which the engine does not decode: send WAV, MP3, FLAC or Ogg \(Opus or Vorbis\), e\.g\. ffmpeg -i clip\.webm -c:a copy clip\.ogg/,
  );
  match(
    refused([base64(M4A)]),
    /^'audio\[0\]' is an MP4\/M4A file, which the engine does not decode/,
  );
  // Damaged: cut inside its header, or its first frame followed by nonsense.
  equal(
    refused([dataUrl("audio/flac", FLAC.subarray(0, 20))]),
    "'audio[0]' is a FLAC whose header is damaged or cut short",
  );
  equal(
    refused([dataUrl("audio/ogg", OPUS.subarray(0, 40))]),
    "'audio[0]' is an Ogg whose header is damaged or cut short",
  );
  equal(
    refused([dataUrl("audio/wav", WAV.subarray(0, 36))]),
    "'audio[0]' is a WAV whose header is damaged or cut short",
  );
  // An Ogg's end is looked for near its end only, and with a bounded few checksums: a page's worth
  // of anything after it, or a run of forged page headers, and it is damaged (never scanned whole).
  const roomy = { ...LIMITS, maxAudioBytes: 1 << 20 };
  const concat = (...parts: Uint8Array[]) => {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    parts.reduce((at, p) => (out.set(p, at), at + p.length), 0);
    return out;
  };
  equal(
    refused([base64(concat(OPUS, new Uint8Array(300_000).fill(0x4f)))], roomy),
    "'audio[0]' is an Ogg whose header is damaged or cut short",
  );
  const forged = new Uint8Array(28 * 20);
  for (let at = 0; at < forged.length; at += 28) {
    forged.set([...ascii("OggS"), 0, 0], at);
    forged.set(OPUS.subarray(14, 18), at + 14); // the stream's serial number; granule 0, no segments
  }
  equal(
    refused([base64(concat(OPUS, forged))], roomy),
    "'audio[0]' is an Ogg whose header is damaged or cut short",
  );
  assert(parseAudio([base64(concat(OPUS, forged.subarray(0, 28 * 8)))], roomy).ok);
  const mangled = MP3.slice();
  mangled.fill(0x55, 45 + 100, 45 + 400);
  equal(
    refused([dataUrl("audio/mpeg", mangled)]),
    "'audio[0]' is an MP3 whose header is damaged or cut short",
  );
  // A WAV of a codec the engine does not decode (0x0055: MP3 inside RIFF).
  const wavMp3 = WAV.slice();
  new DataView(wavMp3.buffer).setUint16(20, 0x0055, true);
  match(
    refused([base64(wavMp3)]),
    /^'audio\[0\]' is a WAV holding codec 0x0055, which the engine does not decode/,
  );
  match(
    refused([dataUrl("audio/wav", ascii("hello, not a clip"))]),
    /^'audio\[0\]' is not a WAV, MP3, FLAC or Ogg clip \(its first bytes are 68 65 6c 6c\)/,
  );
  // Limits: clips per request, bytes per clip (before decoding), seconds together.
  equal(
    refused([WAV, WAV, WAV].map((b) => base64(b))),
    "'audio' holds 3 clips, more than the limit of 2 per request",
  );
  equal(
    refused([dataUrl("audio/wav", WAV)], { ...LIMITS, maxAudioBytes: 10_000 }),
    `'audio[0]' is ${
      WAV.length.toLocaleString("en-US")
    } bytes, more than the limit of 10,000 (--max-audio-bytes)`,
  );
  equal(
    refused([base64(WAV), base64(FLAC)], { ...LIMITS, maxAudioMs: 1_500 }),
    "'audio' lasts 1.70 s together, more than the limit of 1.50 s (--max-audio-duration)",
  );
  equal(
    refused([base64(MP3_BARE)], { ...LIMITS, maxAudioMs: 900 }),
    "'audio[0]' lasts 0.94 s (estimated from an MP3's bitrate: it has no Xing or VBRI header), more than the limit of 0.90 s (--max-audio-duration)",
  );
  match(refused([dataUrl("audio/wav", WAV)], { ...LIMITS, maxAudioClips: 0 }), /takes no audio/);
  match(refused(["data:audio/wav;base64,@@@@"]), /^'audio\[0\]' is not valid base64/);
  match(refused(["https://example.com/hello.wav"]), /^'audio\[0\]' is neither a data:audio/);
  match(refused("abc"), /^'audio' must be a list/);
  match(refused([42]), /^'audio\[0\]' must be a string/);
});

Deno.test("audio: a request takes clips in both field styles; null is none; audio alone is a message", () => {
  const limits: RequestLimits = {
    maxPayloadBytes: 1 << 20,
    maxMessageChars: 1000,
    maxPriority: 10,
    maxTokens: 100,
    temperature: 0.6,
    topP: 0.9,
    stream: true,
    maxAudioClips: 2,
    maxAudioBytes: 1 << 16,
    maxAudioMs: 30_000,
  };
  const parse = (body: unknown) =>
    parseRequest(
      new TextEncoder().encode(JSON.stringify(body)),
      "maze",
      "maze/assistant_response/",
      limits,
    );
  const v1 = parse({ session_id: "s", message: "listen", audio: [dataUrl("audio/wav", WAV)] });
  assert(v1.ok);
  equal(v1.request.audio?.[0].kind, "wav");
  const camel = parse({ sessionId: "s", message: "listen", audio: [base64(FLAC)] });
  assert(camel.ok);
  equal(camel.request.style, "text");
  equal(camel.request.audio?.[0].kind, "flac");
  const none = parse({ session_id: "s", message: "hi", audio: null });
  assert(none.ok);
  equal(none.request.audio, undefined);
  const alone = parse({ sessionId: "s", audio: [base64(OPUS)] });
  assert(alone.ok);
  equal(alone.request.message, "");
  const bad = parse({ session_id: "s", request_id: "r", audio: [dataUrl("audio/mpeg", WAV)] });
  assert(!bad.ok);
  equal(bad.error.code, "invalid_request");
  equal(bad.error.message, "'audio[0]' says it is audio/mpeg but is a WAV (by its header)");
  deepEqual([bad.address?.sessionId, bad.address?.requestId], ["s", "r"]);
  // Without audio limits (a caller that sets none), audio is not taken.
  const { maxAudioClips: _, ...withoutAudio } = limits;
  const off = parseRequest(
    new TextEncoder().encode(JSON.stringify({ session_id: "s", audio: [base64(WAV)] })),
    "maze",
    "maze/assistant_response/",
    withoutAudio,
  );
  assert(!off.ok);
  match(off.error.message, /takes no audio/);
});

Deno.test("audio: WAV and MP3 go as input_audio parts, FLAC and Ogg as audio_url data URLs; the marker names each", () => {
  const checked = parseAudio(
    [base64(WAV), base64(MP3), base64(FLAC), base64(VORBIS)],
    { ...LIMITS, maxAudioClips: 4, maxAudioBytes: 1 << 20 },
  );
  assert(checked.ok);
  deepEqual(checked.audio.map(audioPart), [
    { type: "input_audio", input_audio: { data: base64(WAV), format: "wav" } },
    { type: "input_audio", input_audio: { data: base64(MP3), format: "mp3" } },
    { type: "audio_url", audio_url: { url: dataUrl("audio/flac", FLAC) } },
    { type: "audio_url", audio_url: { url: dataUrl("audio/ogg", VORBIS) } },
  ]);
  // Beside images: the text, the images, then the clips.
  deepEqual(
    userContent("look and listen", ["data:image/png;base64,iVBORw0KGgo="], [checked.audio[2]]),
    [
      { type: "text", text: "look and listen" },
      { type: "image_url", image_url: { url: "data:image/png;base64,iVBORw0KGgo=" } },
      { type: "audio_url", audio_url: { url: dataUrl("audio/flac", FLAC) } },
    ],
  );
  equal(userContent("just text", undefined, []), "just text");
  equal(
    audioMarker(checked.audio),
    `[4 audio clips attached: wav 0.85 s, 14 KB; mp3 0.94 s, 3.0 KB; flac 0.85 s, 16 KB; ` +
      `ogg 0.85 s, 5.4 KB]`,
  );
  // What the simulated engine says it heard, from the parts it was sent.
  equal(
    heardAudio([{ role: "user", content: checked.audio.map(audioPart) }]),
    ` Heard 4 audio clips: wav/pcm 0.85 s, ${WAV.length.toLocaleString("en-US")} bytes, ` +
      `mp3 0.94 s, ${MP3.length.toLocaleString("en-US")} bytes, ` +
      `flac 0.85 s, ${FLAC.length.toLocaleString("en-US")} bytes, ` +
      `ogg/vorbis 0.85 s, ${VORBIS.length.toLocaleString("en-US")} bytes.`,
  );
});

Deno.test("audio: managed vLLM gets --limit-mm-per-prompt with audio for an audio model, beside images", () => {
  const argsOf = (argv: string[]) => {
    const parsed = parseConfig(argv, {});
    assert(!parsed.help);
    return vllmArgs(parsed.config, 8000);
  };
  const limitOf = (args: string[]) => args[args.indexOf("--limit-mm-per-prompt") + 1];
  equal(
    limitOf(argsOf(["--audio-model", "--max-audio-clips=2", "--max-audio-bytes=64KiB"])),
    '{"audio":2}',
  );
  equal(
    limitOf(argsOf(["--audio-model", "--vision-model", "--max-images=3"])),
    '{"image":3,"audio":1}',
  );
  assert(!argsOf([]).includes("--limit-mm-per-prompt"));
  let error: Error | undefined;
  try {
    parseConfig(["--audio-model", "--max-audio-clips=0"], {});
  } catch (e) {
    error = e as Error;
  }
  match(String(error?.message), /'--audio-model' needs '--max-audio-clips' above 0/);
});

Deno.test("audio: the payload limit leaves room for images and audio together (defaults agree; a config that does not is refused)", () => {
  const configOf = (argv: string[]) => {
    const parsed = parseConfig(argv, {});
    assert(!parsed.help);
    return parsed.config;
  };
  // No audio unless asked for: an audio model takes a clip; the option says how many otherwise.
  equal(configOf([]).maxAudioClips, 0);
  equal(configOf(["--max-audio-clips=3", "--max-audio-bytes=64KiB"]).maxAudioClips, 3);
  const config = configOf(["--audio-model"]);
  deepEqual([config.maxAudioClips, config.maxAudioBytes, config.maxAudioMs], [1, 1 << 20, 30_000]);
  const room = payloadRoomForImages(config.maxImages, config.maxImageBytes) +
    payloadRoomForAudio(config.maxAudioClips, config.maxAudioBytes);
  assert(config.maxPayloadBytes >= room, `${config.maxPayloadBytes} < ${room}`);
  let error: Error | undefined;
  try {
    // Room for the images alone (6 MiB, the limit before audio), not for a clip beside them.
    parseConfig(["--max-payload-bytes=6MiB", "--audio-model"], {});
  } catch (e) {
    error = e as Error;
  }
  assert(error, "a 6 MiB payload limit with 4 images and a clip of 1 MiB was accepted");
  match(error.message, /'--max-payload-bytes' \(6291456\).*'--max-audio-clips' \(1\)/s);
  parseConfig(["--max-payload-bytes=6MiB"], {});
  parseConfig(["--max-payload-bytes=2MiB", "--max-images=0", "--audio-model"], {});
});

Deno.test("audio: the container image adds vLLM's audio extra, of the image's own vLLM version", () => {
  const dockerfile = Deno.readTextFileSync(new URL("../vllm.Dockerfile", import.meta.url));
  const image = /^FROM vllm\/vllm-openai:v([\d.]+)$/m.exec(dockerfile)?.[1];
  const extra = /uv pip install --system "vllm\[audio\]==([\d.]+)"/.exec(dockerfile)?.[1];
  assert(image && extra, "vllm.Dockerfile: no vLLM image or no audio extra");
  equal(extra, image);
});

Deno.test("audio: token estimate follows Qwen2-Audio's 25 a second", () => {
  equal(audioTokens(30), 752);
  equal(audioTokens(SPOKEN), 24);
});

Deno.test("audio: the simulated engine refuses a clip it cannot decode, as vLLM's loader does; it takes one it can", async () => {
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0 });
  try {
    const ask = async (part: unknown) => {
      const response = await fetch(`${sim.url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          messages: [{ role: "user", content: [{ type: "text", text: "hi" }, part] }],
          max_tokens: 64,
        }),
      });
      return { status: response.status, body: await response.json() };
    };
    const garbage = await ask({
      type: "input_audio",
      input_audio: { data: base64(ascii("not a clip")), format: "wav" },
    });
    equal(garbage.status, 400);
    equal(garbage.body.error.type, "BadRequestError");
    match(garbage.body.error.message, /Format not recognised/);
    const webm = await ask({ type: "audio_url", audio_url: { url: dataUrl("audio/webm", WEBM) } });
    equal(webm.status, 400);
    const flac = await ask({ type: "audio_url", audio_url: { url: dataUrl("audio/flac", FLAC) } });
    equal(flac.status, 200);
    match(flac.body.choices[0].message.content, /Heard 1 audio clip: flac 0\.85 s/);
  } finally {
    await sim.close();
  }
});

Deno.test("audio: a clip sent without its base64 padding goes to the engine padded, which vLLM refuses unpadded", async () => {
  // 1,366 bytes: base64 that ends in "==".
  const unpadded = base64(OPUS).replace(/=+$/, "");
  const checked = parseAudio([`data:audio/ogg;base64,${unpadded}`, unpadded], {
    ...LIMITS,
    maxAudioBytes: 1 << 20,
  });
  assert(checked.ok, !checked.ok ? checked.message : "");
  deepEqual(checked.audio.map((clip) => clip.url), [
    dataUrl("audio/ogg", OPUS),
    dataUrl("audio/ogg", OPUS),
  ]);
  // vLLM's audio loader (Python's base64.b64decode) refuses it unpadded: so does the simulator.
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0 });
  try {
    for (
      const part of [
        { type: "audio_url", audio_url: { url: `data:audio/ogg;base64,${unpadded}` } },
        { type: "input_audio", input_audio: { data: base64(WAV).slice(0, -2), format: "wav" } },
      ]
    ) {
      const response = await fetch(`${sim.url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ messages: [{ role: "user", content: [part] }], max_tokens: 8 }),
      });
      equal(response.status, 400);
      equal((await response.json()).error.message, "Incorrect padding");
    }
  } finally {
    await sim.close();
  }
});

// ---------------------------------------------------------------------------------------------
// End to end, against a stand-in engine that records what it is sent.

interface StandIn extends RecordingEngine {
  /**
   * `audio`: answers; `text-only`: refuses as vLLM 0.11 does for a text-only
   * model; `vision-only`: as it does for a model that takes images but no audio.
   */
  mode: "audio" | "text-only" | "vision-only" | "no-loader";
}

const hasAudio = (body: Recorded) =>
  body.messages.some((m) =>
    Array.isArray(m.content) &&
    m.content.some((p) => p?.type === "input_audio" || p?.type === "audio_url")
  );

function startStandIn(): StandIn {
  const standIn = { mode: "audio" as StandIn["mode"] };
  const refusal = (message: string) =>
    Response.json(
      { error: { message, type: "BadRequestError", param: null, code: 400 } },
      { status: 400 },
    );
  const engine = startRecordingEngine({
    text: "Heard.",
    usage: { prompt_tokens: 300, completion_tokens: 2 },
    refuse: (body) => {
      if (!hasAudio(body)) return undefined;
      // vLLM's words: the processor's ValueError, with its cause ("None") appended.
      if (standIn.mode === "text-only") return refusal("stand-in is not a multimodal model None");
      if (standIn.mode === "vision-only") {
        return refusal("At most 0 audio(s) may be provided in one prompt. None");
      }
      // A vLLM without its audio extra, where the loader's ImportError reaches the client.
      if (standIn.mode === "no-loader") {
        return Response.json({
          error: {
            message: "Please install vllm[audio] for audio support",
            type: "InternalServerError",
            param: null,
            code: 500,
          },
        }, { status: 500 });
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

test("a clip of each format reaches the engine as the part vLLM takes; the next turn's history holds their marker, not them", async () => {
  await withStandIn(
    ["--max-audio-clips=5", "--max-audio-bytes=64KiB"],
    async ({ engine, client }) => {
      const wav = dataUrl("audio/wav", WAV);
      await client.send("maze/user_input", {
        session_id: "s1",
        request_id: "r1",
        message: "What did I say?",
        audio: [wav, base64(MP3), dataUrl("audio/flac", FLAC), base64(OPUS), base64(VORBIS)],
      });
      const done = (await client.final("s1", "r1")).json!;
      equal(done.type, "done", JSON.stringify(done));
      deepEqual(lastUserContent(engine), [
        { type: "text", text: "What did I say?" },
        { type: "input_audio", input_audio: { data: base64(WAV), format: "wav" } },
        { type: "input_audio", input_audio: { data: base64(MP3), format: "mp3" } },
        { type: "audio_url", audio_url: { url: dataUrl("audio/flac", FLAC) } },
        { type: "audio_url", audio_url: { url: dataUrl("audio/ogg", OPUS) } },
        { type: "audio_url", audio_url: { url: dataUrl("audio/ogg", VORBIS) } },
      ]);
      // The engine's usage is reported as it counted (audio included).
      equal((done.usage as { prompt_tokens: number }).prompt_tokens, 300);

      await client.send("maze/user_input", { session_id: "s1", request_id: "r2", message: "And?" });
      equal((await client.final("s1", "r2")).json!.type, "done");
      const history = engine.requests.at(-1)!.messages;
      equal(
        history.find((m) => m.role === "user")!.content,
        "What did I say?\n[5 audio clips attached: wav 0.85 s, 14 KB; mp3 0.94 s, 3.0 KB; " +
          "flac 0.85 s, 16 KB; ogg 0.85 s, 1.4 KB; ogg 0.85 s, 5.4 KB]",
      );
      assert(!JSON.stringify(history).includes(base64(WAV).slice(0, 64)), "a clip was replayed");
      equal(lastUserContent(engine), "And?");

      // A clip alone, in the original's form, is a message; the answer comes as text.
      await client.send("maze/user_input", {
        sessionId: "s2",
        requestId: "q1",
        audio: [base64(WAV)],
        replyTopic: "maze/assistant_response/s2/client/q1",
      });
      const reply = await client.next((m) => m.topic === "maze/assistant_response/s2/client/q1");
      equal(reply.text, "Heard.");
      deepEqual(lastUserContent(engine), [
        { type: "input_audio", input_audio: { data: base64(WAV), format: "wav" } },
      ]);
    },
  );
});

test("a renamed, a corrupt, a WebM, too many, too large and too long a clip are refused with their reasons; nothing reaches the engine", async () => {
  await withStandIn([
    "--max-audio-clips=2",
    "--max-audio-bytes=14000",
    "--max-audio-duration=1.5s",
  ], async ({ engine, client }) => {
    const refusal = async (id: string, audio: unknown[]) => {
      await client.send("maze/user_input", {
        session_id: "bad",
        request_id: id,
        message: "listen",
        audio,
      });
      const reply = (await client.final("bad", id)).json!;
      equal(reply.type, "error", JSON.stringify(reply));
      const error = reply.error as { code: string; message: string };
      equal(error.code, "invalid_request");
      return error.message;
    };
    const wav = dataUrl("audio/wav", WAV);
    equal(
      await refusal("renamed", [wav, dataUrl("audio/mpeg", OPUS)]),
      "'audio[1]' says it is audio/mpeg but is an Ogg (by its header)",
    );
    equal(
      await refusal("corrupt", [dataUrl("audio/flac", FLAC.subarray(0, 30))]),
      "'audio[0]' is a FLAC whose header is damaged or cut short",
    );
    match(
      await refusal("webm", [dataUrl("audio/webm;codecs=opus", WEBM)]),
      /^'audio\[0\]' is a WebM \(Matroska\) file, which the engine does not decode/,
    );
    equal(
      await refusal("many", [wav, wav, wav]),
      "'audio' holds 3 clips, more than the limit of 2 per request",
    );
    equal(
      await refusal("large", [dataUrl("audio/flac", FLAC)]),
      `'audio[0]' is ${
        FLAC.length.toLocaleString("en-US")
      } bytes, more than the limit of 14,000 (--max-audio-bytes)`,
    );
    equal(
      await refusal("long", [wav, base64(MP3)]),
      "'audio' lasts 1.78 s together, more than the limit of 1.50 s (--max-audio-duration)",
    );
    equal(engine.requests.length, 0);
  });
});

test("a model that takes no audio: its refusal is a clear invalid_request, not retried; text still works", async () => {
  await withStandIn(["--max-audio-clips=1"], async ({ engine, client }) => {
    const cases = [
      [
        "text-only",
        /^the served model does not accept audio; send text \(the engine answered 400: stand-in is not a multimodal model/,
      ],
      [
        "vision-only",
        /^the served model does not accept audio; send text \(the engine answered 400: At most 0 audio\(s\)/,
      ],
    ] as const;
    for (const [mode, expected] of cases) {
      engine.mode = mode;
      const before = engine.requests.length;
      await client.send("maze/user_input", {
        session_id: mode,
        request_id: "spoken",
        message: "listen",
        audio: [base64(WAV)],
      });
      const reply = (await client.final(mode, "spoken")).json!;
      const error = reply.error as { code: string; message: string };
      equal(error?.code, "invalid_request", JSON.stringify(reply));
      match(error.message, expected);
      equal(engine.requests.length - before, 1, `${mode}: retried`);
      await client.send("maze/user_input", { session_id: mode, request_id: "txt", message: "hi" });
      equal((await client.final(mode, "txt")).json!.type, "done");
      // The refused turn left nothing in the history.
      equal(engine.requests.at(-1)!.messages.length, 2);
    }
    // A vLLM that cannot decode audio at all: said so, not retried (it would fail again), and the
    // engine is not taken for down: text goes on being answered.
    engine.mode = "no-loader";
    const before = engine.requests.length;
    await client.send("maze/user_input", {
      session_id: "loader",
      request_id: "spoken",
      message: "listen",
      audio: [base64(WAV)],
    });
    const error = (await client.final("loader", "spoken")).json!.error as {
      code: string;
      message: string;
    };
    equal(error.code, "internal");
    match(error.message, /^the engine cannot decode audio: vLLM lacks its audio extra/);
    equal(engine.requests.length - before, 1, "retried");
    await client.send("maze/user_input", { session_id: "loader", request_id: "t", message: "hi" });
    equal((await client.final("loader", "t")).json!.type, "done");
  });
});

// ---------------------------------------------------------------------------------------------
// End to end with the simulated engine.

test("with the simulated engine the answer says what it heard (format, duration, bytes); the next turn carries the marker", async () => {
  await withService(
    { args: ["--max-audio-clips=2", "--max-audio-bytes=64KiB"] },
    async ({ client, sim }) => {
      await client.send("maze/user_input", {
        session_id: "sim",
        request_id: "1",
        message: "what did I say?",
        audio: [dataUrl("audio/ogg", OPUS), dataUrl("audio/mpeg", MP3_BARE)],
      });
      const done = (await client.final("sim", "1")).json!;
      equal(
        String(done.response).replace(/^.*?Turn 1: /, ""),
        `you said "what did I say?". Heard 2 audio clips: ogg/opus 0.85 s, ${
          OPUS.length.toLocaleString("en-US")
        } bytes, mp3 ~0.94 s, ${MP3_BARE.length.toLocaleString("en-US")} bytes.`,
      );
      // The clips count in the prompt as Qwen2-Audio's would: 25 tokens a second, 2 around each.
      await client.send("maze/user_input", {
        session_id: "sim2",
        request_id: "1",
        message: "what did I say?",
      });
      const text = (await client.final("sim2", "1")).json!.usage as { prompt_tokens: number };
      const usage = done.usage as { prompt_tokens: number };
      equal(
        usage.prompt_tokens - text.prompt_tokens,
        audioTokens(SPOKEN) + audioTokens(MP3_BARE.length * 8 / 24_000),
      );
      await client.send("maze/user_input", { session_id: "sim", request_id: "2", message: "and?" });
      const next = (await client.final("sim", "2")).json!;
      equal(next.type, "done");
      assert(!String(next.response).includes("Heard"), String(next.response));
      const replayed = sim.received.at(-1)!.messages as { role: string; content: unknown }[];
      equal(
        replayed[1].content,
        "what did I say?\n[2 audio clips attached: ogg 0.85 s, 1.4 KB; mp3 ~0.94 s, 2.8 KB]",
      );
    },
  );
});
