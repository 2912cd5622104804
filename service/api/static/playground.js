// ResiDual Serve playground: plain JavaScript against the service's own API (no build step, no network but this
// server). The API key lives in the input field, and in sessionStorage only when "keep for this tab" is ticked.
"use strict";

const cfg = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
const KEY_STORE = "residual-playground-key";
const state = { images: [], last: null, labels: [], geometry: null, headInfo: new Map(), fit: null };

class ApiError extends Error {
  constructor(status, type, message) { super(message); this.status = status; this.type = type; }
}

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// the model picker: every request of a model-scoped route names the chosen model (the default needs no field)
const MODEL_ROUTES = /^\/(classify|label-sets|fit-alignment$|heads|bases|coefficients|drift|v1\/embeddings)/;
function withModel(method, path, json, body) {
  const m = $("model-picker").value;
  if (!m || m === cfg.model || !MODEL_ROUTES.test(path)) return { path, json, body };
  if (json !== undefined && json !== null && typeof json === "object") return { path, json: { ...json, model: m }, body };
  if (body instanceof FormData) { body.append("model", m); return { path, json, body }; }
  if (method === "GET" || (method === "POST" && path.includes("/activate"))) {
    return { path: `${path}${path.includes("?") ? "&" : "?"}model=${encodeURIComponent(m)}`, json, body };
  }
  return { path, json, body };
}

async function api(method, rawPath, options = {}) {
  const { path, json, body } = withModel(method, rawPath, options.json, options.body);
  const { contentType } = options;
  const headers = authHeaders(json !== undefined ? { "content-type": "application/json" }
    : contentType ? { "content-type": contentType } : {});
  const init = { method, headers };
  if (json !== undefined) init.body = JSON.stringify(json);
  else if (body !== undefined) init.body = body;
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", `the service did not answer (${e.message})`);
  }
  if (!r.ok) {
    let type = "http", message = `${r.status} ${r.statusText}`;
    try {
      const b = await r.json();
      if (b.error) { type = b.error.type; message = b.error.message; }
      else if (b.detail) message = typeof b.detail === "string" ? b.detail : JSON.stringify(b.detail);
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(r.status, type, message);
  }
  const ctype = r.headers.get("content-type") || "";
  return ctype.includes("json") ? r.json() : r.blob();
}

function showError(e) {
  const box = $("error");
  box.hidden = false;
  const hint = e.status === 401 || e.status === 403 ? " Enter an API key at the top." : "";
  box.textContent = (e.status ? `Error ${e.status} (${e.type}): ` : "Error: ") + e.message + hint;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
async function guarded(fn) {
  clearError();
  try { await fn(); } catch (e) { showError(e); }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);

// ---- API key ---------------------------------------------------------------------------------------------------
function initKey() {
  const kept = sessionStorage.getItem(KEY_STORE);
  if (kept) { $("api-key").value = kept; $("remember-key").checked = true; }
  const sync = () => {
    if ($("remember-key").checked && $("api-key").value) sessionStorage.setItem(KEY_STORE, $("api-key").value);
    else sessionStorage.removeItem(KEY_STORE);
  };
  $("remember-key").addEventListener("change", sync);
  $("api-key").addEventListener("change", () => { sync(); guarded(loadLists); });
}

// ---- images ------------------------------------------------------------------------------------------------------
function addImages(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    state.images.push({ blob: f, name: f.name || `pasted-${state.images.length}.png`, url: URL.createObjectURL(f) });
  }
  renderThumbs();
}
function renderThumbs() {
  const list = $("thumbs");
  list.replaceChildren(...state.images.map((im, i) => el("li", {},
    el("img", { src: im.url, alt: `image ${i + 1}: ${im.name}` }),
    el("button", { type: "button", class: "link", "aria-label": `remove image ${i + 1}`,
      onclick: () => { state.images.splice(i, 1); renderThumbs(); } }, "remove"))));
}
function initImages() {
  $("files").addEventListener("change", (e) => addImages(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addImages(e.dataTransfer.files); });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.items || [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) addImages(files);
  });
}

