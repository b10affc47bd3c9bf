// The std-daq page: status pushed over one WebSocket (/ws), the REST API with fetch, the live image drawn
// into a canvas from its raw values with the colour map applied here. No framework, no build step.

const LIVE_MIN_INTERVAL_MS = 200; // at most 5 live images a second
const RECONNECT_MS = 1000;

const $ = (id) => document.getElementById(id);

// -- errors: every failed API call or refused request is shown, never dropped ---------------------------
const shownErrors = [];
function showError(text) {
  const stamp = new Date().toLocaleTimeString();
  shownErrors.push(`${stamp} ${text}`);
  while (shownErrors.length > 5) shownErrors.shift();
  const box = $("errors");
  box.textContent = shownErrors.join("\n");
  box.hidden = false;
}

async function callApi(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (exc) {
    const text = `${method} ${path}: the service did not answer (${exc})`;
    showError(text);
    return { status: "error", message: text };
  }
  let answer;
  try {
    answer = await response.json();
  } catch (exc) {
    answer = { status: "error", message: `HTTP ${response.status}: the answer is not JSON` };
  }
  if (!response.ok || answer.status !== "ok") {
    const message = answer.message || `HTTP ${response.status}`;
    showError(`${method} ${path}: ${message}`);
    return { ...answer, status: "error", message };
  }
  return answer;
}

// -- colour maps: 256 RGB entries each ----------------------------------------------------------------
function interpolated(anchors) {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (anchors.length - 1);
    const k = Math.min(Math.floor(x), anchors.length - 2);
    const f = x - k;
    for (let c = 0; c < 3; c++) lut[i * 3 + c] = anchors[k][c] + f * (anchors[k + 1][c] - anchors[k][c]);
  }
  return lut;
}
const COLORMAPS = {
  viridis: interpolated([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]),
  grey: interpolated([[0, 0, 0], [255, 255, 255]]),
  hot: interpolated([[0, 0, 0], [230, 0, 0], [255, 210, 0], [255, 255, 255]]),
};

// -- the live image -----------------------------------------------------------------------------------
const live = { pixels: null, rows: 0, cols: 0, imageId: null, fetching: false, lastFetch: 0, wanted: null };

const TYPED = { uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, int32: Int32Array, float32: Float32Array };

async function fetchLive() {
  if (live.fetching) return;
  live.fetching = true;
  live.lastFetch = performance.now();
  try {
    const side = Math.max(256, Math.min(2048, Math.round($("live-canvas").clientWidth * window.devicePixelRatio)));
    const response = await fetch(`/daq/live/raw?max_side=${side}`, { cache: "no-store" });
    const kind = response.headers.get("Content-Type") || "";
    if (!kind.startsWith("application/octet-stream")) {
      const answer = await response.json().catch(() => ({ message: `HTTP ${response.status}` }));
      $("live-info").textContent = answer.message || "no live image";
      return;
    }
    const [rows, cols] = response.headers.get("X-Shape").split(",").map(Number);
    const Typed = TYPED[response.headers.get("X-Dtype")];
    if (!Typed) throw new Error(`unknown pixel type ${response.headers.get("X-Dtype")}`);
    live.pixels = new Typed(await response.arrayBuffer());
    live.rows = rows;
    live.cols = cols;
    live.imageId = response.headers.get("X-Image-Id");
    live.status = response.headers.get("X-Status");
    live.fullShape = response.headers.get("X-Full-Shape");
    draw();
  } catch (exc) {
    showError(`live image: ${exc}`);
  } finally {
    live.fetching = false;
  }
}

function maybeFetchLive() {
  if (live.wanted === null || live.wanted === live.imageId) return;
  const wait = LIVE_MIN_INTERVAL_MS - (performance.now() - live.lastFetch);
  if (wait > 0) {
    if (!live.timer) live.timer = setTimeout(() => { live.timer = null; maybeFetchLive(); }, wait);
    return;
  }
  fetchLive();
}

