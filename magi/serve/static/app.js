// The magi serve page: submit a job, play its chunks as they are written, steer it, cancel it.
// Plain JS, no build step. The video is one CMAF stream: the init segment (stream/init.mp4) is
// appended once, then each chunk's fragments (stream/{k}.m4s), whose timestamps go on where the
// chunk before ended, so MediaSource plays them in its default "segments" mode.
// Progress comes from /v1/videos/{id}/events read with fetch() (EventSource cannot send the
// Authorization header).
"use strict";

const CODEC = 'video/mp4; codecs="avc1.64001f"';
const ENDED = ["completed", "failed", "cancelled"];
const $ = (id) => document.getElementById(id);

// ---- API -------------------------------------------------------------------------------------
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body && body.error;
    const param = error && error.param ? ` (${error.param})` : "";
    throw new Error(error ? `${error.message}${param}` : `HTTP ${response.status}`);
  }
  return body;
}

async function fetchBytes(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.arrayBuffer();
}

// Server-sent events over fetch: calls onEvent(name, data) for each event until the stream ends.
async function readEvents(path, signal, onEvent) {
  const response = await fetch(path, { headers: authHeaders(), signal });
  if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // comment / keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// ---- the player: segments appended in order through MediaSource -------------------------------
class SegmentPlayer {
  constructor(video, jobId) {
    this.video = video;
    this.jobId = jobId;
    this.wanted = 0; // segments known to exist
    this.appended = 0;
    this.finished = false; // the job ended: end the stream once everything is appended
    this.busy = false;
    this.initAppended = false;
    this.source = new MediaSource();
    this.ready = new Promise((resolve) => {
      this.source.addEventListener("sourceopen", () => {
        this.buffer = this.source.addSourceBuffer(CODEC);
        resolve();
      }, { once: true });
    });
    video.src = URL.createObjectURL(this.source);
  }

  // Segment `index` exists: queue it (and any before it not seen yet).
  add(index) {
    this.wanted = Math.max(this.wanted, index + 1);
    this.pump();
  }

  end(segments) {
    this.wanted = Math.max(this.wanted, segments);
    this.finished = true;
    this.pump();
  }

  async pump() {
    if (this.busy) return;
    this.busy = true;
    try {
      await this.ready;
      if (!this.initAppended && this.wanted > 0) {
        await this.append(await fetchBytes(`/v1/videos/${this.jobId}/stream/init.mp4`));
        this.initAppended = true;
      }
      while (this.appended < this.wanted) {
        const bytes = await fetchBytes(`/v1/videos/${this.jobId}/stream/${this.appended}.m4s`);
        await this.append(bytes);
        this.appended += 1;
        this.video.play().catch(() => {}); // muted autoplay; ignore a refused play()
      }
      if (this.finished && this.source.readyState === "open") this.source.endOfStream();
    } catch (error) {
      showMessage(`playback: ${error.message}`, true);
    } finally {
      this.busy = false;
    }
    if (this.appended < this.wanted) this.pump(); // a segment arrived while the last append ran
  }

  append(bytes) {
    return new Promise((resolve, reject) => {
      this.buffer.addEventListener("updateend", resolve, { once: true });
      this.buffer.addEventListener("error", () => reject(new Error("appendBuffer failed")), { once: true });
      this.buffer.appendBuffer(bytes);
    });
  }
}

// ---- the current job -------------------------------------------------------------------------
let current = null; // {id, player, abort, job}

function showMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function seconds(value) {
  return value == null ? "–" : `${Number(value).toFixed(1)} s`;
}

function render(job) {
  current.job = job;
  $("status").textContent = job.status;
  $("status").className = "status " + job.status;
  $("progress").value = job.progress || 0;
  const total = job.chunks_total == null ? "?" : job.chunks_total;
  const steps = job.steps_total == null ? "?" : job.steps_total;
  const queued = job.queue_position == null ? "" : ` · ${job.queue_position} job(s) ahead`;
  $("progress-line").textContent =
    `chunks ${job.chunks_done}/${total} · step ${job.step}/${steps} · frames ${job.frames_done ?? 0} · ${job.status}${queued}`;
  const t = job.timings || {};
  $("timings").textContent = `queue wait ${seconds(t.queue_wait_s)} · first chunk after ` +
    `${seconds(t.time_to_first_chunk_s)} · ${seconds(t.seconds_per_chunk)} per chunk`;
  $("timeline").replaceChildren(...(job.prompt_timeline || []).map((span) => {
    const item = document.createElement("li");
    const to = span.to_chunk == null ? "…" : span.to_chunk;
    const by = span.edit_id == null ? "" : ` (edit ${span.edit_id})`;
    item.textContent = `chunks ${span.from_chunk}–${to}: ${span.prompt}${by}`;
    return item;
  }));
  if (job.status !== "queued" && $("message").textContent === `queued ${job.id}`) {
    showMessage(`${job.status.replace("_", " ")} ${job.id}`); // not "queued" once it runs
  }
  if (job.error) showMessage(`failed: ${job.error.message}`, true);
  const running = !ENDED.includes(job.status);
  $("steer").disabled = !running;
  $("cancel").disabled = !running;
  if (running && !$("steer-from").dataset.edited) {
    const last = job.chunks_total == null ? Infinity : job.chunks_total - 1;
    $("steer-from").value = Math.max(0, Math.min(job.chunks_done, last));
  }
}

async function watch(jobId) {
  if (current) current.abort.abort();
  const player = new SegmentPlayer($("player"), jobId);
  current = { id: jobId, player, abort: new AbortController(), job: null };
  const { signal } = current.abort;
  $("job-id").textContent = jobId;
  $("download").hidden = true;
  $("steer-result").textContent = "";
  delete $("steer-from").dataset.edited;
  let job = null;
  while (!signal.aborted && !(job && ENDED.includes(job.status))) {
    try {
      await readEvents(`/v1/videos/${jobId}/events`, signal, (name, data) => {
        if (name === "chunk") player.add(data.index);
        else if (name === "steer") showMessage(`edit ${data.edit_id}: "${data.prompt}" from chunk ${data.applies_from}`);
        else if (name === "progress" || name === "done") { job = data; render(job); }
      });
    } catch (error) {
      if (signal.aborted) return;
      showMessage(`events: ${error.message}; reconnecting`, true);
    }
    if (!(job && ENDED.includes(job.status))) await new Promise((r) => setTimeout(r, 1000)); // reconnect
  }
  if (signal.aborted) return;
  player.end(job.segments || 0);
  if (job.status !== "failed") await showDownload(jobId);
  refreshJobs();
}

async function showDownload(jobId) {
  const link = $("download");
  const url = `/v1/videos/${jobId}/content`;
  try {
    // A link cannot send the Authorization header: with a key, download through a blob.
    link.href = $("api-key").value.trim() ? URL.createObjectURL(new Blob([await fetchBytes(url)], { type: "video/mp4" })) : url;
    link.download = `${jobId}.mp4`;
    link.hidden = false;
  } catch (error) {
    showMessage(`download: ${error.message}`, true);
  }
}

// ---- forms -----------------------------------------------------------------------------------
async function submit(fields, files = {}) {
  const chosen = Object.entries(files).filter(([, file]) => file);
  let options;
  if (chosen.length) {
    const form = new FormData();
    for (const [name, value] of Object.entries(fields)) if (value !== "") form.append(name, value);
    for (const [name, file] of chosen) form.append(name, file);
    options = { method: "POST", body: form };
  } else {
    const body = {};
    for (const [name, value] of Object.entries(fields)) {
      if (value !== "") body[name] = ["num_frames", "seed"].includes(name) ? Number(value) : value;
    }
    options = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }
  try {
    const job = await api("/v1/videos", options);
    showMessage(`queued ${job.id}`);
    refreshJobs();
    watch(job.id);
  } catch (error) {
    showMessage(error.message, true);
  }
}

async function steer() {
  const fromChunk = Number($("steer-from").value);
  const prompt = $("steer-prompt").value;
  try {
    const edit = await api(`/v1/videos/${current.id}/prompt`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ from_chunk: fromChunk, prompt }),
    });
    const moved = edit.moved ? ` (asked for chunk ${edit.from_chunk}: ${edit.moved})` : "";
    $("steer-result").textContent = `edit ${edit.edit_id} accepted: "${edit.prompt}" from chunk ${edit.applies_from}${moved}`;
    $("steer-result").className = "accepted";
  } catch (error) {
    $("steer-result").textContent = `steer: ${error.message}`;
    $("steer-result").className = "error";
  }
}

