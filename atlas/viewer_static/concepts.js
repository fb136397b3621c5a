// The concepts panel beside the atlas: a grid of concept icons; clicking one shows its top dataset patches, its
// classes and its veil over the atlas (cells where the concept is strong stay bright); hovering a cell of the atlas
// lists its strongest concepts with their share of the cell's mean activation. Data: concepts/{layer}/panel.json.
"use strict";

const state = { layer: null, doc: null, selected: null };
const $ = (id) => document.getElementById(id);

function decodeVeil(b64) {
  // zlib (deflate) bytes, one per cell: decompressed with the browser's DecompressionStream
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Response(stream).arrayBuffer().then((buf) => new Uint8Array(buf));
}

function iconStyle(el, k, size) {
  const scale = 48 / size;
  el.style.backgroundImage = `url(concepts/${state.layer}/icons.png)`;
  el.style.backgroundSize = `48px ${state.doc.concepts.length * 48}px`;
  el.style.backgroundPosition = `0 ${-k * size * scale}px`;
}

async function drawVeil(k) {
  const atlas = state.doc.atlas;
  const canvas = $("veil");
  const ctx = canvas.getContext("2d");
  if (!atlas) return;
  const s = atlas.size;
  canvas.width = s; canvas.height = s;
  ctx.clearRect(0, 0, s, s);
  if (k === null) return;
  const values = await decodeVeil(state.doc.concepts[k].veil);
  const img = ctx.createImageData(s, s);
  for (let i = 0; i < s * s; i++) {
    // dark where the concept is weak, clear where it is strongest (the atlas viewer's class veil, by mean code)
    const strength = values[i] / 255;
    img.data[4 * i] = 17; img.data[4 * i + 1] = 19; img.data[4 * i + 2] = 24;
    img.data[4 * i + 3] = Math.round(215 * Math.pow(1 - strength, 1.5));
  }
  ctx.putImageData(img, 0, 0);
  canvas.dataset.concept = String(k);
}

function select(k) {
  state.selected = k;
  document.querySelectorAll("#grid .concept").forEach((el) => el.classList.toggle("selected", Number(el.dataset.k) === k));
  const c = state.doc.concepts[k];
  $("detail").hidden = false;
  $("title").textContent = `concept ${k}`;
  $("patches").src = `concepts/${state.layer}/top/${k}.jpg`;
  $("labels").textContent = c.labels ? "labels: " + c.labels.join(", ") : "";
  const list = $("classes");
  list.innerHTML = "";
  if (c.classes) {
    for (const [name, score] of c.classes) {
      const li = document.createElement("li");
      li.textContent = `${name} (${score.toFixed(3)})`;
      list.appendChild(li);
    }
  } else {
    const li = document.createElement("li");
    li.textContent = "no classes: the run was sampled without attributions";
    list.appendChild(li);
  }
  drawVeil(k);
}

function hover(event) {
  const atlas = state.doc && state.doc.atlas;
  if (!atlas) return;
  const box = $("atlas-box").getBoundingClientRect();
  const gx = Math.floor(((event.clientX - box.left) / box.width) * atlas.size);
  const gy = Math.floor(((event.clientY - box.top) / box.height) * atlas.size);
  const found = atlas.cells[`${gy},${gx}`];
  const out = $("cell");
  out.innerHTML = "";
  const head = document.createElement("div");
  head.textContent = `cell (${gx}, ${gy})` + (found ? ": strongest concepts, share of the cell's mean activation" : ": no samples");
  out.appendChild(head);
  if (!found) return;
  const list = document.createElement("ol");
  for (const [k, share] of found) {
    const li = document.createElement("li");
    li.dataset.k = String(k);
    li.innerHTML = `concept ${k} <span class="share">${(100 * share).toFixed(1)}%</span>`;
    li.addEventListener("click", () => select(k));
    list.appendChild(li);
  }
  out.appendChild(list);
}

async function load(layer) {
  state.layer = layer;
  const doc = await (await fetch(`concepts/${layer}/panel.json`)).json();
  state.doc = doc;
  const s = doc.summary || {};
  $("summary").textContent = `${doc.concepts.length} concepts (${doc.method}), R² ${s.r2}, ${s.active_per_sample} active per sample, ${s.dead} dead`;
  const grid = $("grid");
  grid.innerHTML = "";
  doc.concepts.forEach((c, k) => {
    const el = document.createElement("div");
    el.className = "concept";
    el.dataset.k = String(k);
    el.title = `concept ${k}` + (c.classes && c.classes.length ? `: ${c.classes[0][0]}` : "");
    iconStyle(el, k, doc.icon_size);
    el.addEventListener("click", () => select(k));
    grid.appendChild(el);
  });
  if (doc.atlas) {
    $("atlas").src = `concepts/${layer}/atlas.png`;
    $("atlas-box").addEventListener("mousemove", hover);
  } else {
    $("atlas-box").hidden = true;
    $("cell").textContent = "This layer has no atlas grid yet: build the atlas, then run atlas concepts again for the veils.";
  }
  drawVeil(null);
  document.body.dataset.ready = "1";
}

async function main() {
  const listing = await (await fetch("concepts.json")).json();
  const layers = listing.layers.map((x) => x.layer);
  const wanted = new URLSearchParams(location.search).get("layer");
  const layer = layers.includes(wanted) ? wanted : layers[0];
  const select_ = $("layer");
  for (const name of layers) {
    const opt = document.createElement("option");
    opt.value = name; opt.textContent = name; opt.selected = name === layer;
    select_.appendChild(opt);
  }
  select_.addEventListener("change", () => { location.search = `?layer=${encodeURIComponent(select_.value)}`; });
  await load(layer);
}

main();
