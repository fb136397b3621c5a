/* The atlas page's link to the concepts panel (loaded after viewer.js once a layer has concepts, see atlas/viewer.py).
 *
 * The bar gets a "Concepts" link to concepts.html?layer=LAYER when the open atlas's layer is listed in concepts.json
 * (written by `atlas concepts`). It uses the viewer only through window.atlasViewer and the page's elements.
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  let layers = null;  // the layers with a panel, once concepts.json is read

  function updateLink() {
    const a = window.atlasViewer.state.atlas;
    const link = window.atlasViewer.barLink("concepts-link", "Concepts",
      "a sparse dictionary of this layer: each concept's icon, dataset patches, classes and place on the map");
    const has = Boolean(a && layers && layers.has(a.layer));
    link.hidden = !has;
    if (has) link.href = `concepts.html?layer=${encodeURIComponent(a.layer)}`;
  }

  function start() {
    const view = window.atlasViewer;
    if (!view || !view.viewer || !view.state.atlas) { setTimeout(start, 100); return; }
    fetch("concepts.json")
      .then((r) => (r.ok ? r.json() : { layers: [] }))
      .catch(() => ({ layers: [] }))
      .then((doc) => {
        layers = new Set((doc.layers || []).map((entry) => entry.layer));
        updateLink();
        new MutationObserver(updateLink).observe($("f-layer"), { childList: true, characterData: true, subtree: true });
      });
  }
  start();
})();