// ---- lists: coefficient sets and bases -------------------------------------------------------------------------------
async function loadLists() {
  const sets = await api("GET", "/coefficients");
  const select = $("coefficients");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "zero-shot (none)"),
    ...sets.coefficient_sets.map((s) => el("option", { value: s.name }, `${s.name} (active ${s.active})`)));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  const bases = await api("GET", "/bases");
  $("basis").replaceChildren(el("option", { value: "" }, `default (${bases.default.basis_id || "none yet"})`),
    ...bases.bases.map((b) => el("option", { value: b.basis_id }, `${b.name} · ${b.n_images} images`)));
  $("compare-b").replaceChildren(...bases.bases.map((b) => el("option", { value: b.basis_id }, `${b.name} · ${b.n_images} images`)));
}

async function onCoefficientsChange() {
  const name = $("coefficients").value.split("@")[0];
  if (!name) return;
  const info = await api("GET", `/coefficients/${encodeURIComponent(name)}`);
  const active = info.versions.find((v) => v.version === info.active) || info.versions.at(-1);
  if (active && active.label_set) {
    $("classes").value = active.label_set.classes.join("\n");
    $("templates").value = (active.label_set.templates || []).join("\n");
  }
}

// ---- classify ------------------------------------------------------------------------------------------------------
async function classify() {
  if (!state.images.length) throw new ApiError(0, "input", "choose, drop or paste at least one image first");
  const classes = lines("classes");
  if (classes.length < 1) throw new ApiError(0, "input", "write at least one class");
  const templates = lines("templates");
  const form = new FormData();
  state.images.forEach((im) => form.append("images", im.blob, im.name));
  form.append("label_set", JSON.stringify(templates.length ? { classes, templates } : { classes }));
  if ($("coefficients").value) form.append("coefficients", $("coefficients").value);
  form.append("top_k", String(Math.min(Number($("top-k").value) || 5, classes.length)));
  form.append("explain", "100000"); // every unit: the contributions then sum to the logit
  $("run-classify").disabled = true;
  try {
    state.last = await api("POST", "/classify", { body: form });
  } finally {
    $("run-classify").disabled = false;
  }
  renderResults();
  if (state.last.results.length) explainLabel(0, 0);
}

function renderResults() {
  const body = state.last;
  $("results").replaceChildren(...body.results.map((res, i) => el("div", { class: "result", "data-image": i },
    el("img", { src: state.images[i].url, alt: `image ${i + 1}` }),
    el("div", { class: "bars" },
      el("div", { class: "muted" }, `image ${i + 1}` + (body.coefficients ? ` · ${body.coefficients}` : " · zero-shot")),
      ...res.top.map((p, j) => el("div", { class: j === 0 ? "bar top" : "bar" },
        el("span", { class: "label", "data-label": p.label }, p.label),
        el("div", { class: "track", role: "img", "aria-label": `${p.label}: ${(100 * p.score).toFixed(1)} %` },
          Object.assign(el("div", { class: "fill" }), { style: `width:${Math.max(0.5, 100 * p.score)}%` })),
        el("button", { type: "button", class: "link", "aria-label": `why ${p.label} for image ${i + 1}`,
          onclick: () => explainLabel(i, j) }, `${(100 * p.score).toFixed(1)}% why`)))))));
}

// ---- why: the layer x head grid of contributions ----------------------------------------------------------------------
function parseUnit(name) {
  if (name === "emb") return { kind: "emb" };
  const m = /^L(\d+)\.(?:H(\d+)|MLP)$/.exec(name);
  if (!m) return null;
  return m[2] === undefined ? { kind: "mlp", layer: +m[1] } : { kind: "head", layer: +m[1], head: +m[2] };
}
function colour(v, scale) {
  const t = Math.min(1, Math.abs(v) / (scale || 1));
  const [r, g, b] = v >= 0 ? [255 - 180 * t, 255 - 120 * t, 255] : [255, 255 - 150 * t, 255 - 150 * t];
  return `rgb(${r | 0},${g | 0},${b | 0})`;
}

