// Shared page pieces: the banner, field errors from the API, an image figure with its parameters.
const $ = (id) => document.getElementById(id);

export function banner(text, kind = "error") {
  const b = $("banner");
  b.textContent = text || "";
  b.className = kind;
  b.hidden = !text;
}

export function clearErrors(form) {
  for (const el of form.querySelectorAll(".err")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  banner("");
}

// The sections' controls by the body field they fill: a ControlNet unit's field (loc
// "controlnets[0].model" or ["controlnets", 0, "model"]) -> cn_model, an IP-Adapter's -> ip_model,
// the step cache's (cache.interval) -> cache_interval; not the form's control of the same name.
const SECTIONS = [
  [/^controlnets(?:\.\d+\.(\w+))?/, "cn_", "model"],
  [/^ip_adapters(?:\.\d+\.(\w+))?/, "ip_", "model"],
  [/^cache(?:\.(\w+))?/, "cache_", "method"],
];

function unitField(loc, form) {
  const path = loc.filter((p) => p !== "body").join(".").replace(/\[(\d+)\]/g, ".$1");
  for (const [re, prefix, whole] of SECTIONS) {
    const m = re.exec(path);
    if (!m) continue;
    const name = `${prefix}${m[1] || whole}`;
    return form.querySelector(`[name="${name}"]`) ? name : null;
  }
  return null;
}

// An API error shown where it belongs: 422 next to the field named by detail[].loc, others as a banner.
export function showError(err, form) {
  if (err.name === "AbortError") return;
  if (err.status === 422 && err.fields.length) {
    for (const f of err.fields) {
      const name = unitField(f.loc || [], form) || [...(f.loc || [])].reverse().find((p) => typeof p === "string" && form.querySelector(`[name="${p}"]`));
      const slot = name && form.querySelector(`#err-${name}`);
      // the allowed values, unless the message already names them all ("not a PNG, JPEG or WebP image")
      const said = f.allowed && f.allowed.every((a) => f.msg.includes(String(a)));
      const msg = f.allowed && f.allowed.length && f.allowed.length <= 12 && !said ? `${f.msg} (allowed: ${f.allowed.join(", ")})` : f.msg;
      if (slot) {
        slot.textContent = msg;
        const input = form.querySelector(`[name="${name}"]`);
        input.setAttribute("aria-invalid", "true");
        input.setAttribute("aria-describedby", slot.id);
        input.focus();
      } else form.querySelector(".err[data-for]").textContent = `${(f.loc || []).join(".")}: ${msg}`;
    }
    return;
  }
  if (err.status === 401) {
    banner("This service needs an API key: enter it at the top of the page.");
    $("api-key").focus();
  } else if (err.status === 429) banner(`The queue is full: try again in ${err.retryAfter || "a few"} s.`);
  else if (err.status === 503) banner(`The service is starting or shutting down (503): try again in ${err.retryAfter || "a few"} s.`);
  else banner(err.status ? `Error ${err.status}: ${err.message}` : `Cannot reach the service: ${err.message}`);
}

export function figure(b64, params, caption) {
  const fig = document.createElement("figure");
  const src = `data:image/png;base64,${b64}`;
  const img = Object.assign(document.createElement("img"), { src, alt: caption });
  const link = Object.assign(document.createElement("a"), { href: src, download: `kdiff-${params.seed}.png`, textContent: "Download" });
  const details = document.createElement("details");
  details.append(
    Object.assign(document.createElement("summary"), { textContent: "Parameters" }),
    Object.assign(document.createElement("pre"), { textContent: JSON.stringify(params, null, 1) }),
  );
  const cap = Object.assign(document.createElement("figcaption"), { textContent: `${caption} ` });
  cap.append(link, details);
  fig.append(img, cap);
  return fig;
}

// A chosen file's bytes as base64 (the body's image fields): the same handling for every image input.
export async function fileB64(file) {
  const url = await new Promise((ok, bad) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.onerror = () => bad(r.error);
    r.readAsDataURL(file);
  });
  return url.slice(url.indexOf(",") + 1);
}
