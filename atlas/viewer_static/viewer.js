/* Activation Atlas viewer: OpenSeadragon over the DZI pyramids listed in atlases.json.
 *
 * The grid under the cursor is the one whose icons are on screen: OpenSeadragon draws the
 * highest pyramid level no larger than twice the displayed width (minPixelRatio 0.5), and a
 * level shows the grid that owns it or, between owned levels, the finer grid it was
 * downsampled from. Cell metadata comes in BLOCK x BLOCK files fetched on demand.
 */
(function () {
  "use strict";

  const MIN_PIXEL_RATIO = 0.5;
  const $ = (id) => document.getElementById(id);
  const state = { atlases: [], atlas: null, viewer: null, blocks: new Map(), hover: null, selected: null, veil: null, grid: null };

  function fmtInt(n) { return Number(n).toLocaleString("en-US"); }
  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function status(message) {
    const el = $("status");
    el.hidden = !message;
    el.textContent = message || "";
  }

  // ---------------------------------------------------------------- grids and cells
  /** The grid whose icons are drawn at the current zoom. */
  function activeGrid() {
    const a = state.atlas, v = state.viewer;
    if (!a || !v || !v.world.getItemCount()) return null;
    const shown = v.viewport.getZoom(true) * v.viewport.getContainerSize().x; // image width in CSS px
    const top = a.levels - 1;
    const level = Math.max(0, Math.min(top, top + Math.floor(Math.log2(shown / MIN_PIXEL_RATIO / a.width))));
    const owners = a.grids.filter((g) => g.level >= level).sort((x, y) => x.level - y.level);
    return owners.length ? owners[0] : a.grids[a.grids.length - 1];
  }

  /** Cell (gx, gy) of a grid under a point in viewport coordinates, or null outside the image. */
  function cellAt(point, grid) {
    const img = state.viewer.world.getItemAt(0);
    const p = img.viewportToImageCoordinates(point);
    const x = p.x / state.atlas.width, y = p.y / state.atlas.height;
    if (x < 0 || y < 0 || x >= 1 || y >= 1) return null;
    return { gx: Math.floor(x * grid.size), gy: Math.floor(y * grid.size) };
  }

  function cellRect(grid, gx, gy) {
    const img = state.viewer.world.getItemAt(0);
    const step = state.atlas.width / grid.size;
    return img.imageToViewportRectangle(gx * step, gy * step, step, step);
  }

  /** Metadata of one cell (null when the cell has no samples), fetching its block once. */
  function cellInfo(grid, gx, gy) {
    const a = state.atlas, b = a.block;
    const key = `${a.base}meta/${grid.size}/${Math.floor(gx / b)}_${Math.floor(gy / b)}.json`;
    if (!state.blocks.has(key)) {
      state.blocks.set(key, fetch(key).then((r) => (r.ok ? r.json() : { cells: [] })).then((block) => {
        const cells = new Map();
        for (const c of block.cells) cells.set(`${c.x},${c.y}`, c);
        return cells;
      }).catch(() => new Map()));
    }
    return state.blocks.get(key).then((cells) => cells.get(`${gx},${gy}`) || null);
  }

  function classList(top) {
    if (!top || !top.length) return '<li class="empty">no class attributions</li>';
    const scale = Math.max(...top.map((t) => Math.abs(t[1])), 1e-9);
    return top.map(([name, value]) => {
      const w = Math.round((Math.abs(value) / scale) * 100);
      return `<li><span class="name" title="${esc(name)}">${esc(name)}</span>` +
        `<span class="bar"><i class="${value < 0 ? "neg" : ""}" style="width:${w}%"></i></span>` +
        `<span class="val">${value.toFixed(3)}</span></li>`;
    }).join("");
  }

  /** Show frame (col, row) of a cols x rows sprite sheet as the background of el. */
  function showFrame(el, url, cols, rows, col, row) {
    el.style.backgroundImage = `url("${url}")`;
    el.style.backgroundSize = `${cols * 100}% ${rows * 100}%`;
    el.style.backgroundPosition = `${cols > 1 ? (col / (cols - 1)) * 100 : 0}% ${rows > 1 ? (row / (rows - 1)) * 100 : 0}%`;
  }

  function showIcon(el, grid, cell) {
    const b = state.atlas.block, bx = Math.floor(cell.x / b), by = Math.floor(cell.y / b);
    const cols = Math.min(b, grid.size - bx * b), rows = Math.min(b, grid.size - by * b);
    showFrame(el, `${state.atlas.base}icons/${grid.size}/${bx}_${by}.jpg`, cols, rows, cell.x - bx * b, cell.y - by * b);
    el.style.width = el.style.height = `${Math.max(2 * grid.icon, 96)}px`;
  }

  function showExample(el, grid, cell, index) {
    showFrame(el, `${state.atlas.base}examples/${grid.size}/${cell.y}/${cell.x}.jpg`, cell.ex, 1, index, 0);
  }

  // ---------------------------------------------------------------- hover and click
  function showTooltip(event, grid, at, cell) {
    const tip = $("tooltip");
    const head = `<div class="tt-head"><span>cell ${at.gx}, ${at.gy}</span><span>grid ${grid.size}×${grid.size}</span></div>`;
    let body;
    if (!cell) body = '<div class="tt-n">empty cell</div>';
    else {
      body = `<div class="tt-n"><b>${fmtInt(cell.n)}</b> sample${cell.n === 1 ? "" : "s"}` +
        `${cell.drawn ? "" : ' <span class="empty">(too few to draw)</span>'}</div>` +
        `<ol class="classes">${classList(cell.top)}</ol>`;
      if (Array.isArray(cell.cls) && cell.cls.length) {
        body += '<div class="tt-focus">' + cell.cls.map(([name, value]) =>
          `<div class="tt-head"><span>attribution to ${esc(name)}</span><span>${Number(value).toFixed(3)}</span></div>`).join("") +
          "</div>";
      }
      if (cell.hl !== undefined && state.atlas.highlight) {
        body += `<div class="tt-head" style="margin-top:6px"><span>attribution to ${esc(state.atlas.highlight.class)}</span>` +
          `<span>${cell.hl.toFixed(3)}</span></div>`;
      }
    }
    tip.innerHTML = head + body;
    tip.hidden = false;
    const stage = $("stage").getBoundingClientRect();
    let x = event.originalEvent.clientX - stage.left + 16, y = event.originalEvent.clientY - stage.top + 16;
    if (x + tip.offsetWidth > stage.width - 8) x -= tip.offsetWidth + 32;
    if (y + tip.offsetHeight > stage.height - 8) y -= tip.offsetHeight + 32;
    tip.style.left = `${x}px`;
    tip.style.top = `${y}px`;
  }

  function placeBox(which, grid, at) {
    const v = state.viewer;
    let el = state[which + "Box"];
    if (!at) { if (el) el.style.display = "none"; return; }
    const rect = cellRect(grid, at.gx, at.gy);
    if (!el || !v.getOverlayById(el)) {
      el = document.createElement("div");
      el.className = "cell-box" + (which === "selected" ? " selected" : "");
      state[which + "Box"] = el;
      v.addOverlay({ element: el, location: rect });
    } else v.updateOverlay(el, rect);
    el.style.display = "block";
  }

  function onMove(event) {
    const v = state.viewer;
    if (!v || !v.world.getItemCount()) return;
    const grid = activeGrid();
    const at = cellAt(v.viewport.pointFromPixel(event.position), grid);
    if (!at) { onLeave(); return; }
    const key = `${grid.size}:${at.gx},${at.gy}`;
    state.hover = key;
    placeBox("hover", grid, at);
    cellInfo(grid, at.gx, at.gy).then((cell) => { if (state.hover === key) showTooltip(event, grid, at, cell); });
  }

  function onLeave() {
    state.hover = null;
    $("tooltip").hidden = true;
    placeBox("hover", null, null);
  }

  function openPanel(grid, at, cell) {
    $("panel").hidden = false;
    $("panel-title").textContent = `Cell ${at.gx}, ${at.gy} · grid ${grid.size}×${grid.size}`;
    const icon = $("panel-icon");
    if (cell && cell.drawn) { icon.hidden = false; showIcon(icon, grid, cell); } else icon.hidden = true;
    $("panel-count").innerHTML = cell ? `<b>${fmtInt(cell.n)}</b> samples in this cell` : "No samples in this cell.";
    $("panel-classes").innerHTML = cell ? classList(cell.top) : "";
    const ex = $("panel-examples");
    ex.innerHTML = "";
    if (cell && cell.ex) {
      for (let i = 0; i < cell.ex; i++) {
        const el = document.createElement("div");
        el.className = "sprite";
        showExample(el, grid, cell, i);
        ex.appendChild(el);
      }
    } else {
      ex.innerHTML = `<p class="empty">${state.atlas.examples ? "No examples for this cell." :
        "Example patches were not written (tiles made with --no-examples)."}</p>`;
    }
  }

  function onClick(event) {
    if (!event.quick) return;
    event.preventDefaultAction = true;
    const v = state.viewer, grid = activeGrid();
    const at = cellAt(v.viewport.pointFromPixel(event.position), grid);
    if (!at) return;
    state.selected = { grid, at };
    placeBox("selected", grid, at);
    cellInfo(grid, at.gx, at.gy).then((cell) => openPanel(grid, at, cell));
  }

  // ---------------------------------------------------------------- chrome
  function updateFacts() {
    const a = state.atlas, grid = activeGrid();
    if (!a || !grid) return;
    if (state.grid !== grid.size) {
      state.grid = grid.size;
      $("f-grid").textContent = `${grid.size}×${grid.size}`;
      $("f-cells").textContent = fmtInt(grid.cells);
      for (const li of $("ladder").children) li.classList.toggle("active", Number(li.dataset.size) === grid.size);
      placeVeil(grid);
    }
    placeAxisLabels();
  }

  function placeAxisLabels() {
    const a = state.atlas, v = state.viewer;
    const left = $("axis-left"), right = $("axis-right");
    const labels = a && Array.isArray(a.axis_labels) && a.axis_labels.length >= 2 ? a.axis_labels : null;
    left.hidden = right.hidden = !labels;
    if (!labels || !v.world.getItemCount()) return;
    const bounds = v.world.getItemAt(0).getBounds(true);
    const width = v.container.clientWidth;
    const x0 = v.viewport.pixelFromPoint(bounds.getTopLeft(), true).x;
    const x1 = v.viewport.pixelFromPoint(bounds.getTopRight(), true).x;
    left.textContent = `← ${labels[0]}`;
    right.textContent = `${labels[1]} →`;
    left.style.left = `${Math.max(12, Math.min(x0, width / 2 - 200))}px`;
    right.style.left = `${Math.min(width - 12, Math.max(x1, width / 2 + 200))}px`;
  }

  function placeVeil(grid) {
    const a = state.atlas, v = state.viewer;
    if (state.veil) { v.removeOverlay(state.veil); state.veil = null; }
    if (!a.highlight || !$("hl-toggle").checked) return;
    const img = document.createElement("img");
    img.className = "veil";
    img.alt = "";
    img.src = `${a.base}${a.highlight.dir}/${grid.size}.png`;
    state.veil = img;
    v.addOverlay({ element: img, location: v.world.getItemAt(0).getBounds() });
  }

  function buildLegend() {
    const a = state.atlas;
    const ladder = $("ladder");
    ladder.innerHTML = "";
    for (const g of a.grids) {
      const li = document.createElement("li");
      li.dataset.size = g.size;
      li.textContent = `${g.size}×${g.size}`;
      li.title = `zoom to the ${g.size}×${g.size} grid`;
      li.addEventListener("click", () => {
        const v = state.viewer;
        // show this grid's level at 1:1, i.e. its canvas width on screen
        v.viewport.zoomTo(g.canvas / v.viewport.getContainerSize().x * 0.999);
      });
      ladder.appendChild(li);
    }
    $("density-note").hidden = !a.density_scale;
    $("hl-legend").hidden = !a.highlight;
    if (a.highlight) $("hl-class").textContent = a.highlight.class;
    $("f-layer").textContent = a.layer;
    $("f-model").textContent = a.model;
  }

  function label(a) {
    const kind = a.atlas === "full" ? "full atlas" : a.atlas;
    return `${a.layer} · ${kind}`;
  }

  // ---------------------------------------------------------------- atlases
  function openAtlas(id) {
    const a = state.atlases.find((x) => x.id === id) || state.atlases[0];
    state.atlas = a;
    state.blocks.clear();
    state.grid = null;
    state.hoverBox = state.selectedBox = state.veil = null;
    $("panel").hidden = true;
    $("atlas-menu").value = a.id;
    document.body.dataset.loaded = "";
    if (location.hash.slice(1) !== encodeURIComponent(a.id)) history.replaceState(null, "", `#${encodeURIComponent(a.id)}`);
    buildLegend();
    state.viewer.open(a.dzi);
  }

  function makeViewer() {
    const v = OpenSeadragon({
      id: "osd",
      prefixUrl: "openseadragon/images/",
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      showRotationControl: false,
      maxZoomPixelRatio: 3,
      minPixelRatio: MIN_PIXEL_RATIO,
      visibilityRatio: 0.6,
      zoomPerScroll: 1.4,
      animationTime: 0.7,
      blendTime: 0.15,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    });
    v.addHandler("open", () => {
      const item = v.world.getItemAt(0);
      item.addHandler("fully-loaded-change", (e) => { document.body.dataset.loaded = e.fullyLoaded ? "1" : ""; });
      status("");
      updateFacts();
    });
    v.addHandler("open-failed", () => status(`Could not open ${state.atlas.dzi}`));
    v.addHandler("animation", updateFacts);
    v.addHandler("resize", updateFacts);
    v.addHandler("canvas-click", onClick);
    v.addHandler("canvas-exit", onLeave);
    new OpenSeadragon.MouseTracker({ element: v.canvas, moveHandler: onMove, leaveHandler: onLeave });
    return v;
  }

  function init() {
    $("panel-close").addEventListener("click", () => { $("panel").hidden = true; placeBox("selected", null, null); });
    $("hl-toggle").addEventListener("change", () => { state.grid = null; updateFacts(); });
    $("atlas-menu").addEventListener("change", (e) => openAtlas(e.target.value));
    fetch("atlases.json").then((r) => {
      if (!r.ok) throw new Error(`atlases.json: HTTP ${r.status}`);
      return r.json();
    }).then((m) => {
      state.atlases = m.atlases || [];
      if (!state.atlases.length) { status("No atlases yet: run `atlas tiles RUN --layer LAYER`."); return; }
      const menu = $("atlas-menu");
      for (const a of state.atlases) {
        const opt = document.createElement("option");
        opt.value = a.id;
        opt.textContent = label(a);
        menu.appendChild(opt);
      }
      state.viewer = makeViewer();
      openAtlas(decodeURIComponent(location.hash.slice(1)));
    }).catch((err) => status(`Cannot load the atlas list (${err.message}). Open this page through \`atlas serve RUN\`.`));
  }

  /** For tests and the console: the viewer, state, and the page position of a cell's centre. */
  window.atlasViewer = {
    state,
    get viewer() { return state.viewer; },
    activeGrid,
    open: openAtlas,
    /** The add-ons' link in the bar, after the atlas menu (made once, found by id afterwards). */
    barLink(id, text, title) {
      let link = document.getElementById(id);
      if (!link) {
        link = document.createElement("a");
        link.id = id;
        link.className = "units-link";
        link.textContent = text;
        link.title = title;
        const menu = document.querySelector("#bar .menu");
        menu.parentNode.insertBefore(link, menu.nextSibling);
      }
      return link;
    },
    cellCenter(size, gx, gy) {
      const grid = state.atlas.grids.find((g) => g.size === size);
      const r = cellRect(grid, gx, gy);
      const p = state.viewer.viewport.pixelFromPoint(r.getCenter(), true);
      const box = state.viewer.container.getBoundingClientRect();
      return { x: box.left + p.x, y: box.top + p.y };
    },
  };

  window.addEventListener("hashchange", () => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (state.atlas && id && id !== state.atlas.id) openAtlas(id);
  });
  init();
})();