async function cancel() {
  try {
    render(await api(`/v1/videos/${current.id}/cancel`, { method: "POST" }));
  } catch (error) {
    showMessage(`cancel: ${error.message}`, true);
  }
}

async function refreshJobs() {
  try {
    const list = await api("/v1/videos?limit=20");
    const rows = list.data.map((job) => {
      const row = document.createElement("tr");
      const open = document.createElement("button");
      open.type = "button";
      open.textContent = job.id;
      open.title = "watch this job";
      open.addEventListener("click", () => watch(job.id));
      const cells = [open, job.status, job.prompt, `${job.chunks_done}/${job.chunks_total ?? "?"}`];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.append(value);
        row.append(cell);
      }
      return row;
    });
    $("jobs").replaceChildren(...rows);
  } catch (error) {
    showMessage(`jobs: ${error.message}`, true);
  }
}

function formFields() {
  return { prompt: $("prompt").value, mode: $("mode").value, num_frames: $("num_frames").value, seed: $("seed").value };
}

// ---- start -----------------------------------------------------------------------------------
function init() {
  const key = $("api-key");
  key.value = localStorage.getItem("magi.apiKey") || "";
  key.addEventListener("change", () => { localStorage.setItem("magi.apiKey", key.value.trim()); refreshJobs(); });
  $("submit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submit(formFields(), { image: $("image").files[0], prefix_video: $("prefix_video").files[0] });
  });
  $("steer-form").addEventListener("submit", (event) => { event.preventDefault(); steer(); });
  $("steer-from").addEventListener("input", () => { $("steer-from").dataset.edited = "1"; });
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", refreshJobs);

  // ?prompt=...&num_frames=...&seed=...&mode=... fills the form; it is never submitted by a page
  // load (a link must not start a job): Submit is focused, one click or Enter away. ?job=ID
  // watches an existing job.
  const query = new URLSearchParams(location.search);
  for (const name of ["prompt", "num_frames", "seed", "mode"]) if (query.has(name)) $(name).value = query.get(name);
  if (query.has("job")) watch(query.get("job"));
  else if (query.has("prompt")) $("submit").focus();
  refreshJobs();
}

init();
