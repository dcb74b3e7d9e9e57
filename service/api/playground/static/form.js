// The generation form, built from the API's catalogue (/models, /samplers, /schedules): every
// sampler and schedule option becomes a control with its default and bounds.
import { call } from "./api.js";
import { compareFor } from "./compare.js";
import { showFor } from "./controlnet.js";
import { showAdaptersFor } from "./ipadapter.js";

const $ = (id) => document.getElementById(id);
export const catalogue = { models: [], samplers: [], schedules: [] };

export async function loadCatalogue() {
  const [m, sa, sc] = await Promise.all([call("GET", "models"), call("GET", "samplers"), call("GET", "schedules")]);
  const values = formValues(); // a reload (a new API key): the form keeps what it has now
  catalogue.models = m.models;
  catalogue.samplers = sa.samplers;
  catalogue.schedules = sc.schedules.filter((s) => s.name !== "custom"); // custom needs a sigmas list
  const cmp = [...$("cmp-samplers").selectedOptions].map((o) => o.value);
  fill($("model"), m.models.map((x) => x.name), values ? values.model : m.default);
  fill($("sampler"), catalogue.samplers.map((x) => x.name));
  fill($("schedule"), catalogue.schedules.map((x) => x.name));
  fill($("cmp-samplers"), catalogue.samplers.map((x) => x.name), ...cmp);
  onModel();
  keep(values);
}

// GET /models again (a job loaded its model, or another unloaded one): the form keeps its values.
export async function refreshModels() {
  const models = (await call("GET", "models")).models;
  const values = formValues(); // read after the wait: what was typed meanwhile is kept too
  catalogue.models = models;
  keep(values);
}

// The form's values (readForm's), or null before the catalogue is first in.
const formValues = () => (model() ? readForm() : null);

function keep(values) {
  if (!values) return;
  restore(values);
  if (values.n) $("n").value = values.n; // restore() sets 1: an image's own count
}

function fill(select, names, ...selected) {
  select.replaceChildren(...names.map((n) => new Option(n, n, false, selected.includes(n))));
}

export const model = () => catalogue.models.find((m) => m.name === $("model").value);

// A model that is not loaded (GET /models: state on_disk, loading or failed) comes without its
// conditioning, size and schedule facts: its first job loads it, and refreshModels() fills the form in.
const loaded = (m) => m.conditioning !== undefined;

export function onModel() {
  const m = model();
  if (!m) return;
  const d = m.defaults || {};
  const desc = m.description || m.kind;
  const why = m.error ? `: ${m.error}` : "";
  $("model-doc").textContent = loaded(m)
    ? `${desc}: ${m.width}x${m.height}, ${m.conditioning}`
    : `${desc}: not loaded (${m.state}${why}). The first job loads it (slower); then the form shows its size, classes or prompt, and schedules.`;
  $("class-row").hidden = m.conditioning !== "class";
  // not loaded: the store's kinds other than the project's UNet (stable_diffusion, sd3, flux) take a prompt
  $("text-row").hidden = loaded(m) ? m.conditioning !== "text" : m.kind === "unet";
  const labels = m.class_labels || [];
  const picked = $("class_label").value;
  $("class_label").replaceChildren(new Option("none (unconditional)", ""), ...labels.map((c) => new Option(c, c)));
  $("class_label").value = labels.map(String).includes(picked) ? picked : labels.length ? "0" : "";
  schedulesFor(m);
  for (const [f, v] of Object.entries({ sampler: d.sampler, schedule: d.schedule, steps: d.steps, cfg_scale: d.cfg_scale })) {
    if (v !== undefined && v !== null) $(f).value = v;
  }
  $("width").value = m.width ?? ""; // not loaded: blank, the model's own size
  $("height").value = m.height ?? "";
  const fixed = m.kind === "unet"; // the project's UNets make one size; latent models take any multiple of 8
  $("width").disabled = $("height").disabled = fixed;
  $("hires-box").hidden = fixed; // hires fix needs a model that makes any size
  for (const f of ["width", "height"]) if (m.max_size) $(f).max = m.max_size; else $(f).removeAttribute("max");
  sizeLimits();
  showFor(m);
  showAdaptersFor(m);
  cacheFor(m);
  onSampler();
  onSchedule();
}