function explainLabel(i, j) {
  const p = state.last.results[i].top[j];
  const contribs = p.contributions || [];
  const units = contribs.map((c) => ({ ...c, ...parseUnit(c.unit) }));
  const heads = units.filter((u) => u.kind === "head");
  const L = Math.max(...units.filter((u) => u.layer !== undefined).map((u) => u.layer)) + 1;
  const H = Math.max(...heads.map((u) => u.head)) + 1;
  const scale = Math.max(...units.map((u) => Math.abs(u.logit)));
  const at = new Map(units.map((u) => [u.unit, u]));
  const sum = units.reduce((s, u) => s + u.logit, 0);
  const cell = (u, asButton) => {
    if (!u) return el("td", {}, el("span", {}, "·"));
    const text = u.logit.toFixed(2);
    const attrs = { style: `background:${colour(u.logit, scale)}`, title: `${u.unit}: ${u.logit.toFixed(4)}` };
    if (!asButton) return el("td", {}, el("span", attrs, text));
    return el("td", {}, el("button", { ...attrs, type: "button", "data-unit": u.unit,
      "aria-label": `head ${u.layer}.${u.head}: contribution ${text}; show its description and spectrum`,
      onmouseenter: () => describeHead(u.layer, u.head), onfocus: () => describeHead(u.layer, u.head),
      onclick: (e) => showSpectrum(u.layer, u.head, e.currentTarget) }, text));
  };
  const rows = [];
  for (let l = 0; l < L; l++) {
    const tds = [];
    for (let h = 0; h < H; h++) tds.push(cell(at.get(`L${l}.H${h}`), true));
    rows.push(el("tr", {}, el("th", { scope: "row" }, `layer ${l}`), ...tds, cell(at.get(`L${l}.MLP`), false)));
  }
  const table = el("table", { class: "grid", "aria-label": "contribution of each unit to the logit" },
    el("thead", {}, el("tr", {}, el("th", {}, ""),
      ...Array.from({ length: H }, (_, h) => el("th", { scope: "col" }, `head ${h}`)), el("th", { scope: "col" }, "MLP"))),
    el("tbody", {}, ...rows,
      el("tr", {}, el("th", { scope: "row" }, "embedding"), cell(at.get("emb"), false))));
  $("why-body").replaceChildren(
    el("p", { id: "why-summary" }, el("strong", {}, p.label), ` for image ${i + 1}: logit ${p.logit.toFixed(3)}`
      + ` = sum of the ${units.length} unit contributions (${sum.toFixed(3)}); blue pushes towards the label, red away.`),
    table);
}

async function describeHead(layer, head) {
  const box = $("head-info");
  const key = `${layer}.${head}|${$("basis").value}`;
  box.replaceChildren(el("p", { class: "muted" }, `head ${layer}.${head}: loading its description…`));
  try {
    if (!state.headInfo.has(key)) {
      const q = new URLSearchParams({ atoms: "5", components: "0" });
      if ($("basis").value) q.set("basis", $("basis").value);
      state.headInfo.set(key, await api("GET", `/heads/${layer}/${head}?${q}`));
    }
    const d = state.headInfo.get(key);
    const texts = d.description ? d.description.texts.map((t) => el("li", {}, `${t.text} (${t.weight.toFixed(3)})`))
      : [el("li", {}, d.description_note || "no description")];
    box.replaceChildren(el("h3", {}, `Head ${layer}.${head}`),
      el("p", { class: "muted" }, `k at 0.9: ${d.k_90} components · basis ${d.basis.name}`), el("ul", {}, ...texts));
  } catch (e) { showError(e); }
}

async function showSpectrum(layer, head, button) {
  await guarded(async () => {
    document.querySelectorAll(".grid button.chosen").forEach((b) => b.classList.remove("chosen"));
    button.classList.add("chosen");
    const q = $("basis").value ? `?basis=${encodeURIComponent($("basis").value)}` : "";
    const png = await api("GET", `/heads/${layer}/${head}/spectrum.png${q}`);
    const fig = $("head-spectrum");
    fig.querySelector("img").src = URL.createObjectURL(png);
    fig.querySelector("figcaption").textContent = `Explained variance of head ${layer}.${head} and its layer's MLP`;
    fig.hidden = false;
    describeHead(layer, head);
  });
}

