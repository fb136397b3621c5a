/* An inspected image on the atlas (loaded after viewer.js once an inspect report exists, see atlas/viewer.py).
 *
 * index.html?inspect=NAME draws the image positions of report NAME (tiles/inspect/NAME, atlas.inspect.onatlas) as
 * dots over the atlas they were placed on, coloured by their attribution to the report's class (the report's own
 * diverging colours), with a legend naming each image and linking back to the report (inspect/NAME/index.html).
 * The dots are OpenSeadragon overlays at points of the image, so they keep their size while the atlas zooms.
 * The points come from the report's report.json (images[].atlas.points) or, for a placement written on its own,
 * from the listing's "points" (tiles/inspect.json). It uses the viewer only through window.atlasViewer.
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const wanted = new URLSearchParams(location.search).get("inspect");
  const st = { name: wanted, report: null, sets: [], dots: [], drawnFor: null, switched: false };

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function getJSON(url) {
    return fetch(url).then((r) => { if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`); return r.json(); });
  }
  function enc(path) { return path.split("/").map(encodeURIComponent).join("/"); }

  /** The points files of report NAME: from its report.json, else the listing's own list, else NAME/points.json. */
  function pointFiles(entry) {
    const base = `inspect/${enc(st.name)}/`;
    return getJSON(`${base}report.json`).then((rep) => {
      const files = (rep.images || []).map((i) => i.atlas && i.atlas.points).filter(Boolean).map((p) => base + enc(p));
      if (!files.length) throw new Error("no points in the report");
      st.report = `${base}index.html`;
      return files;
    }).catch(() => {
      if (entry && Array.isArray(entry.points) && entry.points.length) return entry.points.map(enc);
      return [`${base}points.json`];
    });
  }

  function style() {
    const css = document.createElement("style");
    css.textContent = `
      .inspect-dot { width: 11px; height: 11px; margin: -5.5px 0 0 -5.5px; border-radius: 50%; pointer-events: none;
        border: 1.5px solid rgba(0, 0, 0, 0.85); box-shadow: 0 0 0 1px rgba(255, 255, 255, 0.55); }
      #inspect-legend { margin-top: 10px; border-top: 1px solid var(--line); padding-top: 8px; }
      #inspect-legend .inspect-ramp { height: 8px; border-radius: 4px; margin: 5px 0 2px; }
      #inspect-legend .inspect-scale { display: flex; justify-content: space-between; font-size: 11px; color: var(--muted); }
      #inspect-legend b { color: var(--accent); }
      #inspect-legend a { color: var(--cool); }`;
    document.head.appendChild(css);
  }

  function legend(note) {
    let el = $("inspect-legend");
    if (!el) {
      el = document.createElement("div");
      el.id = "inspect-legend";
      $("legend").appendChild(el);
    }
    const clear = `${location.pathname}${location.hash}`;
    const parts = st.sets.map((s) => {
      const ramp = `linear-gradient(90deg, ${s.ramp.join(", ")})`;
      const v = Number(s.scale).toPrecision(2);
      return `<div class="inspect-image"><div>image <b>${esc(s.image)}</b> · ${s.points.length} positions on ${esc(s.layer)}/${esc(s.atlas)}</div>` +
        `<div class="hint">dots: attribution to ${esc((s.target && s.target.name) || "the top class")}</div>` +
        `<div class="inspect-ramp" style="background:${ramp}"></div>` +
        `<div class="inspect-scale"><span>−${v}</span><span>0</span><span>+${v}</span></div></div>`;
    }).join("");
    const report = st.report ? `<a id="inspect-report" href="${esc(st.report)}">the report</a> · ` : "";
    el.innerHTML = parts + (note ? `<p class="hint">${esc(note)}</p>` : "") + `<p class="hint">${report}<a href="${esc(clear)}">clear</a></p>`;
  }

  function clearDots(v) {
    for (const d of st.dots) v.removeOverlay(d);
    st.dots = [];
  }

  /** Draw the dots of every image placed on the open atlas (once per opened atlas). */
  function draw() {
    const view = window.atlasViewer, v = view.viewer, a = view.state.atlas;
    if (!a || !v || !v.world.getItemCount()) return;
    const key = `${a.id}:${v.world.getItemAt(0).source && v.world.getItemAt(0).source.width}`;
    if (st.drawnFor === key && st.dots.length && v.getOverlayById(st.dots[0])) return;
    clearDots(v);
    st.drawnFor = key;
    const item = v.world.getItemAt(0), mine = st.sets.filter((s) => `${s.layer}/${s.atlas}` === a.id);
    for (const s of mine) {
      for (const [x, y, value, colour] of s.points) {
        const el = document.createElement("div");
        el.className = "inspect-dot";
        el.style.background = colour;
        el.dataset.attribution = value;
        const at = item.imageToViewportCoordinates(x * a.width, y * a.height);
        v.addOverlay({ element: el, location: at });
        st.dots.push(el);
      }
    }
    const elsewhere = st.sets.filter((s) => !mine.includes(s)).map((s) => `${s.layer}/${s.atlas}`);
    legend(mine.length ? null : `placed on ${[...new Set(elsewhere)].join(", ")}: open that atlas`);
    document.body.dataset.inspect = String(st.dots.length);
  }

  function start() {
    const view = window.atlasViewer;
    if (!view || !view.viewer || !view.state.atlas) { setTimeout(start, 100); return; }
    const v = view.viewer, a = view.state.atlas;
    const first = st.sets[0], target = first && `${first.layer}/${first.atlas}`;
    // Open the atlas the image was placed on, unless the address names an atlas of its own.
    if (target && a.id !== target && !location.hash.slice(1) && view.state.atlases.some((x) => x.id === target)) view.open(target);
    v.addHandler("open", () => { st.dots = []; st.drawnFor = null; draw(); });
    draw();
  }

  if (!wanted) return;
  style();
  getJSON("inspect.json").then((m) => {
    const entry = (m.reports || []).find((r) => r.name === wanted);
    if (!entry) throw new Error(`no inspect report '${wanted}'`);
    return pointFiles(entry);
  }).then((files) => Promise.all(files.map((f) => getJSON(f).catch(() => null)))).then((sets) => {
    st.sets = sets.filter((s) => s && Array.isArray(s.points));
    start();
  }).catch((err) => {
    const view = window.atlasViewer;
    const show = () => { if (!view || !$("legend")) { setTimeout(show, 100); return; } legend(String(err.message || err)); };
    show();
    document.body.dataset.inspect = "none";
  });

  window.atlasInspect = { state: st, draw };
})();
