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

// A ControlNet unit's field (loc "controlnets[0].model" or ["controlnets", 0, "model"]) -> its
// control in the ControlNet section (cn_model), not the form's control of the same name.
function unitField(loc, form) {
  const path = loc.filter((p) => p !== "body").join(".").replace(/\[(\d+)\]/g, ".$1");
  const m = /^controlnets(?:\.\d+\.(\w+))?/.exec(path);
  if (!m) return null;
  const name = `cn_${m[1] || "model"}`;
  return form.querySelector(`[name="${name}"]`) ? name : null;
}

// An API error shown where it belongs: 422 next to the field named by detail[].loc, others as a banner.
export function showError(err, form) {
  if (err.name === "AbortError") return;
  if (err.status === 422 && err.fields.length) {
    for (const f of err.fields) {
      const name = unitField(f.loc || [], form) || [...(f.loc || [])].reverse().find((p) => typeof p === "string" && form.querySelector(`[name="${p}"]`));
      const slot = name && form.querySelector(`#err-${name}`);
      const msg = f.allowed && f.allowed.length <= 12 ? `${f.msg} (allowed: ${f.allowed.join(", ")})` : f.msg;
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