// ---- heads: k at 0.9 and TwoNN per head -------------------------------------------------------------------------------
function headTable(title, rows, value, fmt) {
  const L = Math.max(...rows.map((r) => r.layer)) + 1, H = Math.max(...rows.map((r) => r.head)) + 1;
  const vals = rows.map((r) => r[value]).filter((v) => v !== null && v !== undefined);
  const lo = Math.min(...vals), hi = Math.max(...vals);
  const at = new Map(rows.map((r) => [`${r.layer}.${r.head}`, r[value]]));
  const body = [];
  for (let l = 0; l < L; l++) {
    const tds = Array.from({ length: H }, (_, h) => {
      const v = at.get(`${l}.${h}`);
      const t = v === null || v === undefined ? null : (v - lo) / ((hi - lo) || 1);
      const style = t === null ? "" : `background:rgb(${255 - 200 * t | 0},${255 - 140 * t | 0},255)`;
      return el("td", {}, el("span", { style, title: `head ${l}.${h}: ${v}` }, t === null ? "–" : fmt(v)));
    });
    body.push(el("tr", {}, el("th", { scope: "row" }, `layer ${l}`), ...tds));
  }
  return el("div", {}, el("h3", {}, title), el("table", { class: "grid", "aria-label": title },
    el("thead", {}, el("tr", {}, el("th", {}, ""), ...Array.from({ length: H }, (_, h) => el("th", { scope: "col" }, `head ${h}`)))),
    el("tbody", {}, ...body)));
}

async function loadHeads() {
  const q = $("basis").value ? `?basis=${encodeURIComponent($("basis").value)}` : "";
  const spectra = await api("GET", `/heads${q}`);
  const rows = spectra.units.filter((u) => u.type === "head");
  $("heads-body").replaceChildren(
    el("p", { class: "muted" }, `basis ${spectra.basis.name} (${spectra.basis.basis_id}, ${spectra.basis.n_images} images)`),
    headTable("k at 0.9 explained variance, per head", rows, "k_90", (v) => String(v)),
    headTable(`TwoNN intrinsic dimension, per head (${spectra.twonn_samples} images)`, rows, "twonn",
      (v) => v.toFixed(1)));
}

// ---- basis comparison, drift, diagnosis ----------------------------------------------------------------------------------
function imageOf(blob, alt) {
  return el("img", { src: URL.createObjectURL(blob), alt, class: "picture" });
}

async function compareBases() {
  const a = $("basis").value || (await api("GET", "/bases")).default.basis_id;
  const b = $("compare-b").value;
  if (!a || !b) throw new ApiError(0, "input", "the model needs two bases to compare (build one with POST /bases)");
  const path = `/bases/${encodeURIComponent(a)}/compare/${encodeURIComponent(b)}`;
  const report = await api("GET", path);
  const png = await api("GET", `${path}.png`);
  const s = report.summary;
  $("compare-body").replaceChildren(
    el("div", {},
      el("p", {}, `${report.a.name || report.a.basis_id} vs ${report.b.name || report.b.basis_id}: heads mean `
        + `${s.heads_mean.toFixed(3)} (min ${s.heads_min.toFixed(3)}), MLPs mean ${s.mlps_mean.toFixed(3)}`),
      el("p", { class: "muted", id: "compare-least" }, `least similar heads: ${s.least_similar_heads.join(", ")}`)),
    imageOf(png, "spectral cosine of the two bases, per head"));
}

async function loadDrift() {
  const q = `?window=${$("drift-window").value}&describe=5`;
  const report = await api("GET", `/drift${q}`);
  const png = await api("GET", `/drift.png?window=${$("drift-window").value}`);
  const rows = report.units.slice(0, 8).map((u) => el("tr", {},
    el("td", {}, u.unit), el("td", {}, u.score.toFixed(3)), el("td", {}, u.energy_outside.toFixed(3)),
    el("td", {}, u.mean_shift.toFixed(3)), el("td", {}, (u.description || []).join("; "))));
  $("drift-body").replaceChildren(
    el("div", {},
      el("p", { id: "drift-summary" }, `score ${report.score.toFixed(3)} over ${report.n_images} images `
        + `(${report.replicas} replica${report.replicas === 1 ? "" : "s"}, ${report.window})`
        + (report.note ? ` · ${report.note}` : "")),
      el("table", {}, el("caption", {}, "the most drifted units"),
        el("tr", {}, ...["unit", "score", "energy outside", "mean shift", "description"].map((h) => el("th", {}, h))),
        ...rows)),
    imageOf(png, "drift score per head"));
}

