// Layers side by side (atlas.layers): one deep-zoom viewer per layer of a view listed in layers.json, each with its
// atlas's highlight veil (the `atlas tiles --highlight` PNG of the grid nearest the zoom), optionally moved together.
// State for tests: body[data-loaded] counts the viewers whose tiles are fully loaded, body[data-veils] the veils drawn.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const state = { views: [], atlases: [], columns: [], syncing: false, active: null };

  function status(text) { const s = $("status"); s.hidden = !text; s.textContent = text || ""; }

  async function json(url) {
    const r = await fetch(url, { cache: "no-cache" });
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  function veilGrid(col) {
    // the grid whose canvas is nearest the image's width on screen (the grid the semantic zoom shows)
    const item = col.viewer.world.getItemAt(0);
    if (!item) return null;
    const b = item.getBounds(true);
    const w = Math.abs(col.viewer.viewport.pixelFromPoint(b.getTopRight(), true).x - col.viewer.viewport.pixelFromPoint(b.getTopLeft(), true).x);
    let best = null;
    for (const g of col.atlas.grids) {
      const d = Math.abs(Math.log(Math.max(g.canvas, 1) / Math.max(w, 1)));
      if (!best || d < best.d) best = { g, d };
    }
    return best && best.g;
  }

  function placeVeil(col) {
    const a = col.atlas;
    if (!a.highlight || !$("hl-toggle").checked) {
      if (col.veil) { col.viewer.removeOverlay(col.veil); col.veil = null; col.veilSize = null; }
      countVeils();
      return;
    }
    const g = veilGrid(col);
    if (!g || (col.veil && col.veilSize === g.size)) return;
    if (col.veil) col.viewer.removeOverlay(col.veil);
    const img = document.createElement("img");
    img.className = "veil";
    img.alt = "";
    img.dataset.layer = a.layer;
    img.addEventListener("load", countVeils);
    img.src = `${a.base}${a.highlight.dir}/${g.size}.png`;
    col.veil = img;
    col.veilSize = g.size;
    col.viewer.addOverlay({ element: img, location: col.viewer.world.getItemAt(0).getBounds() });
  }

  function countVeils() {
    document.body.dataset.veils = String(state.columns.filter((c) => c.veil && c.veil.complete && c.veil.naturalWidth > 0).length);
  }

  function countLoaded() {
    document.body.dataset.loaded = String(state.columns.filter((c) => c.loaded).length);
  }

  function follow(source) {
    // linked views: every other viewer shows the same region of its (equally proportioned) atlas. Only the viewer the
    // user is driving leads, so the followers' own animation events never pull the leader back mid-animation.
    if (!$("link-views").checked || state.syncing || state.active !== source) return;
    state.syncing = true;
    const center = source.viewer.viewport.getCenter(), zoom = source.viewer.viewport.getZoom();
    for (const col of state.columns) {
      if (col !== source && col.viewer.world.getItemCount()) {
        col.viewer.viewport.zoomTo(zoom, null, true);
        col.viewer.viewport.panTo(center, true);
      }
    }
    state.syncing = false;
  }

  function openView(name) {
    const view = state.views.find((v) => v.name === name) || state.views[0];
    for (const col of state.columns) col.viewer.destroy();
    state.columns = [];
    const main = $("columns");
    main.innerHTML = "";
    $("view-menu").value = view.name;
    $("f-atlas").textContent = view.atlas;
    $("f-highlight").textContent = view.highlight || "none";
    document.body.dataset.loaded = "0";
    document.body.dataset.veils = "0";
    if (new URLSearchParams(location.search).get("view") !== view.name) history.replaceState(null, "", `?view=${encodeURIComponent(view.name)}`);
    view.ids.forEach((id, i) => {
      const atlas = state.atlases.find((a) => a.id === id);
      const col = document.createElement("section");
      col.className = "layer-col";
      col.dataset.layer = id.split("/")[0];
      const head = document.createElement("h2");
      head.innerHTML = `<span></span><span class="muted"></span>`;
      head.firstChild.textContent = id.split("/")[0];
      head.lastChild.textContent = atlas ? `${atlas.atlas} · ${atlas.grids.map((g) => g.size).join("/")}` : "not tiled";
      const osd = document.createElement("div");
      osd.className = "layer-osd";
      osd.id = `osd-${i}`;
      col.append(head, osd);
      main.appendChild(col);
      if (!atlas) { status(`${id} is not in atlases.json; run atlas tiles for it`); return; }
      const viewer = OpenSeadragon({
        id: osd.id, prefixUrl: "openseadragon/images/", drawer: "canvas", showNavigator: false, showRotationControl: false,
        maxZoomPixelRatio: 3, visibilityRatio: 0.6, zoomPerScroll: 1.4, animationTime: 0.5,
        gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
      });
      const entry = { viewer, atlas, veil: null, veilSize: null, loaded: false };
      state.columns.push(entry);
      viewer.addHandler("open", () => {
        viewer.world.getItemAt(0).addHandler("fully-loaded-change", (e) => { entry.loaded = e.fullyLoaded; countLoaded(); });
        placeVeil(entry);
      });
      viewer.addHandler("zoom", () => placeVeil(entry));
      viewer.addHandler("animation", () => follow(entry));
      for (const ev of ["canvas-enter", "canvas-press", "canvas-scroll"]) viewer.addHandler(ev, () => { state.active = entry; });
      viewer.open(atlas.dzi);
    });
  }

  async function start() {
    try {
      const [layers, atlases] = await Promise.all([json("layers.json"), json("atlases.json")]);
      state.views = layers.views || [];
      state.atlases = atlases.atlases || [];
    } catch (err) {
      status(`cannot read the views: ${err.message}`);
      return;
    }
    if (!state.views.length) { status("no side-by-side view yet: run atlas side-by-side RUN --layer A --layer B"); return; }
    const menu = $("view-menu");
    for (const v of state.views) {
      const o = document.createElement("option");
      o.value = v.name;
      o.textContent = `${v.layers.join(" | ")} · ${v.atlas}${v.highlight ? " · " + v.highlight : ""}`;
      menu.appendChild(o);
    }
    menu.addEventListener("change", () => openView(menu.value));
    $("hl-toggle").addEventListener("change", () => state.columns.forEach((c) => { if (c.veil) { c.viewer.removeOverlay(c.veil); c.veil = null; } placeVeil(c); }));
    openView(new URLSearchParams(location.search).get("view"));
  }

  start();
})();
