// The operator's live page: reads /dashboard/events (server-sent events, about once a second)
// and draws it; the "try it" panel posts to /dashboard/try and shows the streamed answer.
// Plain JavaScript, no build step; uPlot comes from npm through the service.
// (Its URL is a variable so that `deno check`, which looks at this folder, does not resolve it.)
const UPLOT_URL = "/dashboard/uplot.js";
const { default: uPlot } = await import(UPLOT_URL);

const HISTORY_S = 300;
const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#db2777", "#0891b2", "#65a30d"];

/** What the page holds; `window.dashboard` for a look from the console (and the tests). */
const view = {
  projects: [],
  points: [],
  charts: {},
  last: null,
  updates: 0,
};
globalThis.dashboard = view;

const $ = (id) => document.getElementById(id);
const setText = (id, value) => {
  const element = $(id);
  const text = String(value);
  if (element && element.textContent !== text) element.textContent = text;
};
const fmt = (value) => value === null || value === undefined ? "–" : String(value);
const sum = (record) => Object.values(record ?? {}).reduce((a, b) => a + b, 0);

function duration(seconds) {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  return `${m}m ${seconds % 60}s`;
}

function pill(id, text, kind) {
  const element = $(id);
  element.textContent = text;
  element.className = `pill ${kind}`;
}

function dot(id, kind) {
  $(id).className = `dot ${kind}`;
}

function bar(id, value, max) {
  const share = max > 0 ? Math.min(1, value / max) : 0;
  const element = $(id);
  element.style.width = `${(share * 100).toFixed(1)}%`;
  element.classList.toggle("high", share >= 0.9);
}

// ---------------------------------------------------------------- charts

function chartWidth(element) {
  return Math.max(280, element.clientWidth);
}

function makeChart(element, series, yLabel) {
  const options = {
    width: chartWidth(element),
    height: 220,
    series: [{}, ...series],
    axes: [
      { stroke: "#8a94a3", grid: { stroke: "rgba(128,128,128,0.12)" } },
      { stroke: "#8a94a3", grid: { stroke: "rgba(128,128,128,0.12)" }, label: yLabel, size: 56 },
    ],
    scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.1)] } },
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
  };
  return new uPlot(options, [[], ...series.map(() => [])], element);
}

function buildCharts() {
  for (const chart of Object.values(view.charts)) chart.destroy();
  const requestsEl = $("chart-requests");
  const latencyEl = $("chart-latency");
  requestsEl.replaceChildren();
  latencyEl.replaceChildren();
  view.charts.requests = makeChart(
    requestsEl,
    view.projects.map((project, i) => ({
      label: project,
      stroke: COLORS[i % COLORS.length],
      width: 2,
      fill: COLORS[i % COLORS.length] + "18",
      value: (_u, v) => v === null ? "–" : v,
    })),
    "req/s",
  );
  view.charts.latency = makeChart(latencyEl, [
    { label: "p50", stroke: "#2563eb", width: 2, value: (_u, v) => v === null ? "–" : `${v} ms` },
    { label: "p95", stroke: "#dc2626", width: 2, value: (_u, v) => v === null ? "–" : `${v} ms` },
    {
      label: "first delta p50",
      stroke: "#16a34a",
      width: 2,
      dash: [6, 4],
      value: (_u, v) => v === null ? "–" : `${v} ms`,
    },
  ], "ms");
  drawCharts();
}

function drawCharts() {
  const points = view.points;
  const xs = points.map((p) => p.t);
  view.charts.requests?.setData([
    xs,
    ...view.projects.map((project) => points.map((p) => p.requests[project] ?? 0)),
  ]);
  view.charts.latency?.setData([
    xs,
    points.map((p) => p.p50_ms),
    points.map((p) => p.p95_ms),
    points.map((p) => p.ttft_p50_ms),
  ]);
}

function addPoint(point) {
  const last = view.points.at(-1);
  if (last && point.t <= last.t) return;
  view.points.push(point);
  if (view.points.length > HISTORY_S) view.points.splice(0, view.points.length - HISTORY_S);
  drawCharts();
}

new ResizeObserver(() => {
  for (const [name, chart] of Object.entries(view.charts)) {
    const element = $(`chart-${name}`);
    chart.setSize({ width: chartWidth(element), height: 220 });
  }
}).observe(document.querySelector(".charts"));

// ---------------------------------------------------------------- numbers

