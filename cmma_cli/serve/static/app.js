// The cmma search page: a search box (text, material id, or a CIF / pattern file), a results table linked to
// each material's page, and a map of the latent space (canvas; hover shows a material, click opens it).
// Plain JavaScript, no build step; it talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { map: null, screen: [], colour: null };
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  if (Array.isArray(value)) return value.join(", ");
  return String(value);
}

function materialLink(id) {
  return el("a", { href: "#/material/" + encodeURIComponent(id), class: "material-link" }, id);
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || body.detail || response.statusText);
  return body;
}

// ------------------------------------------------------------------------------------------------ search

async function search(event) {
  event.preventDefault();
  const status = $("status");
  const form = new FormData();
  const file = $("file").files[0];
  const q = $("q").value.trim();
  if (file) form.append("file", file); else if (q) form.append("query", q);
  else { status.textContent = "Type a query or choose a file."; return; }
  form.append("k", $("k").value || "10");
  if ($("to").value) form.append("to", $("to").value);
  if ($("filter").value.trim()) form.append("filters", $("filter").value.trim());
  status.textContent = "Searching…";
  status.className = "muted";
  try {
    const started = performance.now();
    const result = await getJSON("/search", { method: "POST", body: form });
    showResults(result, performance.now() - started);
  } catch (err) {
    status.textContent = "Error: " + err.message;
    status.className = "error";
    $("results").hidden = true;
  }
}

function showResults(result, ms) {
  const body = $("results").querySelector("tbody");
  body.replaceChildren();
  for (const row of result.results) {
    body.append(el("tr", { class: "result" },
      el("td", { class: "num" }, String(row.rank)), el("td", {}, materialLink(row.material_id)),
      el("td", {}, fmt(row.formula)), el("td", { class: "num" }, fmt(row.score, 4)),
      el("td", {}, fmt(row.crystal_system)), el("td", { class: "num" }, fmt(row.band_gap, 2)),
      el("td", { class: "num" }, fmt(row.formation_energy_per_atom))));
  }
  $("results").hidden = result.results.length === 0;
  const t = result.timing_ms || {};
  const warn = (result.warnings || []).join(" ");
  $("status").className = "muted";
  $("status").textContent = `${result.results.length} results: ${result.query.kind} → ${result.to}` +
    ` (encode ${fmt(t.encode, 1)} ms, search ${fmt(t.search, 1)} ms, round trip ${ms.toFixed(0)} ms)` +
    (warn ? " — " + warn : "");
  highlight(result.results.map((r) => r.material_id));
}

// ---------------------------------------------------------------------------------------------- material

async function showMaterial(id) {
  $("material").hidden = false;
  $("search-panel").hidden = true;
  $("material-title").textContent = id;
  for (const part of ["material-structure", "material-neighbours", "material-recipes"]) $(part).replaceChildren();
  $("material-properties").querySelector("tbody").replaceChildren();
  let m;
  try {
    m = await getJSON("/materials/" + encodeURIComponent(id));
  } catch (err) {
    $("material-title").textContent = id + " — " + err.message;
    return;
  }
  const p = m.properties;
  $("material-title").textContent = `${p.formula || ""} — ${m.material_id}`;
  const props = $("material-properties").querySelector("tbody");
  for (const [key, value] of Object.entries(p)) {
    if (value === null || value === undefined) continue;
    props.append(el("tr", {}, el("th", {}, key), el("td", {}, fmt(value))));
  }
  const s = m.cell;
  if (s) {
    $("material-structure").append(
      el("p", {}, `a = ${s.a} Å, b = ${s.b} Å, c = ${s.c} Å; α = ${s.alpha}°, β = ${s.beta}°, γ = ${s.gamma}°; ` +
                  `V = ${s.volume} Å³; ${s.nsites} sites`));
    const sites = el("table", { class: "sites" }, el("tr", {}, el("th", {}, "element"), el("th", {}, "fractional coordinates")));
    for (const site of s.sites.slice(0, 24)) sites.append(el("tr", {}, el("td", {}, site.element), el("td", {}, fmt(site.frac))));
    $("material-structure").append(sites);
    if (s.sites.length > 24) $("material-structure").append(el("p", { class: "muted" }, `… ${s.nsites - 24} more sites`));
  } else {
    $("material-structure").append(el("p", { class: "muted" }, "No structure in processed/."));
  }
  for (const [table, hits] of Object.entries(m.neighbours)) {
    const t = el("table", { class: "neighbours", "data-table": table },
      el("tr", {}, el("th", {}, "material"), el("th", {}, "formula"), el("th", {}, "score")));
    for (const h of hits) t.append(el("tr", {}, el("td", {}, materialLink(h.material_id)), el("td", {}, fmt(h.formula)),
                                      el("td", { class: "num" }, fmt(h.score, 4))));
    $("material-neighbours").append(el("div", {}, el("h4", {}, `by ${table}`), t));
  }
  if (!m.recipes.length) $("material-recipes").append(el("p", { class: "muted" }, "No recipes for this material."));
  for (const r of m.recipes) {
    const box = el("div", { class: "recipe" });
    const head = [r.recipe_id, r.synthesis_type, r.doi].filter(Boolean).join(" · ");
    if (head) box.append(el("strong", {}, head));
    if (r.reaction_string) box.append(el("p", {}, r.reaction_string));
    if (r.precursors && r.precursors.length) box.append(el("p", {}, "Precursors: " + fmt(r.precursors)));
    if (r.paragraph_string) box.append(el("p", {}, r.paragraph_string));
    $("material-recipes").append(box);
  }
  highlight([m.material_id]);
  window.scrollTo(0, 0);
}

