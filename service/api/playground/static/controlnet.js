// The ControlNet section: one unit (control image, ControlNet, preprocessor, weight, guidance window,
// control mode, resize mode; a union ControlNet's control type) sent as the request's
// `controlnets`, and a preview of what the preprocessor makes of the image (POST controlnet/detect),
// shown before generating. The section shows for models that take ControlNet units (GET /models:
// conditioning_fields).
import { call } from "./api.js";
import { fileB64, showError } from "./ui.js";

const $ = (id) => document.getElementById(id);
const state = { b64: null, unions: {} };

// The ControlNets in model_store/controlnet/ (control type "All": model_list also names IP-Adapters),
// the preprocessors the service runs (the openpose ones only while their weights are in the store),
// and the control types of each union ControlNet (model_list's union_types). Returns control_types
// (the IP-Adapter section reads its adapters from it).
export async function loadControlNets() {
  const [types, modules, models] = await Promise.all([
    call("GET", "controlnet/control_types"),
    call("GET", "controlnet/module_list"),
    call("GET", "controlnet/model_list"),
  ]);
  const names = types.control_types.All.model_list.filter((n) => n !== "None");
  const keep = $("cn_model").value;
  $("cn_model").replaceChildren(...names.map((n) => new Option(n, n, false, n === keep)));
  $("cn_module").replaceChildren(...modules.module_list.map((n) => new Option(n, n)));
  $("cn-none").hidden = names.length > 0;
  // no ControlNet to send a unit to: the section stays off
  $("cn_on").disabled = names.length === 0;
  if (!names.length) $("cn_on").checked = false;
  state.unions = models.union_types || {};
  onControlNet();
  return types.control_types;
}

// A union ControlNet serves several control types: offer those it has (and auto: no type).
function onControlNet() {
  const types = state.unions[$("cn_model").value];
  $("cn-type-row").hidden = !types;
  if (!types) return;
  const keep = $("cn_control_type").value;
  const names = [...types, "auto"];
  $("cn_control_type").replaceChildren(...names.map((n) => new Option(n, n, false, n === keep)));
}

// Shown only for a model whose requests take `controlnets`.
export function showFor(model) {
  const takes = Boolean(model && (model.conditioning_fields || []).includes("controlnets"));
  $("cn-box").hidden = !takes;
}

async function onFile(file) {
  $("cn-preview").hidden = true;
  if (!file) return (state.b64 = null);
  state.b64 = await fileB64(file);
  $("cn_on").checked = $("cn_model").options.length > 0;
}

async function preview() {
  const err = document.querySelector('[data-for="cn"]');
  err.textContent = "";
  if (!state.b64) return (err.textContent = "Choose a control image first.");
  $("cn-detect").disabled = true;
  try {
    // processor_res -1: the image's own resolution, as the unit runs it when generating
    const body = { controlnet_module: $("cn_module").value, controlnet_input_images: [state.b64], controlnet_processor_res: -1 };
    const r = await call("POST", "controlnet/detect", body);
    Object.assign($("cn-preview"), { src: `data:image/png;base64,${r.images[0]}`, hidden: false });
  } catch (e) {
    showError(e, $("gen"));
  } finally {
    $("cn-detect").disabled = false;
  }
}

// {controlnets: [unit]} for the request when the section is on and has an image, else {}.
export function controlNetFields() {
  if ($("cn-box").hidden || !$("cn_on").checked || !state.b64 || !$("cn_model").value) return {};
  const unit = {
    model: $("cn_model").value,
    image: state.b64,
    module: $("cn_module").value,
    weight: Number($("cn_weight").value),
    guidance_start: Number($("cn_guidance_start").value),
    guidance_end: Number($("cn_guidance_end").value),
    control_mode: $("cn_control_mode").value,
    resize_mode: $("cn_resize_mode").value,
  };
  if (!$("cn-type-row").hidden) unit.control_type = $("cn_control_type").value;
  return { controlnets: [unit] };
}

export function setupControlNet() {
  $("cn_image").addEventListener("change", (e) => onFile(e.target.files[0]));
  $("cn-detect").addEventListener("click", preview);
  $("cn_model").addEventListener("change", onControlNet);
  $("cn_module").addEventListener("change", () => ($("cn-preview").hidden = true));
}