function render(update) {
  const { state, summary } = update;
  view.last = update;
  view.updates++;

  pill("status", state.status, state.status === "online" ? "on" : "wait");
  setText("model", state.model);
  setText("instance", `instance ${state.instance.id}`);
  document.title = `vllm-mqtt · ${state.instance.id}`;

  const engine = state.engine;
  setText("engine-state", engine.state);
  dot("engine-dot", engine.ready ? "good" : engine.state === "starting" ? "wait" : "bad");
  setText("engine-mode", engine.mode);
  setText("engine-circuit", engine.circuit);
  setText("engine-outages", engine.outages);
  const restarts = Object.entries(engine.restarts ?? {});
  setText(
    "engine-restarts",
    restarts.length === 0
      ? "0"
      : `${sum(engine.restarts)} (${restarts.map(([k, v]) => `${k}: ${v}`).join(", ")})`,
  );
  renderEngines(engine.engines ?? []);

  setText("broker-connected", state.broker.connected ? "connected" : "disconnected");
  dot("broker-dot", state.broker.connected ? "good" : "bad");
  setText("broker-url", state.broker.url);
  setText("broker-reconnects", summary?.broker_reconnects ?? 0);
  setText(
    "storage",
    state.storage.available ? "writable" : state.storage.reason ?? "not yet checked",
  );

  const q = state.queue;
  setText("queued", q.queued);
  setText("max-queue", q.max_queue);
  bar("queued-bar", q.queued, q.max_queue);
  setText("in-flight", q.in_flight);
  setText("max-in-flight", q.max_in_flight);
  bar("in-flight-bar", q.in_flight, q.max_in_flight);
  setText("live-sessions", state.live_sessions);
  setText("max-sessions", state.max_sessions);
  bar("sessions-bar", state.live_sessions, state.max_sessions);

  setText("uptime", duration(state.instance.uptime_s));
  setText("share-group", state.instance.share_group ?? "none");

  if (!summary) return;
  setText("total-answered", summary.totals.answered);
  setText("total-errors", sum(summary.totals.errors));
  const ignored = summary.totals.ignored;
  setText("total-ignored", `${ignored.duplicate ?? 0}, ${ignored.retained ?? 0}`);
  setText("total-superseded", ignored.superseded ?? 0);
  setText("window-label", `last ${summary.window_s} s`);
  renderProjects(summary);
  renderErrors(summary);
  renderExperiments(update.experiments ?? []);
}

// ---------------------------------------------------------------- experiments

const pct = (share) => share === null || share === undefined ? "–" : `${(share * 100).toFixed(1)}%`;
const num = (value, digits = 2) =>
  value === null || value === undefined
    ? "–"
    : String(Math.round(value * 10 ** digits) / 10 ** digits);
/** An estimate and its interval; JSON has no infinity, so an open end comes as null. */
function interval(i, show) {
  if (!i) return "–";
  return `${show(i.value)} [${show(i.low)}, ${show(i.high)}]`;
}

const EXPERIMENT_COLUMNS = [
  ["variant", (v) => v.name],
  ["sessions", (v) => v.sessions],
  ["requests", (v) => v.requests],
  ["mean score", (v) => interval(v.meanScore, (x) => num(x))],
  ["feedback rate", (v) => interval(v.feedbackRate, pct)],
  ["error rate", (v) => interval(v.errorRate, pct)],
  ["errors", (v) => Object.entries(v.errors).map(([c, n]) => `${c} ${n}`).join(", ") || "0"],
  ["first delta p50/p95 ms", (v) => `${fmt(v.ttfdMs.p50)} / ${fmt(v.ttfdMs.p95)}`],
  ["total p50/p95 ms", (v) => `${fmt(v.totalMs.p50)} / ${fmt(v.totalMs.p95)}`],
  ["tokens in/out", (v) => `${v.tokensIn} / ${v.tokensOut}`],
  ["parse failures", (v) => `${v.parseFailures} (${pct(v.parseFailureRate.value)})`],
  ["turns/session", (v) => interval(v.turnsPerSession, (x) => num(x, 1))],
];