async function diagnose() {
  const body = { top: 5 };
  const classes = lines("fit-classes");
  if ($("fit-world").value) body.dataset = `world:${$("fit-world").value}`;
  if (classes.length) body.label_set = { classes };
  if (!body.dataset && !body.label_set) throw new ApiError(0, "input", "choose a world task or write classes");
  const d = await api("POST", "/label-sets/diagnose", { json: body });
  const parts = [
    el("div", {}, el("p", {}, "closest classes in text space"),
      el("ul", { id: "diagnose-pairs" }, ...d.pairs.map((p) => el("li", {}, `${p.a} / ${p.b}: ${p.cosine.toFixed(3)}`)))),
    el("div", {}, el("p", {}, "heads that carry the label set"),
      d.heads ? el("ul", {}, ...d.heads.map((h) => el("li", {}, `${h.unit}: ${(100 * h.text_share).toFixed(1)} %`)))
        : el("p", { class: "muted" }, d.note))];
  if (d.data) {
    parts.push(el("div", {}, el("p", { id: "diagnose-accuracy" },
      `zero-shot accuracy ${(100 * d.data.accuracy).toFixed(1)} % on ${d.data.images} images`),
      el("ul", {}, ...d.data.confused_pairs.map((p) => el("li", {},
        `${p.true} taken for ${p.predicted}: ${(100 * p.share).toFixed(1)} %`)))));
  }
  $("diagnose-body").replaceChildren(...parts);
}

// ---- fit -----------------------------------------------------------------------------------------------------------------
function initFit() {
  $("fit-world").replaceChildren(...Object.keys(cfg.world_tasks).map((t) => el("option", { value: t }, `world:${t}`)),
    el("option", { value: "" }, "none: use the uploaded archive"));
}

async function startFit() {
  const name = $("fit-name").value.trim();
  const body = { name, variant: $("fit-variant").value, hyperparameters: { epochs: Number($("fit-epochs").value) || 10 } };
  const archive = $("fit-archive").files[0];
  if (archive && !$("fit-world").value) {
    const kind = archive.name.endsWith(".zip") ? "application/zip" : "application/x-tar";
    const ds = await api("POST", "/datasets", { body: archive, contentType: kind });
    body.dataset = ds.dataset_id;
    const classes = lines("fit-classes");
    body.label_set = { classes: classes.length ? classes : ds.classes };
  } else if ($("fit-world").value) {
    body.dataset = `world:${$("fit-world").value}`;
    const train = Math.max(40, Number($("fit-train").value) || 2000);
    body.world_sizes = { train, val: Math.round(train / 4), test: Math.round(train / 2) };
  } else {
    throw new ApiError(0, "input", "choose a world task or an archive to fit on");
  }
  const job = await api("POST", "/fit-alignment", { json: body });
  state.fit = { name, job: job.job_id, url: job.status_url, version: null };
  ["fit-use", "fit-activate", "fit-rollback"].forEach((id) => { $(id).disabled = true; });
  $("fit-status").textContent = `job ${job.job_id}: queued`;
  pollFit();
}