// The hires scale's upper bound: the second pass stays within the model's max_size (GET /models),
// in the input's steps of 0.25, at most 4.
export function sizeLimits() {
  const m = model();
  const side = Math.max(Number($("width").value) || 0, Number($("height").value) || 0);
  const most = m && m.max_size && side > 0 ? Math.floor((m.max_size / side) * 4) / 4 : 4;
  $("hires_scale").max = Math.max(1, Math.min(4, most));
}

// The schedules `m` runs: those that need a discrete-time model (GET /schedules: needs_discrete) only
// for one (GET /models: discrete), `tuned` only where it has tuned schedules (GET /models:
// tuned_schedules). The form and the comparison grid offer these.
export function offeredSchedules(m) {
  const tuned = Object.keys((m && m.tuned_schedules) || {}).length > 0;
  return catalogue.schedules
    .filter((s) => !(s.needs_discrete && m && m.discrete === false) && (s.name !== "tuned" || tuned))
    .map((s) => s.name);
}

// The form's schedule list for `m`; the choice is kept when still offered.
function schedulesFor(m) {
  const keep = $("schedule").value;
  const names = offeredSchedules(m);
  const d = (m.defaults || {}).schedule;
  fill($("schedule"), names, names.includes(keep) ? keep : names.includes(d) ? d : names[0]);
  compareFor(m, names);
}

// The step cache, offered for a model whose network can cache (GET /models: cache_methods).
function cacheFor(m) {
  const methods = m.cache_methods || [];
  $("cache-row").hidden = methods.length === 0;
  const keep = $("cache_method").value;
  $("cache_method").replaceChildren(...["off", ...methods].map((n) => new Option(n, n, false, n === keep)));
}

// {method, interval?, threshold?} (blank: the method's default), or undefined when off.
function cache() {
  if ($("cache-row").hidden || $("cache_method").value === "off") return undefined;
  const c = { method: $("cache_method").value, interval: num("cache_interval"), threshold: num("cache_threshold") };
  for (const k of Object.keys(c)) if (c[k] === undefined) delete c[k];
  return c;
}

export function onSampler() {
  const s = catalogue.samplers.find((x) => x.name === $("sampler").value);
  $("sampler-doc").textContent = s ? s.doc : "";
  options($("sampler-options"), s, "sampler");
}

export function onSchedule() {
  options($("schedule-options"), catalogue.schedules.find((x) => x.name === $("schedule").value), "schedule");
}

function options(box, info, group) {
  box.replaceChildren();
  for (const [name, o] of Object.entries((info && info.options) || {})) {
    const label = document.createElement("label");
    let input;
    if (o.choices) {
      input = document.createElement("select");
      input.append(...o.choices.map((c) => new Option(c, c, false, c === o.default)));
    } else {
      input = document.createElement("input");
      input.type = "number";
      if (o.minimum != null) input.min = o.minimum; // null or absent: no bound
      if (o.maximum != null) input.max = o.maximum;
      input.step = o.type === "integer" ? "1" : "any";
      input.value = o.default ?? "";
      input.placeholder = o.default === null ? "model's" : "";
    }
    input.name = name;
    input.id = `${group}-${name}`;
    input.dataset.group = group;
    input.dataset.default = o.default ?? "";
    input.dataset.kind = o.choices ? (typeof o.choices[0] === "number" ? "integer" : "string") : o.type;
    const bounds = o.choices ? o.choices.join(" | ") : range(o.minimum, o.maximum);
    label.append(`${name} `, input, Object.assign(document.createElement("small"), { textContent: ` ${bounds}` }));
    box.append(label, errorSlot(name));
  }
}

// A number option's bounds as a hint: "0 to 10", ">= 0", "<= 1" or "" (null or absent: no bound).
function range(lo, hi) {
  if (lo != null && hi != null) return `${lo} to ${hi}`;
  if (lo != null) return `>= ${lo}`;
  return hi != null ? `<= ${hi}` : "";
}

