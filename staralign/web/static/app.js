// staralign web page: send an image to /api/landmarks, draw what comes back on a canvas.
// Plain JavaScript, no libraries, no build step; everything is served by `staralign serve`.
"use strict";

(() => {
  // The colours of staralign.viz.PALETTE (there BGR, here RGB), one per face.
  const PALETTE = ["#00ff00", "#ffa500", "#0080ff", "#ff00ff", "#ffff00", "#ff0000", "#00ffff", "#ff0080"];
  // The canvas is drawn at s times the photo's size: large photos scaled down to MAX_CANVAS_SIDE, small ones
  // scaled up (whole pixels, no smoothing) towards MIN_CANVAS_SIDE so the marks stay sharp.
  const MAX_CANVAS_SIDE = 2048;
  const MIN_CANVAS_SIDE = 720;

  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"), drop: $("drop"), file: $("file"), accepts: $("accepts"),
    camStart: $("camera-start"), camLive: $("camera-live"), video: $("video"), capture: $("capture"),
    live: $("live"), camStop: $("camera-stop"), smooth: $("smooth"),
    box: $("show-box"), points: $("show-points"), edges: $("show-edges"), ambiguity: $("show-ambiguity"),
    indices: $("show-indices"), nstd: $("nstd"), format: $("format"), formatLabel: $("format-label"),
    detector: $("detector"),
    status: $("status"), timing: $("timing"), download: $("download"), canvas: $("result"), json: $("json"),
  };

  const state = {
    info: null,       // GET /api/info
    bitmap: null,     // the image being shown (EXIF orientation applied, like the server)
    blob: null,       // the last image sent, to re-run with another format
    name: "image",
    raw: false,       // webcam frames go as raw bytes, files as multipart
    result: null,     // the last answer of POST /api/landmarks
    stream: null,     // the webcam
    streamId: "",     // live mode: frames go to api/track under this id, so faces keep their track ids
    busy: false,
  };

  function setState(name, message) {
    document.body.dataset.state = name;
    if (message !== undefined) els.status.textContent = message;
    els.status.className = name === "error" ? "error" : "";
  }

  // ------------------------------------------------------------------ model description

  async function loadInfo() {
    try {
      const response = await fetch("api/info");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      state.info = await response.json();
    } catch (err) {
      setState("error", `Cannot reach the server (${err.message}). Is staralign serve still running?`);
      return;
    }
    const info = state.info;
    const device = info.device ? ` on ${info.device}` : "";
    els.model.textContent = `${info.checkpoint}: ${info.definition.name}, ${info.definition.num_points} points, ` +
      `${info.backend}${device}, face detector ${info.detector}, input ${info.input_size} px`;
    const mb = info.limits.max_upload_bytes / 1048576;
    els.accepts.textContent = `JPEG, PNG, BMP or WebP, up to ${+mb.toFixed(1)} MB and ` +
      `${+(info.limits.max_pixels / 1e6).toFixed(1)} megapixels`;
    // (Not Object.keys: JavaScript lists integer-like keys such as "68" first.)
    for (const d of info.detectors || [info.detector]) {
      els.detector.add(new Option(d, d, false, d === info.detector));
    }
    const formats = ["native", "68"].filter((f) => f in info.formats);
    if (formats.length > 1 && info.formats["68"].name !== info.definition.name) {
      for (const f of formats) {
        const layout = info.formats[f];
        els.format.add(new Option(`${layout.num_points} (${layout.name})`, f));
      }
      els.formatLabel.hidden = false;
    }
    if (!info.ambiguity) {
      els.ambiguity.checked = false;
      els.ambiguity.disabled = true;
      els.ambiguity.parentElement.title = "this model file reports no ambiguity (export it --with-ambiguity)";
    }
  }

  function layoutOf(name) {
    const formats = state.info ? Object.values(state.info.formats) : [];
    return formats.find((l) => l.name === name) || null;
  }

  // ------------------------------------------------------------------ sending an image

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.message) return `${body.message} (HTTP ${response.status})`;
    } catch (_) { /* not JSON */ }
    return `the server answered HTTP ${response.status}`;
  }

  async function send(blob, name, raw) {
    if (state.info && blob.size > state.info.limits.max_upload_bytes) {
      const mb = (state.info.limits.max_upload_bytes / 1048576).toFixed(1);
      setState("error", `${name} is ${(blob.size / 1048576).toFixed(1)} MB; the server accepts up to ${mb} MB.`);
      return;
    }
    state.blob = blob;
    state.name = name;
    state.raw = raw;
    state.busy = true;
    setState("loading", `Finding faces in ${name}\u2026`);
    // EXIF orientation applied, as the server's decoder does (older browsers: without the option).
    const shown = createImageBitmap(blob, { imageOrientation: "from-image" })
      .catch(() => createImageBitmap(blob))
      .then((bitmap) => {
        if (state.blob !== blob) return bitmap;
        state.bitmap = bitmap;
        state.result = null;
        render();
        return bitmap;
      }, () => null);
    const params = new URLSearchParams({ ambiguity: "true", format: els.format.value || "native" });
    if (els.detector.value) params.set("detector", els.detector.value);
    const live = raw && els.live.checked && state.streamId;
    if (live) {
      params.set("stream", state.streamId);
      params.set("smooth", els.smooth.value);
      params.set("t", String(performance.now() / 1000));
    }
    let body = blob;
    const headers = {};
    if (raw) {
      headers["Content-Type"] = blob.type || "application/octet-stream";
      // Header values must be printable ASCII here: anything else in the name becomes "_".
      headers["Content-Disposition"] = `inline; filename="${name.replace(/[^\x20-\x7e]|["\\]/g, "_")}"`;
    } else {
      body = new FormData();
      body.append("file", blob, name);
    }
    const started = performance.now();
    try {
      const response = await fetch(`api/${live ? "track" : "landmarks"}?${params}`, { method: "POST", body, headers });
      const roundTrip = performance.now() - started;
      if (state.blob !== blob) return; // a newer image was sent meanwhile
      if (!response.ok) {
        setState("error", await errorMessage(response));
        els.timing.textContent = "";
        return;
      }
      const result = await response.json();
      const bitmap = await shown;
      if (state.blob !== blob) return;
      if (!bitmap) {
        setState("error", "The server read the image, but this browser cannot display it.");
        return;
      }
      state.result = result;
      showResult(result, roundTrip);
    } catch (err) {
      setState("error", `Upload failed: ${err.message}`);
    } finally {
      state.busy = false;
      if (state.blob === blob) continueLive();
    }
  }

  function showResult(result, roundTrip) {
    const record = result.inputs[0];
    const faces = record.faces;
    const t = result.timing;
    els.timing.textContent = `server ${t.total_ms.toFixed(0)} ms (inference ${t.inference_ms.toFixed(0)} ms)` +
      ` \u00b7 round trip ${roundTrip.toFixed(0)} ms`;
    const what = faces.length === 0
      ? "No face found. Try a larger, frontal face, or start the server with --detector none for a cropped face."
      : `${faces.length} face${faces.length > 1 ? "s" : ""}, ${result.num_points} points each (${result.layout})`;
    const size = state.bitmap && (state.bitmap.width !== record.width || state.bitmap.height !== record.height)
      ? ` (note: the server read ${record.width}x${record.height}, the browser shows ` +
        `${state.bitmap.width}x${state.bitmap.height})` : "";
    setState("done", `${record.path}: ${what}${size}`);
    els.canvas.dataset.faces = String(faces.length);
    els.json.textContent = JSON.stringify(result, null, 1);
    els.download.disabled = false;
    render();
  }

  // ------------------------------------------------------------------ drawing

  function render() {
    const bitmap = state.bitmap;
    if (!bitmap) return;
    const canvas = els.canvas;
    const side = Math.max(bitmap.width, bitmap.height);
    const s = side > MAX_CANVAS_SIDE ? MAX_CANVAS_SIDE / side : Math.max(1, Math.floor(MIN_CANVAS_SIDE / side));
    canvas.width = Math.round(bitmap.width * s);
    canvas.height = Math.round(bitmap.height * s);
    canvas.dataset.scale = String(s);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = s < 1;
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const result = state.result;
    if (!result) return;
    // Pixel centres are at integer coordinates: canvas x = (x + 0.5) * s.
    const X = (x) => (x + 0.5) * s;
    const layout = layoutOf(result.layout);
    const nstd = Number(els.nstd.value);
    result.inputs[0].faces.forEach((face, k) => {
      const color = PALETTE[(face.track_id ?? k) % PALETTE.length]; // a tracked face keeps its colour
      const pts = face.landmarks;
      const [x1, y1, x2, y2] = face.box;
      const unit = Math.max(1, (Math.max(x2 - x1, y2 - y1) * s) / 100); // ~1/100 of the face, like viz.py
      ctx.lineJoin = "round";
      ctx.lineCap = "round";
      if (els.box.checked) {
        ctx.strokeStyle = color;
        ctx.lineWidth = Math.max(1, unit / 2);
        ctx.strokeRect(X(x1), X(y1), (x2 - x1) * s, (y2 - y1) * s);
        if (face.score !== null) {
          ctx.fillStyle = color;
          ctx.font = `${Math.max(11, unit * 4)}px sans-serif`;
          ctx.fillText(face.score.toFixed(2), X(x1), Math.max(X(y1) - unit, 12));
        }
      }
      if (els.edges.checked && layout) {
        ctx.strokeStyle = color;
        ctx.globalAlpha = 0.6;
        ctx.lineWidth = Math.max(1, unit / 2);
        for (const edge of layout.edges) {
          const idx = edge.indices.filter((i) => i < pts.length);
          if (idx.length < 2) continue;
          ctx.beginPath();
          idx.forEach((i, j) => (j ? ctx.lineTo(X(pts[i][0]), X(pts[i][1])) : ctx.moveTo(X(pts[i][0]), X(pts[i][1]))));
          if (edge.closed) ctx.closePath();
          ctx.stroke();
        }
        ctx.globalAlpha = 1;
      }
      const amb = face.ambiguity;
      if (els.ambiguity.checked && amb) {
        ctx.strokeStyle = color === "#ff00ff" ? "#00ffff" : "#ff00ff";
        ctx.fillStyle = color === "#ff00ff" ? "rgba(0,255,255,0.08)" : "rgba(255,0,255,0.08)";
        ctx.lineWidth = Math.max(1, unit / 3);
        pts.forEach(([x, y], i) => {
          const a = amb.major_std[i] * nstd * s;
          const b = amb.minor_std[i] * nstd * s;
          if (!(a > 0) || !(b >= 0)) return;
          const [tx, ty] = amb.tangent[i];
          ctx.beginPath();
          ctx.ellipse(X(x), X(y), a, Math.max(b, 0.5), Math.atan2(ty, tx), 0, 2 * Math.PI);
          ctx.fill();
          ctx.stroke();
        });
      }
      if (els.points.checked) {
        ctx.fillStyle = color;
        const r = Math.max(1.5, unit * 0.8);
        for (const [x, y] of pts) {
          ctx.beginPath();
          ctx.arc(X(x), X(y), r, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
      if (els.indices.checked) {
        ctx.font = `${Math.max(9, unit * 2.2)}px sans-serif`;
        ctx.lineWidth = 2;
        ctx.strokeStyle = "rgba(0,0,0,0.7)";
        ctx.fillStyle = "#ffffff";
        pts.forEach(([x, y], i) => {
          ctx.strokeText(String(i), X(x) + unit, X(y) - unit);
          ctx.fillText(String(i), X(x) + unit, X(y) - unit);
        });
      }
    });
  }

  // ------------------------------------------------------------------ download

  function download() {
    if (!state.result) return;
    const blob = new Blob([JSON.stringify(state.result, null, 2)], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = `${state.name.replace(/\.[^.]*$/, "") || "image"}.landmarks.json`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ------------------------------------------------------------------ webcam

  async function startCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      setState("error", "The webcam needs a secure page: open this page on localhost or 127.0.0.1 " +
        "(same port), or serve it over HTTPS.");
      return;
    }
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 } }, audio: false });
    } catch (err) {
      setState("error", `No webcam: ${err.message || err.name}`);
      return;
    }
    state.streamId = `cam${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
    els.video.srcObject = state.stream;
    await els.video.play();
    els.camLive.hidden = false;
    els.camStart.hidden = true;
    setState("idle", "Webcam on: press Capture (or tick live).");
  }

  function stopCamera() {
    if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
    state.stream = null;
    els.video.srcObject = null;
    els.camLive.hidden = true;
    els.camStart.hidden = false;
    els.live.checked = false;
  }

  function capture() {
    const video = els.video;
    if (!state.stream || !video.videoWidth) return;
    const frame = document.createElement("canvas");
    frame.width = video.videoWidth;
    frame.height = video.videoHeight;
    frame.getContext("2d").drawImage(video, 0, 0);
    frame.toBlob((blob) => blob && send(blob, "webcam.jpg", true), "image/jpeg", 0.92);
  }

  function continueLive() {
    if (els.live.checked && state.stream && !state.busy) requestAnimationFrame(capture);
  }

  // ------------------------------------------------------------------ wiring

  function takeFiles(files) {
    const file = files && files[0];
    if (file) send(file, file.name || "image", false);
  }

  els.file.addEventListener("change", () => takeFiles(els.file.files));
  els.drop.addEventListener("dragover", (e) => { e.preventDefault(); els.drop.classList.add("over"); });
  els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
  els.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    els.drop.classList.remove("over");
    takeFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) send(item.getAsFile(), "pasted image", false);
  });
  for (const el of [els.box, els.points, els.edges, els.ambiguity, els.indices, els.nstd]) {
    el.addEventListener("change", render);
  }
  els.format.addEventListener("change", () => state.blob && send(state.blob, state.name, state.raw));
  els.detector.addEventListener("change", () => state.blob && send(state.blob, state.name, state.raw));
  els.download.addEventListener("click", download);
  els.camStart.addEventListener("click", startCamera);
  els.camStop.addEventListener("click", stopCamera);
  els.capture.addEventListener("click", capture);
  els.live.addEventListener("change", continueLive);

  loadInfo();
})();