async function pollFit() {
  const f = state.fit;
  let info;
  try { info = await api("GET", f.url); } catch (e) { showError(e); return; }
  const p = info.progress || {};
  $("fit-progress").value = Number(p.fraction || 0);
  const parts = [`${info.status}`, p.phase, p.epoch !== undefined ? `epoch ${p.epoch}` : null,
    p.val_accuracy !== undefined ? `validation accuracy ${(100 * p.val_accuracy).toFixed(1)} %` : null];
  $("fit-status").textContent = parts.filter(Boolean).join(" · ");
  if (info.status === "succeeded") {
    f.version = info.coefficients.split("@")[1];
    const r = info.report || {};
    $("fit-status").textContent = `done: ${info.coefficients}` + (r.test_accuracy !== undefined
      ? ` · test accuracy ${(100 * r.test_accuracy).toFixed(1)} %` : "")
      + (r.zero_shot_test_accuracy !== undefined ? ` (zero-shot ${(100 * r.zero_shot_test_accuracy).toFixed(1)} %)` : "")
      + ` · ${info.activated ? "activated" : "not activated: " + info.activation}`;
    $("fit-progress").value = 1;
    ["fit-use", "fit-activate", "fit-rollback"].forEach((id) => { $(id).disabled = false; });
    await guarded(loadLists);
  } else if (info.status === "failed" || info.status === "cancelled") {
    showError(new ApiError(0, info.status, info.error || `the fit ${info.status}`));
  } else {
    setTimeout(pollFit, 1000);
  }
}

async function useFit() {
  const f = state.fit;
  const select = $("coefficients");
  const ref = `${f.name}@${f.version}`;
  if (![...select.options].some((o) => o.value === ref)) select.append(el("option", { value: ref }, ref));
  select.value = ref;
  await onCoefficientsChange();  // the set's own label set fills the class and template fields
  location.hash = "#classify";
}

async function activateFit() {
  const f = state.fit;
  const r = await api("POST", `/coefficients/${encodeURIComponent(f.name)}/activate`, { json: { version: f.version } });
  $("fit-status").textContent = `${f.name}: active version is now ${r.active}`;
  await loadLists();
}
async function rollbackFit() {
  const f = state.fit;
  const info = await api("GET", `/coefficients/${encodeURIComponent(f.name)}`);
  const versions = info.versions.map((v) => v.version);
  const i = versions.indexOf(info.active);
  if (i <= 0) throw new ApiError(409, "conflict", `${f.name} has no version before the active one (${info.active})`);
  const r = await api("POST", `/coefficients/${encodeURIComponent(f.name)}/activate`, { json: { version: versions[i - 1] } });
  $("fit-status").textContent = `${f.name}: rolled back; the active version is now ${r.active}`;
  await loadLists();
}

// ---- start ---------------------------------------------------------------------------------------------------------------
async function start() {
  initKey();
  initImages();
  initFit();
  $("model").textContent = `${cfg.model} · ${cfg.weights_id}`;
  const picker = $("model-picker");
  picker.replaceChildren(...cfg.models.map((m) => el("option", { value: m }, m === cfg.model ? `${m} (default)` : m)));
  $("model-pick").hidden = cfg.models.length < 2;
  picker.addEventListener("change", () => guarded(async () => {
    // another model: other coefficient sets, bases and heads
    state.geometry = null; state.headInfo = new Map(); state.last = null;
    $("model").textContent = picker.value === cfg.model ? `${cfg.model} · ${cfg.weights_id}` : picker.value;
    $("coefficients").value = "";
    await loadLists();
  }));
  const first = cfg.world_tasks.colour || Object.values(cfg.world_tasks)[0];
  if (first) { $("classes").value = first.classes.join("\n"); $("templates").value = first.templates.join("\n"); }
  $("run-classify").addEventListener("click", () => guarded(classify));
  $("coefficients").addEventListener("change", () => guarded(onCoefficientsChange));
  $("load-heads").addEventListener("click", () => guarded(loadHeads));
  $("run-compare").addEventListener("click", () => guarded(compareBases));
  $("load-drift").addEventListener("click", () => guarded(loadDrift));
  $("run-diagnose").addEventListener("click", () => guarded(diagnose));
  $("run-fit").addEventListener("click", () => guarded(startFit));
  $("fit-use").addEventListener("click", () => guarded(useFit));
  $("fit-activate").addEventListener("click", () => guarded(activateFit));
  $("fit-rollback").addEventListener("click", () => guarded(rollbackFit));
  if (cfg.auth === "open" || $("api-key").value) await guarded(loadLists);
}
start();