function renderExperiments(panels) {
  $("experiments").hidden = panels.length === 0;
  $("experiment-list").replaceChildren(...panels.map((panel) => {
    const article = document.createElement("article");
    article.className = "experiment";
    article.dataset.project = panel.project;
    const title = document.createElement("h3");
    title.textContent = `${panel.project} · experiment ${panel.experiment}`;
    const table = document.createElement("table");
    const head = document.createElement("tr");
    // The status second: a stopped variant shows at a glance, however wide the table.
    const names = EXPERIMENT_COLUMNS.map(([name]) => name);
    for (const name of [names[0], "status", ...names.slice(1)]) {
      const th = document.createElement("th");
      th.textContent = name;
      head.append(th);
    }
    table.createTHead().append(head);
    const body = table.createTBody();
    for (const v of panel.figures.variants) {
      const row = document.createElement("tr");
      row.dataset.variant = v.name;
      const cells = EXPERIMENT_COLUMNS.map(([name, value]) => {
        const cell = document.createElement("td");
        cell.dataset.column = name;
        cell.textContent = String(value(v));
        return cell;
      });
      const status = document.createElement("td");
      status.dataset.column = "status";
      const stopped = panel.stopped[v.name];
      status.textContent = panel.winner === v.name
        ? "winner: every session"
        : stopped !== undefined
        ? `stopped: ${stopped}`
        : v.name === panel.figures.baseline
        ? "baseline"
        : "running";
      status.className = stopped !== undefined ? "bad status" : "status";
      row.append(cells[0], status, ...cells.slice(1));
      body.append(row);
    }
    const verdicts = document.createElement("ul");
    verdicts.className = "verdicts";
    for (const verdict of panel.figures.verdicts) {
      const item = document.createElement("li");
      item.dataset.variant = verdict.variant;
      item.dataset.outcome = verdict.outcome;
      const basis = verdict.metric === "feedback_score"
        ? `mean feedback score, ${num(verdict.difference.value)} against ${verdict.baseline}`
        : `error rate, ${pct(verdict.difference.value)} against ${verdict.baseline}`;
      const strong = document.createElement("b");
      strong.textContent = verdict.text;
      item.append(strong, ` (${basis})`);
      verdicts.append(item);
    }
    // Wider than the page on a narrow screen: the table scrolls, the page does not.
    const scroll = document.createElement("div");
    scroll.className = "scroll";
    scroll.append(table);
    article.append(title, scroll, verdicts);
    return article;
  }));
}

/** Several engines: one line each, with its state, load and routing. */
function renderEngines(engines) {
  const list = $("engine-list");
  list.hidden = engines.length === 0;
  for (const engine of engines) {
    let item = list.querySelector(`li[data-engine="${CSS.escape(engine.id)}"]`);
    if (!item) {
      item = document.createElement("li");
      item.dataset.engine = engine.id;
      const light = document.createElement("span");
      const name = document.createElement("b");
      const detail = document.createElement("small");
      name.textContent = engine.id;
      name.title = engine.url;
      item.append(light, name, detail);
      list.append(item);
    }
    const [light, , detail] = item.children;
    light.className = `dot ${engine.state === "ready" ? "good" : "bad"}`;
    const hit = engine.prefix_hit_rate === null
      ? "–"
      : `${Math.round(engine.prefix_hit_rate * 100)}%`;
    const moved = (engine.decisions.moved_for_load ?? 0) + (engine.decisions.rehomed ?? 0);
    detail.textContent =
      `${engine.state} · in flight ${engine.in_flight} · waiting ${
        fmt(engine.waiting)
      } · cache hits ${hit} · sessions ${engine.sessions} · turns ${engine.turns} (moved in ${moved})` +
      ` · errors ${engine.errors}`;
  }
}