function route() {
  const hash = decodeURIComponent(location.hash.slice(1));
  if (hash.startsWith("/material/")) showMaterial(hash.slice("/material/".length));
  else { $("material").hidden = true; $("search-panel").hidden = false; }
}

// --------------------------------------------------------------------------------------------------- map

function colourScale(points, column) {
  const values = points.map((p) => p[column]);
  if (state.map.numeric.includes(column)) {
    const known = values.filter((v) => v !== null && v !== undefined);
    const lo = Math.min(...known), hi = Math.max(...known);
    const f = (v) => {
      if (v === null || v === undefined) return "#ccc";
      const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
      return `hsl(${(240 - 240 * t).toFixed(0)}, 70%, 45%)`;
    };
    return { f, legend: known.length ? [[`${column}: ${lo.toFixed(2)}`, f(lo)], [`${hi.toFixed(2)}`, f(hi)]] : [] };
  }
  const cats = [...new Set(values.filter((v) => v !== null && v !== undefined).map(String))].sort();
  const f = (v) => (v === null || v === undefined ? "#ccc" : PALETTE[cats.indexOf(String(v)) % PALETTE.length]);
  return { f, legend: cats.map((c) => [c, f(c)]) };
}

function drawMap(marked = state.marked || []) {
  state.marked = marked;
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  const { points } = state.map;
  const pad = 20, w = canvas.width, h = canvas.height;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / (y1 - y0 || 1)) * (h - 2 * pad);
  const scale = colourScale(points, $("colour").value);
  ctx.clearRect(0, 0, w, h);
  state.screen = points.map((p) => ({ p, x: sx(p.x), y: sy(p.y) }));
  for (const s of state.screen) {
    ctx.beginPath();
    ctx.arc(s.x, s.y, 4, 0, 2 * Math.PI);
    ctx.fillStyle = scale.f(s.p[$("colour").value]);
    ctx.globalAlpha = marked.length ? 0.35 : 0.85;
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  const set = new Set(marked);
  for (const s of state.screen.filter((s) => set.has(s.p.material_id))) {
    ctx.beginPath();
    ctx.arc(s.x, s.y, 6, 0, 2 * Math.PI);
    ctx.fillStyle = scale.f(s.p[$("colour").value]);
    ctx.fill();
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#000";
    ctx.stroke();
  }
  const legend = $("legend");
  legend.replaceChildren();
  for (const [label, colour] of scale.legend) {
    legend.append(el("span", { class: "swatch", style: `background:${colour}` }), label);
  }
  canvas.dataset.points = String(state.screen.length);
}

function highlight(ids) { if (state.map) drawMap(ids); }

function nearest(event) {
  const canvas = $("map");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * (canvas.width / box.width);
  const y = (event.clientY - box.top) * (canvas.height / box.height);
  let best = null, dist = 64;  // within 8 px
  for (const s of state.screen) {
    const d = (s.x - x) ** 2 + (s.y - y) ** 2;
    if (d < dist) { dist = d; best = s; }
  }
  return best;
}

function hover(event) {
  const tip = $("tooltip");
  const hit = nearest(event);
  if (!hit) { tip.hidden = true; return; }
  const canvas = $("map");
  const box = canvas.getBoundingClientRect();
  const colour = $("colour").value;
  tip.textContent = `${hit.p.formula || ""} ${hit.p.material_id}` +
    (hit.p[colour] !== null && hit.p[colour] !== undefined ? ` — ${colour}: ${fmt(hit.p[colour])}` : "");
  tip.style.left = (hit.x * box.width / canvas.width + 10) + "px";
  tip.style.top = (hit.y * box.height / canvas.height + 10) + "px";
  tip.hidden = false;
}

function click(event) {
  const hit = nearest(event);
  if (hit) location.hash = "#/material/" + encodeURIComponent(hit.p.material_id);
}

async function loadMap() {
  try {
    state.map = await getJSON("/map");
  } catch (err) {
    $("map-method").textContent = "(unavailable: " + err.message + ")";
    return;
  }
  $("map-method").textContent = state.map.method ? `(${state.map.method}, ${state.map.points.length} materials)` : "";
  const choices = state.map.columns.filter((c) => c === "crystal_system" || state.map.numeric.includes(c));
  for (const c of choices) $("colour").append(el("option", { value: c }, c));
  if (choices.includes("crystal_system")) $("colour").value = "crystal_system";
  $("colour").addEventListener("change", () => drawMap());
  const canvas = $("map");
  canvas.addEventListener("mousemove", hover);
  canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  canvas.addEventListener("click", click);
  drawMap();
  canvas.dataset.ready = "true";
}

// -------------------------------------------------------------------------------------------------- start

async function start() {
  try {
    const health = await getJSON("/health");
    $("run-info").textContent = `run ${health.run} · ${health.materials} materials · ${health.modalities.join(", ")}`;
    $("to").append(el("option", { value: "" }, "default"));
    for (const t of health.tables) $("to").append(el("option", { value: t }, t));
  } catch (err) {
    $("run-info").textContent = "server unavailable: " + err.message;
  }
  $("search-form").addEventListener("submit", search);
  $("file").addEventListener("change", () => { if ($("file").files.length) $("q").value = ""; });
  $("q").addEventListener("input", () => { if ($("q").value) $("file").value = ""; });
  window.addEventListener("hashchange", route);
  route();
  loadMap();
}

start();
