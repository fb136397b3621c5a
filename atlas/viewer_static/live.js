/* The live page: a webcam, a dropped photo or an image of the run through the network, every frame.
 *
 * Frames go to the server over one WebSocket (/live/ws) as 224 px JPEGs, one at a time: the next frame is taken
 * when the previous result has arrived, so the page never queues frames (the server also keeps only the newest).
 * A result is a binary message: uint32 LE header length, a JSON header (top-5, layer, shape, peak, strongest), then
 * the layer's maps as uint8, channel-major; the page draws the DeepVis grid (one brightness scale for the layer,
 * the strongest channel outlined) from those bytes. Clicking a channel shows its map over the frame, its deconvnet
 * projection (asked of the server) and, when the run has a unit gallery for the layer, its unit card.
 */
(function () {
  "use strict";
  const SIZE = 224, PAD = 1, MIN_TILE = 14;
  const MARK = [255, 128, 0], PICK = [111, 179, 255];
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const state = {
    ws: null, hello: null, layer: null, source: null, paused: false, busy: false, stream: null,
    result: null, maps: null, layout: null, selected: null, results: 0, sent: 0, times: [], lastProjection: 0,
    frame: document.createElement("canvas"),   // the frame the shown result belongs to
    pending: document.createElement("canvas"), // the frame in flight
  };
  for (const c of [state.frame, state.pending]) { c.width = SIZE; c.height = SIZE; }
  window.atlasLive = state;

  function status(text, error) {
    const el = $("live-status");
    el.textContent = text;
    el.classList.toggle("error", !!error);
    if (error) document.body.dataset.error = text;
  }

  // ---------------------------------------------------------------- the socket
  function connect() {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/live/ws`);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onmessage = (ev) => (typeof ev.data === "string" ? onText(JSON.parse(ev.data)) : onBinary(ev.data));
    ws.onclose = (ev) => { status(`Disconnected from the server (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reload the page.`, true); };
  }

  function send(obj) { if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj)); }

  function onText(msg) {
    if (msg.type === "hello") {
      state.hello = msg;
      const menu = $("layer-menu");
      menu.innerHTML = msg.layers.map((l) => `<option value="${esc(l.name)}">${esc(l.name)} (${l.shape[0]})</option>`).join("");
      state.layer = msg.layer;
      menu.value = msg.layer;
      $("gallery-link").hidden = !msg.units.length;
      status(`${msg.model} ready. Choose a source: the camera, a photo (or drop one), or an image of the run.`);
      document.body.dataset.ready = "1";
      if (msg.images) send({ type: "images" });
      setupStrip(msg.atlases || []);
    } else if (msg.type === "images") {
      const sel = $("src-image");
      for (const im of msg.images) sel.insertAdjacentHTML("beforeend", `<option value="${im.index}">${esc(im.name)}</option>`);
    } else if (msg.type === "error") {
      status(msg.message, true);
      state.busy = false;
      schedule();
    } else if (msg.type === "onatlas") {
      drawDots(msg);
    } else if (msg.type === "status") {
      status(msg.message);
    }
  }

  function unpack(buf) {
    const n = new DataView(buf).getUint32(0, true);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
    return [header, new Uint8Array(buf, 4 + n)];
  }

  function onBinary(buf) {
    const [h, payload] = unpack(buf);
    if (h.type === "result") {
      state.busy = false;
      state.result = h;
      state.maps = payload;
      state.results += 1;
      state.frame.getContext("2d").drawImage(state.pending, 0, 0);
      if (state.source !== "camera" || !state.paused) drawFrame();
      const now = performance.now();
      state.times.push(now);
      while (state.times.length && now - state.times[0] > 3000) state.times.shift();
      $("fps").textContent = `${(state.times.length / 3).toFixed(1)} frames/s · ${h.compute_ms} ms`;
      drawTop(h.top);
      drawGrid();
      if (state.selected !== null && state.selected >= h.shape[0]) state.selected = null;
      if (state.selected !== null) { drawEnlarged(); maybeProject(false); }
      maybeAtlas();
      document.body.dataset.results = String(state.results);
      document.body.dataset.top1 = h.top[0].name;
      schedule();
    } else if (h.type === "picture") {
      const blob = new Blob([payload], { type: "image/jpeg" });
      createImageBitmap(blob).then((bmp) => { state.pending.getContext("2d").drawImage(bmp, 0, 0, SIZE, SIZE); });
    } else if (h.type === "projection") {
      if (h.channel !== state.selected || h.layer !== state.layer) return;
      const img = $("projection");
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = URL.createObjectURL(new Blob([payload], { type: "image/jpeg" }));
      img.title = `from position (${h.position.join(", ")}), activation ${h.value.toFixed(2)}`;
      document.body.dataset.projection = `${h.layer}/${h.channel}`;
    }
  }

  // ---------------------------------------------------------------- sources
  function stopCamera() {
    if (state.stream) for (const t of state.stream.getTracks()) t.stop();
    state.stream = null;
    $("src-camera").classList.remove("on");
  }

  function startCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) { status("This browser gives the page no camera.", true); return; }
    navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: false }).then((stream) => {
      stopCamera();
      state.stream = stream;
      state.source = "camera";
      $("src-camera").classList.add("on");
      const video = $("video");
      video.srcObject = stream;
      return video.play();
    }).then(() => { status("Camera on."); schedule(); })
      .catch((err) => status(`No camera: ${err.message}`, true));
  }

  // centre square of a drawable, scaled to SIZE x SIZE, into the in-flight canvas
  function grab(source, w, h) {
    const side = Math.min(w, h);
    const ctx = state.pending.getContext("2d");
    ctx.drawImage(source, (w - side) / 2, (h - side) / 2, side, side, 0, 0, SIZE, SIZE);
  }

  function sendPending() {
    state.busy = true;
    state.pending.toBlob((blob) => {
      if (!blob || !state.ws || state.ws.readyState !== WebSocket.OPEN) { state.busy = false; return; }
      blob.arrayBuffer().then((buf) => { state.ws.send(buf); state.sent += 1; });
    }, "image/jpeg", 0.85);
  }

  function schedule() {
    if (state.source !== "camera" || state.paused || state.busy) return;
    requestAnimationFrame(() => {
      const video = $("video");
      if (state.source !== "camera" || state.paused || state.busy || !video.videoWidth) { if (!video.videoWidth) setTimeout(schedule, 50); return; }
      grab(video, video.videoWidth, video.videoHeight);
      sendPending();
    });
  }

  function usePhoto(file) {
    if (!file || !file.type.startsWith("image/")) { status("Not an image file.", true); return; }
    createImageBitmap(file).then((bmp) => {
      stopCamera();
      state.source = "photo";
      grab(bmp, bmp.width, bmp.height);
      sendPending();
      status(`Photo: ${file.name}`);
    }).catch(() => status(`Cannot read ${file.name} as an image.`, true));
  }

  function useRunImage(index) {
    stopCamera();
    state.source = "image";
    state.busy = true;
    send({ type: "image", index });
  }

  // ---------------------------------------------------------------- drawing
  function drawFrame() { $("frame").getContext("2d").drawImage(state.frame, 0, 0); }

  function drawTop(top) {
    $("top5").innerHTML = top.map((t) => `<li><span class="bar" style="width:${(100 * t.probability).toFixed(1)}%"></span>` +
      `<span class="name">${esc(t.name)}</span><span class="p">${(100 * t.probability).toFixed(1)}%</span></li>`).join("");
  }

  // the layout of atlas.inspect.views.grid_layout: columns = ceil(sqrt(C)), whole-pixel enlargement to MIN_TILE
  function layoutOf(shape) {
    const [c, h, w] = shape;
    const columns = Math.ceil(Math.sqrt(c)), rows = Math.ceil(c / columns);
    const scale = Math.max(1, Math.ceil(MIN_TILE / Math.max(h, w)));
    const tile = Math.max(h, w) * scale;
    return { c, h, w, columns, rows, scale, tile, width: columns * (tile + PAD) + PAD, height: rows * (tile + PAD) + PAD };
  }

  function box(l, ch) {
    const r = Math.floor(ch / l.columns), q = ch % l.columns;
    const top = r * (l.tile + PAD) + PAD, left = q * (l.tile + PAD) + PAD;
    return [top, left, top + l.tile, left + l.tile];
  }

  function outline(data, l, ch, colour) {
    const [t, lf, b, r] = box(l, ch);
    const put = (y, x) => { if (y < 0 || x < 0 || y >= l.height || x >= l.width) return; const i = 4 * (y * l.width + x); data[i] = colour[0]; data[i + 1] = colour[1]; data[i + 2] = colour[2]; };
    for (let x = lf - PAD; x < r + PAD; x++) { put(t - 1, x); put(b, x); }
    for (let y = t; y < b; y++) { put(y, lf - 1); put(y, r); }
  }

  function drawGrid() {
    const h = state.result, maps = state.maps;
    const l = layoutOf(h.shape);
    state.layout = l;
    const canvas = $("grid");
    if (canvas.width !== l.width || canvas.height !== l.height) { canvas.width = l.width; canvas.height = l.height; }
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(l.width, l.height);
    const d = img.data;
    for (let i = 0; i < d.length; i += 4) { d[i] = d[i + 1] = d[i + 2] = 40; d[i + 3] = 255; }
    const hw = l.h * l.w;
    for (let ch = 0; ch < l.c; ch++) {
      const [t, lf] = box(l, ch);
      const base = ch * hw;
      for (let y = 0; y < l.h * l.scale; y++) {
        const row = base + Math.floor(y / l.scale) * l.w;
        let o = 4 * ((t + y) * l.width + lf);
        for (let x = 0; x < l.w * l.scale; x++, o += 4) {
          const v = maps[row + Math.floor(x / l.scale)];
          d[o] = d[o + 1] = d[o + 2] = v;
        }
      }
    }
    outline(d, l, h.strongest, MARK);
    if (state.selected !== null) outline(d, l, state.selected, PICK);
    ctx.putImageData(img, 0, 0);
    // fill the column (at most 3x), keeping the whole grid in view; the canvas is drawn pixelated
    const boxEl = $("grid-box");
    const fit = Math.max(0.5, Math.min((boxEl.clientWidth || l.width) / l.width, (window.innerHeight - 140) / l.height, 3));
    canvas.style.width = `${l.width * fit}px`;
    canvas.style.height = `${l.height * fit}px`;
    $("grid-title").textContent = `${h.layer}`;
    $("grid-info").textContent = `${l.c} channels · ${l.h}×${l.w} · brightest: ${h.strongest} · peak ${h.peak.toFixed(1)}`;
    document.body.dataset.layer = h.layer;
    document.body.dataset.strongest = String(h.strongest);
  }

  // the selected channel's map, stretched to its own maximum, in orange over the (dimmed) frame
  function drawEnlarged() {
    const h = state.result, l = state.layout, c = state.selected;
    const tiny = document.createElement("canvas");
    tiny.width = l.w; tiny.height = l.h;
    const tctx = tiny.getContext("2d");
    const img = tctx.createImageData(l.w, l.h);
    const off = c * l.h * l.w;
    let top = 1;
    for (let i = 0; i < l.h * l.w; i++) top = Math.max(top, state.maps[off + i]);
    for (let i = 0; i < l.h * l.w; i++) {
      const v = state.maps[off + i] / top;
      img.data[4 * i] = 255; img.data[4 * i + 1] = Math.round(128 + 127 * v); img.data[4 * i + 2] = 0;
      img.data[4 * i + 3] = Math.round(230 * v);
    }
    tctx.putImageData(img, 0, 0);
    const ctx = $("enlarged").getContext("2d");
    ctx.globalAlpha = 1;
    ctx.drawImage(state.frame, 0, 0);
    ctx.fillStyle = "rgba(0,0,0,0.45)";
    ctx.fillRect(0, 0, SIZE, SIZE);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(tiny, 0, 0, SIZE, SIZE);
    $("unit-title").textContent = `Channel ${c} · ${h.layer}`;
  }

  function maybeProject(now) {
    const t = performance.now();
    if (!now && t - state.lastProjection < 1000) return;  // a projection is a forward and a backward: at most one a second
    state.lastProjection = t;
    send({ type: "unit", channel: state.selected });
  }

  // ---------------------------------------------------------------- the atlas strip: the frame's positions as dots
  // The whole atlas is the deepest level of its Deep Zoom pyramid that fits in one tile (atlas_files/L/0_0.jpg);
  // the server places the frame's activation at every position of the atlas layer (atlas.inspect.onatlas), at most
  // every 2 s (a forward and a backward pass, and a nearest-neighbour search over the run's samples).
  function setupStrip(atlases) {
    const a = atlases.find((x) => x.atlas === "full") || atlases[0];
    state.atlas = a || null;
    if (!a) return;
    let level = a.levels - 1;
    while (level > 0 && Math.max(Math.ceil(a.width / 2 ** (a.levels - 1 - level)), Math.ceil(a.height / 2 ** (a.levels - 1 - level))) > a.tile_size) level--;
    $("strip-img").src = `${a.base}atlas_files/${level}/0_0.${a.format}`;
    $("strip-info").textContent = `${a.layer}/${a.atlas}`;
    $("strip-box").hidden = false;
  }

  function maybeAtlas() {
    if (!state.atlas) return;
    const t = performance.now();
    if (state.lastAtlas && t - state.lastAtlas < 2000) return;
    state.lastAtlas = t;
    send({ type: "atlas", layer: state.atlas.layer, atlas: state.atlas.atlas });
  }

  function drawDots(msg) {
    const img = $("strip-img"), canvas = $("strip-dots");
    const w = img.clientWidth || 240, h = img.clientHeight || 240;
    canvas.width = w; canvas.height = h;
    canvas.style.height = `${h}px`;
    const ctx = canvas.getContext("2d");
    const top = Math.max(1e-9, ...msg.points.map((p) => Math.abs(p[2])));
    for (const [x, y, v] of msg.points) {
      const a = Math.min(1, Math.abs(v) / top);
      ctx.beginPath();
      ctx.arc(x * w, y * h, 2 + 3 * a, 0, 2 * Math.PI);
      ctx.fillStyle = v >= 0 ? `rgba(242, 162, 74, ${0.35 + 0.65 * a})` : `rgba(111, 179, 255, ${0.35 + 0.65 * a})`;
      ctx.fill();
    }
    $("strip-info").textContent = `${msg.layer}/${msg.atlas} · ${msg.points.length} positions · attribution to ${msg.target}`;
    document.body.dataset.onatlas = String(msg.points.length);
  }

  function card(layer, c) {
    const box = $("card");
    const hello = state.hello;
    if (!hello || !hello.units.includes(layer)) {
      box.innerHTML = `<p class="muted">No unit card: the run has no unit gallery for ${esc(layer)} (atlas units RUN --layer ${esc(layer)}).</p>`;
      document.body.dataset.card = `${layer}/${c}`;
      return;
    }
    const base = `units/${encodeURIComponent(layer)}/`;
    fetch(`${base}unit/${c}.json`).then((r) => { if (!r.ok) throw new Error(`HTTP ${r.status}`); return r.json(); }).then((unit) => {
      if (state.selected !== c || state.layer !== layer) return;
      let html = `<p><a class="bar-link" href="units.html#${encodeURIComponent(layer)}/${c}">open in the unit gallery</a></p>`;
      for (const v of unit.vis || []) html += `<div class="kind">${esc(v.kind)}</div><img alt="${esc(v.kind)}" src="${base}${esc(v.src)}">`;
      if (unit.top && unit.top.src) {
        html += `<div class="kind">top ${unit.top.examples.length} dataset examples</div><img class="top" alt="top examples" src="${base}${esc(unit.top.src)}">`;
      }
      if (!(unit.vis || []).length && !(unit.top && unit.top.src)) html += '<p class="muted">The gallery has nothing for this unit yet.</p>';
      box.innerHTML = html;
      document.body.dataset.card = `${layer}/${c}`;
    }).catch((err) => { box.innerHTML = `<p class="error">Cannot load unit ${c}: ${esc(err.message)}</p>`; });
  }

  function select(c) {
    if (!state.result) return;
    const n = state.result.shape[0];
    state.selected = ((c % n) + n) % n;
    $("unit").hidden = false;
    drawGrid();
    drawEnlarged();
    $("projection").removeAttribute("src");
    maybeProject(true);
    card(state.layer, state.selected);
    document.body.dataset.selected = String(state.selected);
  }

  function setLayer(layer) {
    if (!state.hello || layer === state.layer) return;
    state.layer = layer;
    $("layer-menu").value = layer;
    state.selected = null;
    $("unit").hidden = true;
    send({ type: "layer", layer });
  }

  // ---------------------------------------------------------------- controls
  $("src-camera").addEventListener("click", startCamera);
  $("src-file").addEventListener("change", (ev) => usePhoto(ev.target.files[0]));
  $("src-image").addEventListener("change", (ev) => { if (ev.target.value !== "") useRunImage(Number(ev.target.value)); });
  $("layer-menu").addEventListener("change", (ev) => setLayer(ev.target.value));
  function togglePause() {
    state.paused = !state.paused;
    $("pause").setAttribute("aria-pressed", String(state.paused));
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    document.body.dataset.paused = state.paused ? "1" : "";
    if (!state.paused) schedule();
  }
  $("pause").addEventListener("click", togglePause);
  $("grid").addEventListener("click", (ev) => {
    const l = state.layout;
    if (!l) return;
    const rect = ev.target.getBoundingClientRect();
    const x = (ev.clientX - rect.left) * (l.width / rect.width), y = (ev.clientY - rect.top) * (l.height / rect.height);
    const q = Math.floor((x - PAD) / (l.tile + PAD)), r = Math.floor((y - PAD) / (l.tile + PAD));
    const c = r * l.columns + q;
    if (q >= 0 && q < l.columns && r >= 0 && c < l.c) select(c);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT") return;
    const layers = state.hello ? state.hello.layers.map((l) => l.name) : [];
    const at = layers.indexOf(state.layer);
    if (ev.key === "ArrowUp" || ev.key === "u") { if (at > 0) setLayer(layers[at - 1]); }
    else if (ev.key === "ArrowDown" || ev.key === "d") { if (at >= 0 && at < layers.length - 1) setLayer(layers[at + 1]); }
    else if (ev.key === "ArrowRight" || ev.key === "l") select(state.selected === null ? (state.result ? state.result.strongest : 0) : state.selected + 1);
    else if (ev.key === "ArrowLeft" || ev.key === "h") select(state.selected === null ? (state.result ? state.result.strongest : 0) : state.selected - 1);
    else if (ev.key === " ") togglePause();
    else return;
    ev.preventDefault();
  });
  const hint = $("drop-hint");
  document.addEventListener("dragover", (ev) => { ev.preventDefault(); hint.hidden = false; });
  document.addEventListener("dragleave", (ev) => { if (!ev.relatedTarget) hint.hidden = true; });
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    hint.hidden = true;
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) usePhoto(file);
  });
  connect();
})();
