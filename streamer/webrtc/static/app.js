// Sparrow Stream live captions: the camera goes to the server over WebRTC, captions come back on a data channel.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  video: $("video"), placeholder: $("placeholder"), state: $("state"), model: $("model"), start: $("start"),
  every: $("every"), fps: $("fps"), interim: $("interim"), finalLine: $("final-line"),
  interimLine: $("interim-line"), transcript: $("transcript"), message: $("message"),
  lag: $("stat-lag"), tau: $("stat-tau"), dropped: $("stat-dropped"), media: $("stat-media"),
  latency: $("stat-latency"),
};
// A bearer token, when the server wants one, comes in the page's fragment: http://host:8080/#token=...
const token = new URLSearchParams(location.hash.slice(1)).get("token");

let pc = null;
let camera = null;
let channel = null;
let ended = null; // resolves when the server says the stream is over
let config = { iceServers: [] };

function setState(state) {
  ui.state.dataset.state = state;
  ui.state.textContent = state;
}

function say(text, isError = false) {
  ui.message.textContent = text;
  ui.message.classList.toggle("error", isError);
}

function clock(s) {
  const m = Math.floor(s / 60);
  return `${m}:${(s - m * 60).toFixed(1).padStart(4, "0")}`;
}

function transcriptItem(segment) {
  let li = ui.transcript.querySelector(`li[data-segment="${segment}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.segment = segment;
    li.append(document.createElement("time"), document.createElement("span"));
    ui.transcript.append(li);
  }
  return li;
}

function onCaption(msg) {
  const atBottom = ui.transcript.scrollHeight - ui.transcript.scrollTop - ui.transcript.clientHeight < 40;
  const li = transcriptItem(msg.segment_id);
  li.querySelector("time").textContent = `${clock(msg.start)} – ${clock(msg.end)}`;
  li.querySelector("span").textContent = msg.text + (msg.draft_tail ? ` ${msg.draft_tail}` : "");
  if (msg.is_final) {
    li.className = "final";
    ui.finalLine.textContent = msg.text;
    ui.interimLine.textContent = "";
    ui.latency.textContent = `${msg.latency_s.toFixed(2)} s`;
  } else {
    li.className = "pending";
    ui.interimLine.textContent = msg.text + (msg.draft_tail ? ` ${msg.draft_tail}` : "");
  }
  if (atBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function onStats(msg) {
  ui.lag.textContent = `${msg.ingest_lag_s.toFixed(2)} s`;
  ui.tau.textContent = msg.tau ? msg.tau.toFixed(2) : "–";
  ui.dropped.textContent = `${msg.frames_dropped} / ${msg.frames_received}`;
  ui.media.textContent = `${msg.media_processed_s.toFixed(1)} s`;
}

function onMessage(event) {
  const msg = JSON.parse(event.data);
  if (msg.type === "caption") onCaption(msg);
  else if (msg.type === "stats") onStats(msg);
  else if (msg.type === "error") say(`${msg.fatal ? "stream failed" : "warning"}: ${msg.message}`, true);
  else if (msg.type === "event" && msg.event === "stream_started") {
    say(`stream ${msg.stream_id} · ${msg.decoding} decoding · a caption every ${msg.caption_every_s || "–"} s`);
  } else if (msg.type === "event" && msg.event === "stream_end") {
    say(`stream ended: ${msg.detail}`);
    if (ended) ended.resolve();
  }
}

function waitForIceGathering(conn, timeoutMs = 3000) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (conn.iceGatheringState !== "complete") return;
      conn.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    conn.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // go with the candidates gathered so far
  });
}

async function start() {
  ui.start.disabled = true;
  say("");
  setState("connecting");
  try {
    camera = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15, max: 30 } }, audio: false,
    });
    ui.video.srcObject = camera;
    ui.placeholder.classList.add("hidden");

    pc = new RTCPeerConnection({ iceServers: config.iceServers });
    pc.addEventListener("connectionstatechange", () => {
      const s = pc ? pc.connectionState : "closed";
      if (s === "connected") setState("connected");
      else if (s === "failed") { setState("failed"); say("connection lost", true); stop(false); }
      else if (s === "disconnected") setState("connecting");
    });
    channel = pc.createDataChannel("captions");
    channel.onmessage = onMessage;
    for (const track of camera.getVideoTracks()) pc.addTransceiver(track, { direction: "sendonly" });

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch("offer", {
      method: "POST", headers,
      body: JSON.stringify({
        sdp: pc.localDescription.sdp, type: pc.localDescription.type,
        caption_every_s: Number(ui.every.value) || 0, sampling_fps: Number(ui.fps.value) || 0,
        interim: ui.interim.checked, stats_interval_s: 1,
      }),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    await pc.setRemoteDescription(answer);
    ui.start.textContent = "Stop";
    ui.start.classList.add("stop");
    ui.start.disabled = false;
  } catch (err) {
    setState("failed");
    say(`could not start: ${err.message || err}`, true);
    await stop(false);
  }
}

async function stop(graceful = true) {
  ui.start.disabled = true;
  if (graceful && channel && channel.readyState === "open") {
    // ask for the pending caption, wait for the stream's end (or give up after 8 s)
    setState("finishing");
    let resolve;
    const over = new Promise((r) => { resolve = r; });
    ended = { resolve };
    channel.send(JSON.stringify({ type: "end" }));
    await Promise.race([over, new Promise((r) => setTimeout(r, 8000))]);
  }
  ended = null;
  if (pc) { pc.close(); pc = null; }
  channel = null;
  if (camera) { camera.getTracks().forEach((t) => t.stop()); camera = null; }
  ui.video.srcObject = null;
  ui.placeholder.classList.remove("hidden");
  ui.interimLine.textContent = "";
  if (ui.state.dataset.state !== "failed") setState("idle");
  ui.start.textContent = "Start";
  ui.start.classList.remove("stop");
  ui.start.disabled = false;
}

ui.start.addEventListener("click", () => (pc ? stop(true) : start()));
window.addEventListener("pagehide", () => { if (pc) pc.close(); });

fetch("config").then((r) => r.json()).then((c) => {
  config = c;
  ui.model.textContent = `${c.model} · ${c.methods.join(", ")}`;
}).catch(() => say("could not reach the server", true));
