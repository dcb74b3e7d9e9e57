// img2img start image and the inpainting mask painted over it on a canvas (white = repaint).
const $ = (id) => document.getElementById(id);
const state = { image: null, b64: null, painted: false };
const maskLayer = document.createElement("canvas"); // black/white, what is sent

const toB64 = (dataUrl) => dataUrl.slice(dataUrl.indexOf(",") + 1);

function draw() {
  const c = $("mask");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (state.image) g.drawImage(state.image, 0, 0, c.width, c.height);
  g.globalAlpha = 0.5;
  g.globalCompositeOperation = "lighter";
  g.drawImage(maskLayer, 0, 0);
  g.globalAlpha = 1;
  g.globalCompositeOperation = "source-over";
}

function clearMask(fill = "black") {
  const g = maskLayer.getContext("2d");
  g.fillStyle = fill;
  g.fillRect(0, 0, maskLayer.width, maskLayer.height);
  state.painted = fill !== "black";
  draw();
}

// The mask's controls, shown for an image the browser can draw.
function paintable(yes) {
  for (const el of [$("mask-paint"), ...document.querySelectorAll("#mask-box .paint")]) el.hidden = !yes;
}

async function onFile(file) {
  if (!file) return reset();
  const url = await new Promise((ok) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.readAsDataURL(file);
  });
  $("init_image").removeAttribute("aria-invalid"); // a new file: the last one's error is outdated
  $("err-init_image").textContent = "";
  const img = new Image();
  const decoded = await new Promise((ok) => Object.assign(img, { onload: () => ok(true), onerror: () => ok(false), src: url }));
  $("mask-box").hidden = false;
  if (!decoded) {
    // Not the page's call: the service's image gate decides (it reads formats the browser does not
    // draw, and refuses some it does), and its words show next to the field when generating.
    Object.assign(state, { image: null, b64: toB64(url), painted: false });
    Object.assign($("init-note"), { hidden: false, textContent: `The browser cannot show ${file.name}: it is sent as it is, and the service says whether it can read it (no mask without a picture).` });
    return paintable(false);
  }
  $("init-note").hidden = true;
  paintable(true);
  const scale = 256 / Math.max(img.width, img.height);
  const c = $("mask");
  c.width = maskLayer.width = Math.max(8, Math.round(img.width * scale));
  c.height = maskLayer.height = Math.max(8, Math.round(img.height * scale));
  Object.assign(state, { image: img, b64: toB64(url) });
  clearMask();
}

function reset() {
  Object.assign(state, { image: null, b64: null, painted: false });
  $("init_image").value = "";
  $("mask-box").hidden = true;
}

export function setupMask() {
  $("init_image").addEventListener("change", (e) => onFile(e.target.files[0]));
  $("mask-clear").addEventListener("click", () => clearMask());
  $("mask-all").addEventListener("click", () => clearMask("white"));
  $("init-clear").addEventListener("click", reset);
  const c = $("mask");
  let down = false;
  const paint = (e) => {
    if (!down) return;
    const r = c.getBoundingClientRect();
    const g = maskLayer.getContext("2d");
    g.fillStyle = "white";
    g.beginPath();
    const x = ((e.clientX - r.left) / r.width) * c.width;
    const y = ((e.clientY - r.top) / r.height) * c.height;
    g.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI);
    g.fill();
    state.painted = true;
    draw();
  };
  c.addEventListener("pointerdown", (e) => { down = true; c.setPointerCapture(e.pointerId); paint(e); });
  c.addEventListener("pointermove", paint);
  c.addEventListener("pointerup", () => { down = false; });
}

// {init_image, denoise, mask} for the request, or {} without a start image.
export function img2imgFields() {
  if (!state.b64) return {};
  const out = { init_image: state.b64, denoise: Number($("denoise").value) };
  if (state.painted) out.mask = toB64(maskLayer.toDataURL("image/png"));
  return out;
}
