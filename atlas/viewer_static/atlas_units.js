/* The atlas page's links to the unit gallery (loaded after viewer.js once a gallery exists, see atlas/viewer.py).
 *
 * - the bar gets a "Units" link to units.html#LAYER for the open atlas's layer when that layer has a gallery;
 * - a clicked cell's panel lists the cell's top units (units/{layer}/cells/{atlas}/{size}/{bx}_{by}.json: the
 *   channels with the largest values in the cell's mean activation), each linking to its gallery panel;
 * - index.html?unit=LAYER:C draws unit C's veil over the atlas (units/{layer}/unit/{c}.json holds one veil per atlas
 *   and grid: the alpha of each cell, made as the --highlight veil is), redrawn when the zoom changes grids.
 * It uses the viewer only through window.atlasViewer and the page's elements.
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const BG = [17, 19, 24];
  const params = new URLSearchParams(location.search);
  const wanted = (() => {
    const raw = params.get("unit");
    const m = raw && raw.match(/^(.*):(\d+)$/);
    return m ? { layer: m[1], channel: Number(m[2]) } : null;
  })();
  const st = { galleries: new Map(), meta: new Map(), cells: new Map(), unit: null, veil: null, veilKey: null, pending: null };

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function getJSON(url) {
    return fetch(url).then((r) => { if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`); return r.json(); });
  }
  function galleryMeta(layer) {
    if (!st.meta.has(layer)) st.meta.set(layer, getJSON(`units/${layer}/gallery.json`).catch(() => null));
    return st.meta.get(layer);
  }

  // ---------------------------------------------------------------- the menu link
  function updateLink() {
    const a = window.atlasViewer.state.atlas;
    const link = window.atlasViewer.barLink("units-link", "Units", "every unit of this layer: visualisations, dataset examples, projections");
    const has = a && st.galleries.has(a.layer);
    link.hidden = !has;
    if (has) link.href = `units.html#${encodeURIComponent(a.layer)}`;
  }

  // ---------------------------------------------------------------- a cell's top units
  function cellUnits(a, size, gx, gy) {
    const b = 16, key = `units/${a.layer}/cells/${a.atlas}/${size}/${Math.floor(gx / b)}_${Math.floor(gy / b)}.json`;
    if (!st.cells.has(key)) {
      st.cells.set(key, fetch(key).then((r) => (r.ok ? r.json() : { cells: [] })).then((block) => {
        const cells = new Map();
        for (const c of block.cells) cells.set(`${c.x},${c.y}`, c.units);
        return cells;
      }).catch(() => new Map()));
    }
    return st.cells.get(key).then((cells) => cells.get(`${gx},${gy}`) || []);
  }

  function onPanel() {
    const view = window.atlasViewer, a = view.state.atlas, sel = view.state.selected;
    let box = $("panel-units-section");
    if (!a || !sel || !st.galleries.has(a.layer)) { if (box) box.hidden = true; return; }
    if (!box) {
      box = document.createElement("section");
      box.id = "panel-units-section";
      box.innerHTML = '<h3>Top units</h3><div id="panel-units"></div>';
      $("panel").appendChild(box);
    }
    box.hidden = false;
    const key = `${a.id}:${sel.grid.size}:${sel.at.gx},${sel.at.gy}`;
    box.dataset.cell = key;
    const list = $("panel-units");
    list.innerHTML = "";
    Promise.all([cellUnits(a, sel.grid.size, sel.at.gx, sel.at.gy), galleryMeta(a.layer)]).then(([units, meta]) => {
      if (box.dataset.cell !== key) return;
      if (!units.length) { list.innerHTML = '<p class="empty">No active units in this cell.</p>'; return; }
      list.innerHTML = units.map(([c, v]) => {
        const thumb = meta && meta.thumbs && meta.thumbs[c] && !meta.dzi
          ? `<img src="units/${esc(a.layer)}/thumbs/${c}.jpg" alt="">` : '<span class="no-vis"></span>';
        return `<a class="unit-link" href="units.html#${encodeURIComponent(a.layer)}/${c}" title="unit ${c}: mean activation ${v}">` +
          `${thumb}unit ${c}<br><span class="val">${Number(v).toFixed(2)}</span></a>`;
      }).join("");
      list.dataset.ready = "1";
    });
  }

  // ---------------------------------------------------------------- the unit's veil
  /** The S x S alpha bytes of a veil: base64 of zlib-compressed bytes (atlas/units/gallery.py). */
  function decode(b64) {
    const s = atob(b64), packed = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) packed[i] = s.charCodeAt(i);
    const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then((buf) => new Uint8ClampedArray(buf));
  }

  function placeUnitVeil() {
    const view = window.atlasViewer, v = view.viewer, a = view.state.atlas;
    if (!st.unit || !a || !v || !v.world.getItemCount()) return;
    const grid = view.activeGrid();
    const key = `${a.id}:${grid.size}`;
    if (st.veilKey === key && (st.pending === key || (st.veil && v.getOverlayById(st.veil)))) return;
    if (st.veil) { v.removeOverlay(st.veil); st.veil = null; }
    st.veilKey = key;
    st.pending = null;
    const cells = a.layer === st.unit.layer && st.unit.cells[a.atlas];
    const entry = cells && cells[String(grid.size)];
    document.body.dataset.unitVeil = "";
    if (!entry) { legend(a.layer === st.unit.layer ? "this atlas's grid has no unit values" : "another layer's unit"); return; }
    st.pending = key;  // decoding: the animation events meanwhile must not start it again
    decode(entry.veil).then((alpha) => {
      if (st.veilKey !== key) return;  // the zoom moved on to another grid
      st.pending = null;
      drawVeil(v, key, alpha, grid.size);
    });
  }

  function drawVeil(v, key, alpha, s) {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = s;
    const ctx = canvas.getContext("2d"), data = ctx.createImageData(s, s);
    for (let i = 0; i < s * s; i++) {
      data.data[4 * i] = BG[0]; data.data[4 * i + 1] = BG[1]; data.data[4 * i + 2] = BG[2]; data.data[4 * i + 3] = alpha[i];
    }
    ctx.putImageData(data, 0, 0);
    const img = document.createElement("img");
    img.className = "veil unit-veil";
    img.alt = "";
    img.src = canvas.toDataURL("image/png");
    if (st.veil) v.removeOverlay(st.veil);
    st.veil = img;
    v.addOverlay({ element: img, location: v.world.getItemAt(0).getBounds() });
    legend(null);
    img.decode().catch(() => null).then(() => { document.body.dataset.unitVeil = key; });
  }

  function legend(note) {
    let el = $("unit-legend");
    if (!el) {
      el = document.createElement("div");
      el.id = "unit-legend";
      $("legend").appendChild(el);
    }
    const u = st.unit, page = `units.html#${encodeURIComponent(u.layer)}/${u.channel}`;
    const clear = `${location.pathname}${location.hash}`;
    el.innerHTML = `<label class="toggle">highlight <b><a href="${esc(page)}">unit ${u.channel}</a></b> of ${esc(u.layer)}</label>` +
      `<div class="ramp"><span>bright: the unit is strong</span><span>dark: weak</span></div>` +
      (note ? `<p class="hint">${esc(note)}</p>` : "") + `<p class="hint"><a href="${esc(clear)}">clear</a></p>`;
  }

  // ---------------------------------------------------------------- wiring
  function start() {
    const view = window.atlasViewer;
    if (!view || !view.viewer || !view.state.atlas) { setTimeout(start, 100); return; }
    const v = view.viewer;
    updateLink();
    new MutationObserver(onPanel).observe($("panel-title"), { childList: true, characterData: true, subtree: true });
    new MutationObserver(updateLink).observe($("f-layer"), { childList: true, characterData: true, subtree: true });
    if (st.unit) {
      const hl = $("hl-toggle");  // the unit's veil replaces a class highlight's
      if (hl && hl.checked) { hl.checked = false; hl.dispatchEvent(new Event("change")); }
      v.addHandler("open", () => {
        if (st.veil) v.removeOverlay(st.veil);
        st.veil = st.veilKey = st.pending = null;
        placeUnitVeil();
      });
      v.addHandler("animation", placeUnitVeil);
      placeUnitVeil();
    }
  }

  const css = document.createElement("link");  // the panel's unit thumbnails and the veil legend
  css.rel = "stylesheet";
  css.href = "units.css";
  document.head.appendChild(css);

  getJSON("units.json").then((m) => {
    for (const x of m.layers || []) st.galleries.set(x.layer, x);
    if (wanted && st.galleries.has(wanted.layer)) {
      return getJSON(`units/${wanted.layer}/unit/${wanted.channel}.json`).then((unit) => {
        st.unit = { layer: wanted.layer, channel: wanted.channel, cells: unit.cells || {} };
      }).catch(() => null);
    }
    return null;
  }).catch(() => null).then(start);

  window.atlasUnits = { state: st, placeUnitVeil };
})();