function draw() {
  if (!live.pixels) return;
  const canvas = $("live-canvas");
  if (canvas.width !== live.cols || canvas.height !== live.rows) {
    canvas.width = live.cols;
    canvas.height = live.rows;
  }
  const pixels = live.pixels;
  let lo = Number.parseFloat($("range-min").value);
  let hi = Number.parseFloat($("range-max").value);
  if ($("auto-range").checked || Number.isNaN(lo) || Number.isNaN(hi)) {
    lo = Infinity; hi = -Infinity;
    for (let i = 0; i < pixels.length; i++) {
      const v = pixels[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if ($("auto-range").checked) {
      $("range-min").value = lo;
      $("range-max").value = hi;
    }
  }
  const log = $("scale").value === "log";
  const span = hi > lo ? hi - lo : 1;
  const logSpan = Math.log1p(span);
  const lut = COLORMAPS[$("colormap").value] || COLORMAPS.viridis;
  const context = canvas.getContext("2d");
  const out = context.createImageData(live.cols, live.rows);
  const rgba = out.data;
  for (let i = 0; i < pixels.length; i++) {
    let f = (pixels[i] - lo) / span;
    if (f < 0) f = 0; else if (f > 1) f = 1;
    if (log) f = Math.log1p(f * span) / logSpan;
    const k = (f * 255) | 0;
    rgba[i * 4] = lut[k * 3];
    rgba[i * 4 + 1] = lut[k * 3 + 1];
    rgba[i * 4 + 2] = lut[k * 3 + 2];
    rgba[i * 4 + 3] = 255;
  }
  context.putImageData(out, 0, 0);
  const status = live.status === "0" ? "good" : `status ${live.status}`;
  $("live-info").textContent = `image ${live.imageId} (${status}), ${live.fullShape.replace(",", " x ")}` +
    ` shown ${live.rows} x ${live.cols}, range ${lo} to ${hi}`;
  $("live-canvas").dataset.imageId = live.imageId;
}

// -- pushed status ------------------------------------------------------------------------------------
function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = text(value);
  row.appendChild(td);
}

function render(status) {
  $("detector").textContent = status.detector_name;
  const writer = status.writer;
  const acquisition = writer.acquisition;
  $("writer-state").textContent = `writer: ${writer.state}`;
  const info = acquisition.info || {};
  $("acquisition").textContent = info.output_file
    ? `${acquisition.state}: ${acquisition.message} (${info.output_file})` : acquisition.message;
  const stats = acquisition.stats || {};
  const requested = stats.n_write_requested || 0;
  const done = stats.n_write_completed || 0;
  const bar = $("write-progress");
  bar.max = Math.max(1, requested);
  bar.value = Math.min(done, bar.max);
  bar.dataset.state = acquisition.state;
  $("progress-text").textContent = `${done} / ${requested}`;

  const s = status.stats || {};
  const detector = s.detector || {};
  const writerStats = s.writer || {};
  $("rates").textContent = `detector ${text(detector.images_per_second)} images/s ` +
    `(${((detector.bytes_per_second || 0) / 1e6).toFixed(1)} MB/s), writer ${text(writerStats.images_per_second)} images/s` +
    (writerStats.lag_images !== null && writerStats.lag_images !== undefined ? `, ${writerStats.lag_images} images behind` : "");

  const panels = $("service-panels");
  panels.replaceChildren();
  for (const service of status.services || []) {
    const div = document.createElement("div");
    div.className = service.up ? "service" : "service down";
    div.setAttribute("aria-label", `service ${service.service}`);
    const title = document.createElement("h3");
    title.textContent = `${service.service} ${service.up ? "up" : "DOWN"}`;
    div.appendChild(title);
    const body = document.createElement("div");
    const fields = Object.entries(service.fields || {}).map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`);
    body.textContent = service.up ? fields.join(", ") : service.error;
    div.appendChild(body);
    panels.appendChild(div);
  }
  if (!status.broker.connected) showBrokerDown(status.broker.error);

  const tbody = $("requests-body");
  tbody.replaceChildren();
  for (const entry of status.logs || []) {
    const row = document.createElement("tr");
    cell(row, entry.output_file);
    cell(row, entry.n_images);
    cell(row, entry.n_written);
    cell(row, entry.result === "running" ? entry.state : entry.message);
    cell(row, entry.reason);
    tbody.appendChild(row);
  }

  if (status.live) {
    live.wanted = String(status.live.image_id);
    maybeFetchLive();
  } else if (status.live_reason) {
    $("live-info").textContent = status.live_reason;
  }
}

let brokerShown = "";
function showBrokerDown(reason) {
  if (reason && reason !== brokerShown) {
    brokerShown = reason;
    showError(`RabbitMQ: ${reason}`);
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/ws`);
  socket.onopen = () => {
    $("connection").textContent = "connected";
    $("connection").className = "up";
  };
  socket.onmessage = (event) => {
    try {
      render(JSON.parse(event.data));
    } catch (exc) {
      showError(`status: ${exc}`);
    }
  };
  socket.onclose = () => {
    $("connection").textContent = "disconnected: reconnecting";
    $("connection").className = "down";
    setTimeout(connect, RECONNECT_MS);
  };
}

// -- controls -----------------------------------------------------------------------------------------
function optionalInt(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function startWrite(event) {
  event.preventDefault();
  const body = { output_file: $("output-file").value.trim(), n_images: Number($("n-images").value) };
  const runId = optionalInt("run-id");
  const userId = optionalInt("user-id");
  if (runId !== undefined) body.run_id = runId;
  if (userId !== undefined) body.user_id = userId;
  const result = $("write-result");
  result.className = "";
  result.textContent = "sending…";
  const answer = await callApi("POST", "/writer/write_async", body);
  result.className = answer.status === "ok" ? "" : "error";
  result.textContent = answer.status === "ok" ? `${answer.message} (request ${answer.request_id})` : `refused: ${answer.message}`;
}

async function stopWrite() {
  const answer = await callApi("POST", "/writer/stop");
  const result = $("write-result");
  result.className = answer.status === "ok" ? "" : "error";
  result.textContent = answer.message;
}

$("write-form").addEventListener("submit", startWrite);
$("stop-write").addEventListener("click", stopWrite);
for (const id of ["scale", "colormap", "range-min", "range-max", "auto-range"]) {
  $(id).addEventListener("change", draw);
}
connect();
