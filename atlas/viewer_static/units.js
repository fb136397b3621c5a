/* Unit gallery: every channel of a layer (units/{layer}/gallery.json), click one for its panel.
 *
 * URL: units.html#LAYER shows a layer's channel grid, units.html#LAYER/C also opens unit C. Small layers are a grid
 * of thumbnails (units/{layer}/thumbs/{c}.jpg); large ones one Deep Zoom image (grid.dzi) in OpenSeadragon, where a
 * click picks the square under the cursor. The grid holds the visualised channels only (gallery.json's order); the
 * others are counted and listed by number below it. A unit's panel reads units/{layer}/unit/{c}.json: its visualisations
 * (image strips, alpha ones over a checkerboard), its top dataset patches beside their projections with the
 * images' labels, the classes it contributes to most and links that open the atlas with the unit's cells lit.
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const state = { layers: [], layer: null, meta: null, unit: null, osd: null, atlases: null };

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function status(message) {
    const el = $("status");
    el.hidden = !message;
    el.textContent = message || "";
  }
  function base() { return `units/${state.layer}/`; }
  function getJSON(url) {
    return fetch(url).then((r) => { if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`); return r.json(); });
  }

  /** Frame i of an n-frame horizontal strip as el's background; alpha frames over a checkerboard. */
  function frame(url, n, i, alpha) {
    const el = document.createElement("div");
    el.className = "frame" + (alpha ? " alpha" : "");
    const x = n > 1 ? (i / (n - 1)) * 100 : 0;
    if (alpha) {
      el.style.backgroundImage = `url("${url}"), repeating-conic-gradient(#9aa0aa 0 25%, #5d626b 0 50%)`;
      el.style.backgroundSize = `${n * 100}% 100%, 14px 14px`;
      el.style.backgroundPosition = `${x}% 0, 0 0`;
      el.style.backgroundRepeat = "no-repeat, repeat";
    } else {
      el.style.backgroundImage = `url("${url}")`;
      el.style.backgroundSize = `${n * 100}% 100%`;
      el.style.backgroundPosition = `${x}% 0`;
    }
    el.dataset.src = url;
    return el;
  }

  function classList(top) {
    if (!top || !top.length) return '<li class="empty">no class scores (run without attributions, or the unit never fires)</li>';
    const scale = Math.max(...top.map((t) => Math.abs(t[1] || 0)), 1e-9);
    return top.map(([name, value]) => {
      const v = value === null ? 0 : value;
      const w = Math.round((Math.abs(v) / scale) * 100);
      return `<li><span class="name" title="${esc(name)}">${esc(name)}</span>` +
        `<span class="bar"><i class="${v < 0 ? "neg" : ""}" style="width:${w}%"></i></span>` +
        `<span class="val">${value === null ? "–" : v.toFixed(3)}</span></li>`;
    }).join("");
  }

  /** The heading says what the class numbers are; with the direct check, which attribution-based classes survive it. */
  function classCheck(check) {
    $("unit-classes-title").textContent = check ? "Classes it raises most" : "Classes it contributes to most";
    const note = $("unit-classes-note");
    if (!check) {
      note.textContent = "activation-weighted mean attribution of the samples where the unit fires (all channels together)";
      return;
    }
    const kept = check.attribution.filter((a) => a[2]).map((a) => a[0]);
    const dropped = check.attribution.filter((a) => !a[2]).map((a) => a[0]);
    note.innerHTML = `mean change of each logit from this unit alone on its top examples (a · ∂logit/∂a, logit units)` +
      (check.attribution.length ? `<br>by attribution: <span class="kept">${kept.map(esc).join(", ") || "none"}</span> survive the check` +
        (dropped.length ? `; <span class="dropped">${dropped.map(esc).join(", ")}</span> do not` : "") : "");
  }

  // ---------------------------------------------------------------- the channel grid
  /** The channels drawn in the grid, in order (galleries written before it was stored: every channel). */
  function order(meta) { return meta.order || Array.from({ length: meta.channels }, (_, c) => c); }

  /** The channels without a visualisation: a count and their numbers, each opening its panel (no empty squares). */
  function missingList(meta) {
    const box = $("units-missing");
    const drawn = new Set(order(meta));
    const missing = [];
    for (let c = 0; c < meta.channels; c++) if (!drawn.has(c)) missing.push(c);
    box.hidden = !missing.length;
    box.open = !drawn.size;
    $("units-missing-count").textContent = drawn.size
      ? `${missing.length} of ${meta.channels} units not visualised yet`
      : `None of the ${meta.channels} units is visualised yet`;
    const list = $("units-missing-list");
    list.innerHTML = "";
    for (const c of missing) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "unit-chip";
      b.dataset.c = c;
      b.textContent = c;
      b.addEventListener("click", () => go(c));
      list.appendChild(b);
    }
  }

  function buildGrid(meta) {
    const grid = $("units-grid");
    grid.innerHTML = "";
    grid.style.setProperty("--cell", `${Math.min(128, Math.max(72, meta.cell))}px`);  // small visualisations shown larger
    const loads = [];
    for (const c of order(meta)) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "unit-cell";
      button.dataset.c = c;
      button.title = meta.thumbs[c] ? `unit ${c} (${meta.thumbs[c]})` : `unit ${c}: no visualisation yet`;
      if (meta.thumbs[c]) {
        const img = document.createElement("img");
        img.alt = `unit ${c}`;
        img.src = `${base()}thumbs/${c}.jpg`;
                loads.push(img.decode().catch(() => null));
        button.appendChild(img);
      } else {
        const empty = document.createElement("span");
        empty.className = "no-vis";
        button.appendChild(empty);
      }
      const label = document.createElement("span");
      label.className = "unit-no";
      label.textContent = c;
      button.appendChild(label);
      button.addEventListener("click", () => go(c));
      grid.appendChild(button);
    }
    grid.hidden = false;
    $("units-osd").hidden = true;
    missingList(meta);
    Promise.all(loads).then(() => { document.body.dataset.loaded = "1"; });
  }

  function buildDzi(meta) {
    $("units-grid").hidden = true;
    const el = $("units-osd");
    el.hidden = false;
    if (!state.osd) {
      state.osd = OpenSeadragon({
        id: "units-osd", prefixUrl: "openseadragon/images/", drawer: "canvas", showNavigator: true,
        navigatorPosition: "BOTTOM_RIGHT", showRotationControl: false, maxZoomPixelRatio: 4, visibilityRatio: 0.6,
        // the zoom buttons sit top left: the home view keeps a band free above the grid so they cover no unit
        viewportMargins: { top: 48, left: 8, right: 8, bottom: 8 },
        gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
      });
      state.osd.addHandler("open", () => {
        state.osd.world.getItemAt(0).addHandler("fully-loaded-change", (e) => { document.body.dataset.loaded = e.fullyLoaded ? "1" : ""; });
      });
      state.osd.addHandler("canvas-click", (event) => {
        if (!event.quick) return;
        event.preventDefaultAction = true;
        const c = unitAt(state.osd.viewport.pointFromPixel(event.position));
        if (c !== null) go(c);
      });
    }
    state.osd.open(`${base()}${meta.dzi.src}`);
    missingList(meta);
  }

  /** The channel whose square is under a viewport point of the Deep Zoom grid, or null. */
  function unitAt(point) {
    const meta = state.meta, item = state.osd.world.getItemAt(0);
    const p = item.viewportToImageCoordinates(point);
    const col = Math.floor(p.x / meta.cell), row = Math.floor(p.y / meta.cell);
    if (col < 0 || row < 0 || col >= meta.cols || row >= meta.cols) return null;
    const i = row * meta.cols + col, drawn = order(meta);
    return i < drawn.length ? drawn[i] : null;
  }

  // ---------------------------------------------------------------- one unit
  function visSection(unit) {
    const box = $("unit-vis");
    box.innerHTML = "";
    if (!unit.vis.length) { box.innerHTML = '<p class="empty">No visualisations of this unit yet.</p>'; return; }
    for (const v of unit.vis) {
      const row = document.createElement("div");
      row.className = "vis-row";
      row.dataset.kind = v.kind;
      const best = Array.isArray(v.objective) && v.objective.length ? Math.max(...v.objective) : null;
      row.innerHTML = `<div class="vis-kind"><b>${esc(v.kind)}</b>${v.alpha ? ' <span class="tag">alpha</span>' : ""}` +
        `${best === null ? "" : `<span class="val">activation ${best.toFixed(2)}</span>`}</div>`;
      const frames = document.createElement("div");
      frames.className = "frames";
      for (let i = 0; i < v.n; i++) frames.appendChild(frame(`${base()}${v.src}`, v.n, i, v.alpha));
      row.appendChild(frames);
      box.appendChild(row);
    }
  }

  function exampleGrid(title, src, n, captions, cls) {
    const block = document.createElement("div");
    block.className = `ex-block ${cls}`;
    block.innerHTML = `<div class="ex-title">${esc(title)}</div>`;
    const grid = document.createElement("div");
    grid.className = "ex-grid";
    for (let i = 0; i < n; i++) {
      const cell = document.createElement("figure");
      cell.appendChild(frame(`${base()}${src}`, n, i, false));
      if (captions) {
        const cap = document.createElement("figcaption");
        cap.innerHTML = captions[i];
        cell.appendChild(cap);
      }
      grid.appendChild(cell);
    }
    block.appendChild(grid);
    return block;
  }

  function topSection(unit) {
    const box = $("unit-top");
    box.innerHTML = "";
    const top = unit.top;
    if (!top || !top.examples.length) {
      $("unit-top-title").textContent = "Top dataset examples";
      box.innerHTML = '<p class="empty">No dataset examples of this unit yet.</p>';
      return;
    }
    const n = top.examples.length;
    $("unit-top-title").textContent = `Top ${n} dataset examples`;
    const captions = top.examples.map((e) => {
      const name = e.label_name || (e.label >= 0 ? `class ${e.label}` : "unlabelled");
      return `<span class="label" title="${esc(e.file || "")}">${esc(name)}</span><span class="val">${e.value.toFixed(2)}</span>`;
    });
    const pair = document.createElement("div");
    pair.className = "pairs";
    if (top.src) pair.appendChild(exampleGrid("patches", top.src, n, captions, "patches"));
    for (const p of unit.projections) pair.appendChild(exampleGrid(p.method, p.src, n, null, `projection projection-${p.method}`));
    if (!unit.projections.length) {
      const note = document.createElement("p");
      note.className = "empty";
      note.textContent = "No projections of these examples yet.";
      pair.appendChild(note);
    }
    box.appendChild(pair);
  }

  function atlasLinks(unit) {
    const el = $("unit-atlas");
    const tiled = new Set((state.atlases || []).map((a) => a.id));
    const links = state.meta.atlases.filter((a) => tiled.has(`${state.layer}/${a.atlas}`)).map((a) =>
      `<a class="show-in-atlas" href="index.html?unit=${encodeURIComponent(`${state.layer}:${unit.channel}`)}` +
      `#${encodeURIComponent(`${state.layer}/${a.atlas}`)}">show in atlas${a.atlas === "full" ? "" : ` (${esc(a.atlas)})`}</a>`);
    el.innerHTML = links.length ? links.join(" ") : '<span class="empty">no tiled atlas of this layer</span>';
  }

  function openUnit(c) {
    const key = `${state.layer}/${c}`;
    state.unit = key;
    document.body.dataset.unit = "";
    for (const b of document.querySelectorAll(".unit-cell.selected, .unit-chip.selected")) b.classList.remove("selected");
    const button = document.querySelector(`.unit-cell[data-c="${c}"], .unit-chip[data-c="${c}"]`);
    if (button) button.classList.add("selected");
    return getJSON(`${base()}unit/${c}.json`).then((unit) => {
      if (state.unit !== key) return;
      $("unit").hidden = false;
      $("unit-title").textContent = `Unit ${c} · ${state.layer}`;
      visSection(unit);
      topSection(unit);
      $("unit-classes").innerHTML = classList(unit.classes);
      $("unit-classes-section").hidden = unit.classes === null;
      classCheck(unit.class_check);
      atlasLinks(unit);
      document.body.dataset.unit = String(c);
    }).catch((err) => status(`Cannot load unit ${c} (${err.message}).`));
  }

  // ---------------------------------------------------------------- layers and navigation
  function go(c) { location.hash = `#${encodeURIComponent(state.layer)}/${c}`; }

  function route() {
    const raw = decodeURIComponent(location.hash.slice(1));
    const m = raw.match(/^(.*)\/(\d+)$/);
    const layer = m ? m[1] : raw;
    const entry = state.layers.find((x) => x.layer === layer) || state.layers[0];
    const unit = m && entry.layer === layer ? Number(m[2]) : null;
    const opened = entry.layer === state.layer ? Promise.resolve() : openLayer(entry);
    opened.then(() => {
      if (unit !== null && unit < state.meta.channels) openUnit(unit);
      else { $("unit").hidden = true; state.unit = null; }
    });
  }

  function openLayer(entry) {
    state.layer = entry.layer;
    state.meta = null;
    document.body.dataset.loaded = "";
    $("layer-menu").value = entry.layer;
    $("unit").hidden = true;
    return getJSON(`${entry.base}gallery.json`).then((meta) => {
      state.meta = meta;
      $("f-model").textContent = meta.model;
      $("f-units").textContent = String(meta.channels);
      $("f-kind").textContent = meta.kinds.length ? meta.kinds.filter((k) => meta.thumbs.includes(k)).join(", ") || "–" : "no visualisations";
      const full = meta.atlases.find((a) => a.atlas === "full") || meta.atlases[0];
      $("atlas-link").href = full ? `index.html#${encodeURIComponent(`${meta.layer}/${full.atlas}`)}` : "index.html";
      status("");
      if (meta.dzi) buildDzi(meta); else buildGrid(meta);
    }).catch((err) => status(`Cannot load the gallery of ${entry.layer} (${err.message}).`));
  }

  function init() {
    $("unit-close").addEventListener("click", () => { location.hash = `#${encodeURIComponent(state.layer)}`; });
    $("layer-menu").addEventListener("change", (e) => { location.hash = `#${encodeURIComponent(e.target.value)}`; });
    fetch("atlases.json").then((r) => (r.ok ? r.json() : { atlases: [] })).then((m) => { state.atlases = m.atlases || []; })
      .catch(() => { state.atlases = []; })
      .then(() => getJSON("units.json"))
      .then((m) => {
        state.layers = m.layers || [];
        if (!state.layers.length) { status("No unit galleries yet: run `atlas units RUN --layer LAYER`."); return; }
        const menu = $("layer-menu");
        for (const x of state.layers) {
          const opt = document.createElement("option");
          opt.value = x.layer;
          opt.textContent = `${x.layer} · ${x.channels} units`;
          menu.appendChild(opt);
        }
        window.addEventListener("hashchange", route);
        route();
      })
      .catch((err) => status(`Cannot load the gallery list (${err.message}). Open this page through \`atlas serve RUN\`.`));
  }

  /** For tests and the console. */
  window.unitGallery = {
    state,
    openUnit: go,
    unitCenter(c) {  // page position of unit c's square in the Deep Zoom grid
      const meta = state.meta, item = state.osd.world.getItemAt(0);
      const i = order(meta).indexOf(c), col = i % meta.cols, row = Math.floor(i / meta.cols);
      const vp = item.imageToViewportCoordinates((col + 0.5) * meta.cell, (row + 0.5) * meta.cell);
      const p = state.osd.viewport.pixelFromPoint(vp, true);
      const box = state.osd.container.getBoundingClientRect();
      return { x: box.left + p.x, y: box.top + p.y };
    },
  };
  init();
})();
