// The page: text (or digit) to image through /v1/images/generations, and a realtime tab that
// sends webcam frames over WS /v1/stream and shows each result as it comes back.
"use strict";
const $ = (id) => document.getElementById(id);

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab, .panel").forEach((el) => el.classList.remove("active"));
    tab.classList.add("active");
    $(tab.dataset.tab).classList.add("active");
  });
}

fetch("/health").then((r) => r.json()).then((h) => {
  $("model").textContent = `${h.model} · ${h.size || ""} · ${h.status}`;
}).catch(() => {});

function numberOrNull(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { prompt: $("prompt").value, n: numberOrNull("n") || 1 };
  for (const [key, id] of [["steps", "steps"], ["guidance_scale", "guidance"], ["seed", "seed"]]) {
    const v = numberOrNull(id);
    if (v !== null) body[key] = v;
  }
  $("generate").disabled = true;
  $("status").className = "muted";
  $("status").textContent = "generating…";
  const t0 = performance.now();
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    const json = await response.json();
    if (!response.ok) throw new Error(json.error ? json.error.message : response.statusText);
    $("images").replaceChildren(...json.data.map((d) => {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + d.b64_json;
      img.alt = body.prompt;
      return img;
    }));
    $("status").textContent = `${json.data.length} image(s) in ${Math.round(performance.now() - t0)} ms ` +
      `(replica ${response.headers.get("x-streamflow-replica")})`;
  } catch (err) {
    $("status").className = "error";
    $("status").textContent = err.message;
  } finally {
    $("generate").disabled = false;
  }
});

// ---- realtime ---------------------------------------------------------------------------------
let socket = null, stream = null, timer = null, sent = 0, shown = 0, dropped = 0;
// the frame on screen and the newest frame still decoding (a newer frame replaces one not yet shown)
let shownUrl = null, loadingUrl = null, latency = null;
const canvas = document.createElement("canvas");

function configure() {
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  const config = { prompt: $("rt-prompt").value || $("prompt").value || "0", strength: numberOrNull("rt-strength") };
  const steps = numberOrNull("rt-steps");
  if (steps !== null) config.steps = steps;
  socket.send(JSON.stringify(config));
}

function sendFrame() {
  const video = $("camera");
  if (!socket || socket.readyState !== WebSocket.OPEN || !video.videoWidth) return;
  if (socket.bufferedAmount > 1 << 20) return;  // the network is the bottleneck: skip this frame
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => { if (blob && socket && socket.readyState === WebSocket.OPEN) { socket.send(blob); sent++; } },
                "image/jpeg", 0.8);
}

$("rt-start").addEventListener("click", async () => {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (err) {
    $("rt-status").className = "error";
    $("rt-status").textContent = "no camera: " + err.message;
    return;
  }
  $("camera").srcObject = stream;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/v1/stream`);
  socket.binaryType = "blob";
  let pending = null;
  socket.onopen = () => { configure(); timer = setInterval(sendFrame, 66); };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.error) { $("rt-status").className = "error"; $("rt-status").textContent = msg.error; return; }
      pending = msg;
      return;
    }
    if (loadingUrl) URL.revokeObjectURL(loadingUrl);
    loadingUrl = URL.createObjectURL(event.data);
    dropped = pending ? pending.dropped : dropped;
    latency = pending ? pending.latency_ms : latency;
    $("rt-output").src = loadingUrl;
  };
  socket.onclose = () => stop();
  $("rt-start").disabled = true;
  $("rt-stop").disabled = false;
});

function stop() {
  if (timer) clearInterval(timer);
  timer = null;
  if (socket) socket.close();
  socket = null;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("rt-start").disabled = false;
  $("rt-stop").disabled = true;
}
$("rt-stop").addEventListener("click", stop);

// a frame counts as shown once decoded: the counter never runs ahead of the picture
$("rt-output").addEventListener("load", () => {
  const img = $("rt-output");
  if (img.src !== loadingUrl) return;
  if (shownUrl) URL.revokeObjectURL(shownUrl);
  shownUrl = loadingUrl;
  loadingUrl = null;
  shown++;
  $("rt-status").className = "muted";
  $("rt-status").textContent = `frames ${shown} · dropped ${dropped} · sent ${sent}` +
    (latency !== null ? ` · latency ${latency} ms` : "");
  img.dataset.frames = String(shown);
});
for (const id of ["rt-prompt", "rt-strength", "rt-steps"]) $(id).addEventListener("change", configure);
