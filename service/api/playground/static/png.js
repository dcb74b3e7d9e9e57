// The generation parameters an image carries, read by the service (POST sdapi/v1/png-info): the
// image passes the service's image gate like every image sent to it, and the service reads our
// `kdiff` chunk, or A1111's infotext from a PNG's `parameters` chunk or a JPEG / WebP's EXIF.
import { call } from "./api.js";
import { fileB64 } from "./ui.js";

let names = null; // A1111's sampler and schedule names -> ours, asked for once

async function a1111Names() {
  if (names) return names;
  const [samplers, schedulers] = await Promise.all([call("GET", "sdapi/v1/samplers"), call("GET", "sdapi/v1/schedulers")]);
  // each A1111 name (and a scheduler's label) -> our name: the entry's alias where it has one
  const ours = (e) => (e.aliases && e.aliases[0]) || e.name;
  names = {
    sampler: Object.fromEntries(samplers.map((e) => [e.name, ours(e)])),
    schedule: Object.fromEntries(schedulers.filter((e) => e.name !== "automatic").flatMap((e) => [[e.name, ours(e)], [e.label, ours(e)]])),
  };
  return names;
}

// Our parameters from A1111's png-info `parameters` (strings keyed as A1111 writes them).
export function fromA1111(p, { sampler: samplers, schedule: schedules }) {
  const num = (k) => (p[k] === undefined || p[k] === "" || !Number.isFinite(Number(p[k])) ? undefined : Number(p[k]));
  const out = { prompt: p.Prompt, steps: num("Steps"), cfg_scale: num("CFG scale"), seed: num("Seed"), width: num("Size-1"), height: num("Size-2") };
  if (p["Negative prompt"]) out.negative_prompt = p["Negative prompt"];
  if (p.Model) out.model = p.Model;
  let sampler = p.Sampler;
  // before A1111 1.9 the schedule was part of the sampler's name ("DPM++ 2M Karras")
  const old = / (Karras|Exponential)$/.exec(sampler || "");
  if (sampler && !(sampler in samplers) && old) {
    sampler = sampler.slice(0, old.index);
    out.schedule = schedules[old[1]];
  }
  if (sampler) out.sampler = samplers[sampler] || sampler; // unknown: restore() names it
  const type = p["Schedule type"];
  if (type && type !== "Automatic") out.schedule = schedules[type] || type;
  if (p["Hires upscale"]) {
    out.hires = { scale: num("Hires upscale"), steps: num("Hires steps"), upscaler: p["Hires upscaler"], denoise: num("Denoising strength") };
  } else if (p["Denoising strength"]) out.denoise = num("Denoising strength");
  return out;
}

// Our parameters from an image file, or null when it carries none.
export async function parametersOf(file) {
  const info = await call("POST", "sdapi/v1/png-info", { image: await fileB64(file) });
  if (info.items && info.items.kdiff) return JSON.parse(info.items.kdiff);
  if (!info.info) return null;
  return fromA1111(info.parameters, await a1111Names());
}
