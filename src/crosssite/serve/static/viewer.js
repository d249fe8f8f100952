// crosssite viewer: upload slices / series to /v1/predict and show P(COVID) with the Grad-CAM overlay.
// Plain browser JavaScript, no build step. Text from the server is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: null, model: null, views: [], current: -1, index: 0, threshold: 0.5, pending: null };

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

class Unauthorised extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) {
    $("token-box").hidden = false;
    $("token").focus();
  }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
    const retry = response.headers.get("Retry-After");
    if (response.status === 401) throw new Unauthorised(detail);
    throw new Error(`${detail}${retry ? ` (retry in ${retry} s)` : ""}`);
  }
  return body;
}

function fmt(p) { return p.toFixed(3); }

function labelClass(label) { return label === "COVID" ? "covid" : "non-covid"; }

async function loadModel() {
  try {
    const m = await api("/v1/model");
    state.model = m;
    state.threshold = m.threshold;
    const sites = (m.site_names || []).join(", ");
    $("model-line").textContent = `model ${m.id} (${m.version}), ${m.architecture || "?"} on ${m.backend}; ` +
      `trained on: ${sites}; ${m.normalisation_text || m.normalisation}; P(COVID) >= ${m.threshold} is labelled COVID`;
    if (m.notice) $("notice").textContent = m.notice;
    $("token-box").hidden = true;
    if (state.pending) { const files = state.pending; state.pending = null; upload(files); }
  } catch (e) {
    // before a token is entered, a 401 only means: ask for it (the token box is shown)
    if (e instanceof Unauthorised && !state.token) $("model-line").textContent = "enter the access token to load the model";
    else if (e instanceof Unauthorised) $("model-line").textContent = `token refused: ${e.message}`;
    else $("model-line").textContent = `model card not available: ${e.message}`;
  }
}