function renderProjects(summary) {
  const body = document.querySelector("#projects tbody");
  const names = Object.keys(summary.projects);
  for (const name of names) if (!view.projects.includes(name)) view.projects.push(name);
  for (const name of names) {
    const p = summary.projects[name];
    let row = body.querySelector(`tr[data-project="${CSS.escape(name)}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.project = name;
      const first = document.createElement("td");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = COLORS[view.projects.indexOf(name) % COLORS.length];
      first.append(swatch, name);
      row.append(first);
      for (const key of ["requests", "rps", "errors", "p50", "p95", "ttft50", "ttft95"]) {
        const cell = document.createElement("td");
        cell.dataset.key = key;
        row.append(cell);
      }
      body.append(row);
    }
    const cell = (key, value) => {
      const element = row.querySelector(`td[data-key="${key}"]`);
      element.textContent = fmt(value);
      return element;
    };
    cell("requests", p.requests);
    cell("rps", p.rps);
    cell("errors", p.errors).classList.toggle("bad", p.errors > 0);
    cell("p50", p.p50_ms);
    cell("p95", p.p95_ms);
    cell("ttft50", p.ttft_p50_ms);
    cell("ttft95", p.ttft_p95_ms);
  }
}

function renderErrors(summary) {
  const body = document.querySelector("#errors tbody");
  const codes = [
    ...new Set([...Object.keys(summary.totals.errors), ...Object.keys(summary.errors)]),
  ]
    .sort();
  $("no-errors").hidden = codes.length > 0;
  body.replaceChildren(...codes.map((code) => {
    const row = document.createElement("tr");
    row.dataset.code = code;
    for (const value of [code, summary.errors[code] ?? 0, summary.totals.errors[code] ?? 0]) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.append(cell);
    }
    return row;
  }));
}

// ---------------------------------------------------------------- the live stream

function connect() {
  const events = new EventSource("/dashboard/events");
  events.addEventListener("open", () => pill("stream-state", "live", "on"));
  events.addEventListener("error", () => pill("stream-state", "reconnecting", "off"));
  events.addEventListener("hello", (event) => {
    const hello = JSON.parse(event.data);
    view.projects = [...hello.projects];
    view.points = hello.history.slice(-HISTORY_S);
    buildCharts();
    setupTryIt(hello);
  });
  events.addEventListener("update", (event) => {
    const update = JSON.parse(event.data);
    render(update);
    if (update.point) addPoint(update.point);
  });
}

// ---------------------------------------------------------------- try it

/** A file as a `data:{its type};base64,` URL; the service checks what it really is. */
function dataUrlOf(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

let trySetUp = false;

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  const id = `dashboard-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
  sessionStorage.setItem("vllm-mqtt-session", id);
  return id;
}

function setupTryIt(hello) {
  $("try-it").hidden = !hello.try_it;
  if (!hello.try_it || trySetUp) return;
  trySetUp = true;
  let sessionId = sessionStorage.getItem("vllm-mqtt-session") ?? newSessionId();
  setText("try-session", sessionId);
  const select = $("try-project");
  for (const project of hello.projects) select.append(new Option(project, project));

  const log = $("try-log");
  const turn = (kind, text) => {
    const element = document.createElement("div");
    element.className = `turn ${kind}`;
    element.textContent = text;
    log.append(element);
    log.scrollTop = log.scrollHeight;
    return element;
  };

  $("try-new").addEventListener("click", () => {
    sessionId = newSessionId();
    setText("try-session", sessionId);
    log.replaceChildren();
  });

  $("try-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("try-message");
    const message = input.value.trim();
    const attached = $("try-audio");
    const clip = attached.files[0];
    // A clip alone is a message, as a client's is.
    if (!message && !clip) return;
    input.value = "";
    attached.value = "";
    const send = $("try-send");
    send.disabled = true;
    turn("user", clip ? `${message}${message ? " " : ""}[${clip.name}]` : message);
    const answer = turn("assistant pending", "");
    const text = document.createTextNode("");
    answer.append(text);
    try {
      const response = await fetch("/dashboard/try", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          project: select.value,
          session_id: sessionId,
          message,
          ...(clip && { audio: [await dataUrlOf(clip)] }),
        }),
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += value;
        let newline;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline);
          buffered = buffered.slice(newline + 1);
          if (line.trim()) show(JSON.parse(line));
        }
      }
      if (buffered.trim()) show(JSON.parse(buffered));
    } catch (error) {
      answer.className = "turn error";
      text.textContent = `Error: ${error.message}`;
    } finally {
      answer.classList.remove("pending");
      answer.dataset.done = "true";
      send.disabled = false;
      input.focus();
    }

    function show(reply) {
      if (reply.type === "delta") {
        text.textContent += reply.delta;
      } else if (reply.type === "done") {
        text.textContent = reply.response;
        const meta = document.createElement("span");
        meta.className = "meta";
        const t = reply.timing;
        meta.textContent = (reply.variant ? `variant ${reply.variant} · ` : "") +
          `${reply.finish_reason} · first delta ${fmt(t.ttft_ms)} ms · ` +
          `total ${t.total_ms} ms · ${reply.usage?.completion_tokens ?? "?"} tokens`;
        answer.append(meta);
        answer.dataset.done = "true";
      } else if (reply.type === "error") {
        answer.className = "turn error";
        text.textContent = `${reply.error.code}: ${reply.error.message}`;
        answer.dataset.done = "true";
      }
      log.scrollTop = log.scrollHeight;
    }
  });
}

connect();
