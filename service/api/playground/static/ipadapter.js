// The IP-Adapter section: a reference image prompting the model through an adapter of
// model_store/ipadapter/, sent as the request's `ip_adapters: [{model, image, weight}]`. The adapters
// are those /controlnet/control_types lists under "IP-Adapter"; the section shows for a model whose
// requests take `ip_adapters` (GET /models: conditioning_fields) while the store has adapters.
import { fileB64 } from "./ui.js";

const $ = (id) => document.getElementById(id);
const state = { b64: null };

// controlTypes: /controlnet/control_types' control_types (loaded with the ControlNet section).
export function loadAdapters(controlTypes) {
  const names = ((controlTypes["IP-Adapter"] || {}).model_list || []).filter((n) => n !== "None");
  const keep = $("ip_model").value;
  $("ip_model").replaceChildren(...names.map((n) => new Option(n, n, false, n === keep)));
}

export function showAdaptersFor(model) {
  const takes = Boolean(model && (model.conditioning_fields || []).includes("ip_adapters"));
  $("ip-box").hidden = !takes || $("ip_model").options.length === 0;
}

// {ip_adapters: [unit]} when the section is shown, on and has an image, else {}.
export function ipAdapterFields() {
  if ($("ip-box").hidden || !$("ip_on").checked || !state.b64) return {};
  return { ip_adapters: [{ model: $("ip_model").value, image: state.b64, weight: Number($("ip_weight").value) }] };
}

export function setupIpAdapter() {
  $("ip_image").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    state.b64 = file ? await fileB64(file) : null;
    if (file) $("ip_on").checked = true;
  });
}