async function upload(files) {
  if (!files.length) return;
  if (!state.model) { state.pending = files; $("status").textContent = "enter the access token first"; return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const query = state.model.grad_cam ? "cam=true" : "images=true";
  $("status").textContent = `scoring ${files.length} file(s) ...`;
  try {
    const answer = await api(`/v1/predict?${query}`, { method: "POST", body: form });
    const c = answer.counts;
    $("status").textContent = `${c.files} file(s): ${c.slices} slice(s), ${c.volumes} series/volume(s), ` +
      `${c.errors} error(s), ${c.warnings} warning(s)`;
    render(answer);
  } catch (e) {
    $("status").textContent = `upload refused: ${e.message}`;
  }
}

// One view per series / volume (its slices in order) and one per lone slice.
function buildViews(answer) {
  const views = [];
  for (const file of answer.files) {
    const volumes = new Map(file.volumes.map((v) => [v.name, { ...v, kind: "series", slices: [] }]));
    for (const s of file.slices) {
      if (s.volume !== null && volumes.has(s.volume)) volumes.get(s.volume).slices.push(s);
      else views.push({ kind: "slice", name: s.name, slices: [s] });
    }
    for (const v of volumes.values()) views.push(v);
  }
  return views;
}

function render(answer) {
  state.views = buildViews(answer);
  const nav = $("views");
  nav.replaceChildren();
  state.views.forEach((view, i) => {
    const button = document.createElement("button");
    button.type = "button";
    const p = document.createElement("span");
    p.className = "p";
    const score = view.kind === "series" ? view.p_covid : view.slices[0].p_covid;
    p.textContent = fmt(score);
    const rows = view.kind === "series" ? [view, ...view.slices] : view.slices;
    if (rows.some((r) => r.warnings.length)) {
      const flag = document.createElement("span");
      flag.className = "flag";
      flag.textContent = "!";
      flag.title = "scored with a warning";
      button.append(flag);
    }
    const name = document.createElement("span");
    name.textContent = view.kind === "series" ? `${view.name} (${view.slices.length} slices)` : view.name;
    button.append(p, name);
    button.addEventListener("click", () => select(i, 0));
    nav.append(button);
  });
  const errors = answer.files.flatMap((f) => f.errors);
  const list = $("error-list");
  list.replaceChildren(...errors.map((e) => {
    const li = document.createElement("li");
    li.textContent = `${e.name}: ${e.error}`;
    return li;
  }));
  $("errors").hidden = errors.length === 0;
  const warnings = answer.files.flatMap((f) => f.warnings);
  $("warning-list").replaceChildren(...warnings.map((w) => {
    const li = document.createElement("li");
    li.textContent = w;
    return li;
  }));
  $("warnings").hidden = warnings.length === 0;
  $("results").hidden = state.views.length === 0;
  if (state.views.length) select(0, 0);
}

function select(viewIndex, sliceIndex) {
  const view = state.views[viewIndex];
  state.current = viewIndex;
  state.index = Math.max(0, Math.min(sliceIndex, view.slices.length - 1));
  [...$("views").children].forEach((b, i) => b.classList.toggle("current", i === viewIndex));
  const s = view.slices[state.index];
  $("view-title").textContent = view.kind === "series" ? view.name : s.name;
  $("slice-img").src = s.image_png ? `data:image/png;base64,${s.image_png}` : "";
  const cam = $("cam-img");
  cam.hidden = !s.cam_png;
  cam.src = s.cam_png ? `data:image/png;base64,${s.cam_png}` : "";
  $("opacity-box").hidden = !s.cam_png;
  $("p-covid").textContent = fmt(s.p_covid);
  $("label").textContent = s.label;
  $("label").className = labelClass(s.label);
  $("ood-line").textContent = s.ood_score === null ? "" :
    `distance to the training sites ${s.ood_score.toFixed(2)}${s.ood ? " (far: out of distribution)" : ""}`;
  const series = view.kind === "series";
  const shown = [...s.warnings, ...(series ? view.warnings : [])];
  $("slice-warnings").replaceChildren(...shown.map((w) => {
    const li = document.createElement("li");
    li.textContent = w;
    return li;
  }));
  $("slice-warnings").hidden = shown.length === 0;
  $("slice-box").hidden = !series;
  $("series-box").hidden = !series;
  if (series) {
    $("slice-range").max = String(view.slices.length - 1);
    $("slice-range").value = String(state.index);
    $("slice-pos").textContent = `${state.index + 1} / ${view.slices.length}`;
    $("volume-score").textContent = `scan score ${fmt(view.p_covid)} (${view.label}): mean of the top ` +
      `${view.top_k} of ${view.n_slices} slice probabilities`;
    drawPlot(view);
  }
}

function drawPlot(view) {
  const canvas = $("plot");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 34, right = 8, top = 8, bottom = 20;
  const x = (i) => left + (view.slices.length === 1 ? 0 : (i / (view.slices.length - 1)) * (w - left - right));
  const y = (p) => top + (1 - p) * (h - top - bottom);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#4b5563";
  ctx.strokeStyle = "#cfd6df";
  for (const p of [0, 0.5, 1]) {
    ctx.beginPath(); ctx.moveTo(left, y(p)); ctx.lineTo(w - right, y(p)); ctx.stroke();
    ctx.fillText(p.toFixed(1), 4, y(p) + 4);
  }
  ctx.fillText("slice", w / 2 - 12, h - 5);
  ctx.setLineDash([4, 3]);
  ctx.strokeStyle = "#b91c1c";
  ctx.beginPath(); ctx.moveTo(left, y(state.threshold)); ctx.lineTo(w - right, y(state.threshold)); ctx.stroke();
  ctx.setLineDash([]);
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  view.slices.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s.p_covid)) : ctx.moveTo(x(i), y(s.p_covid))));
  ctx.stroke();
  ctx.lineWidth = 1;
  ctx.fillStyle = "#1d2330";
  const s = view.slices[state.index];
  ctx.beginPath(); ctx.arc(x(state.index), y(s.p_covid), 4, 0, 2 * Math.PI); ctx.fill();
}

function step(delta) {
  if (state.current < 0) return;
  const view = state.views[state.current];
  if (view.kind === "series") select(state.current, state.index + delta);
}

function init() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload([...e.dataTransfer.files]);
  });
  $("opacity").addEventListener("input", (e) => { $("cam-img").style.opacity = String(e.target.value / 100); });
  $("cam-img").style.opacity = String($("opacity").value / 100);
  $("slice-range").addEventListener("input", (e) => select(state.current, Number(e.target.value)));
  $("stage").addEventListener("wheel", (e) => { e.preventDefault(); step(e.deltaY > 0 ? 1 : -1); }, { passive: false });
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement) return;  // a slider moves by itself
    if (e.key === "ArrowDown" || e.key === "ArrowRight") step(1);
    if (e.key === "ArrowUp" || e.key === "ArrowLeft") step(-1);
  });
  $("token-box").addEventListener("submit", (e) => { e.preventDefault(); state.token = $("token").value; loadModel(); });
  loadModel();
}

init();