// An error slot after each control, filled from a 422's detail[].loc.
function errorSlot(name) {
  return Object.assign(document.createElement("span"), { className: "err", role: "alert", id: `err-${name}` });
}

export function addErrorSlots(form) {
  for (const el of form.querySelectorAll("[name]")) {
    if (el.type !== "hidden" && !el.dataset.group) el.closest("label").after(errorSlot(el.name));
  }
}

const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));

// The request body from the form: only what the user set or what the model needs.
export function readForm() {
  const m = model();
  const body = { model: m.name, sampler: $("sampler").value, schedule: $("schedule").value };
  for (const f of ["steps", "cfg_scale", "n", "seed"]) body[f] = num(f);
  if (m.conditioning === "class" && $("class_label").value !== "") body.class_label = Number($("class_label").value);
  if (m.conditioning === "text") {
    body.prompt = $("prompt").value;
    if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  }
  if (!$("width").disabled) Object.assign(body, { width: num("width"), height: num("height") });
  for (const group of ["sampler", "schedule"]) {
    const opts = {};
    for (const el of document.querySelectorAll(`[data-group=${group}]`)) {
      if (el.value === "" || el.value === el.dataset.default) continue;
      opts[el.name] = el.dataset.kind === "string" ? el.value : Number(el.value);
    }
    if (Object.keys(opts).length) body[`${group}_options`] = opts;
  }
  if ($("hires_on").checked && !$("hires-box").hidden) body.hires = hires();
  body.cache = cache();
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

// The hires fix object (its steps only when set: 0 means the first pass's).
function hires() {
  const h = { scale: num("hires_scale"), upscaler: $("hires_upscaler").value, denoise: num("hires_denoise") };
  if (num("hires_steps")) h.steps = num("hires_steps");
  return h;
}

// Put a request's parameters (an image's `kdiff` chunk, or A1111's infotext read by png.js) back into
// the form. A choice the form does not offer (a model this service lacks, a sampler, schedule or
// upscaler the model does not run) is left as it was: returns those, for the page to say.
export function restore(p) {
  const skipped = [];
  const pick = (id, value, what) => {
    if (value === undefined || value === null) return;
    if ([...$(id).options].some((o) => o.value === String(value))) $(id).value = value;
    else skipped.push(`${what} ${value}`);
  };
  pick("model", p.model, "model");
  onModel();
  pick("sampler", p.sampler, "sampler");
  pick("schedule", p.schedule, "schedule");
  onSampler();
  onSchedule();
  const seed = p.seed ?? (p.seeds || [])[0];
  const label = Array.isArray(p.class_label) ? p.class_label[0] : p.class_label;
  const fields = { steps: p.steps, cfg_scale: p.cfg_scale, seed, n: 1, class_label: label, prompt: p.prompt, negative_prompt: p.negative_prompt };
  for (const [f, v] of Object.entries(fields)) if (v !== undefined && v !== null) $(f).value = v;
  if ("class_label" in p && label === null) $("class_label").value = ""; // an unconditional sample
  if (!$("width").disabled) {
    // onModel() set the model's default size: the image's own size replaces it
    if (p.width != null) $("width").value = p.width;
    if (p.height != null) $("height").value = p.height;
    sizeLimits();
  }
  if (p.denoise != null && p.denoise < 1) $("denoise").value = p.denoise; // an img2img's strength
  const h = p.hires || {};
  $("hires_on").checked = Boolean(p.hires);
  const hf = { hires_scale: h.scale, hires_steps: h.steps, hires_denoise: h.denoise };
  for (const [f, v] of Object.entries(hf)) if (v !== undefined && v !== null) $(f).value = v;
  pick("hires_upscaler", h.upscaler, "hires upscaler");
  const c = p.cache || {};
  if (!$("cache-row").hidden) $("cache_method").value = [...$("cache_method").options].some((o) => o.value === c.method) ? c.method : "off";
  $("cache_interval").value = c.interval ?? "";
  $("cache_threshold").value = c.threshold ?? "";
  for (const group of ["sampler", "schedule"]) {
    for (const [k, v] of Object.entries(p[`${group}_options`] || {})) {
      const el = $(`${group}-${k}`);
      if (el) el.value = v;
    }
  }
  return skipped;
}
