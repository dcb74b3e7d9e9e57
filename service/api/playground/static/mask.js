// img2img start image and the inpainting mask painted over it on a canvas (white = repaint).
import { banner } from "./ui.js";

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

async function onFile(file) {
  if (!file) return reset();
  const url = await new Promise((ok) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.readAsDataURL(file);
  });
  const img = new Image();
  const decoded = await new Promise((ok) => Object.assign(img, { onload: () => ok(true), onerror: () => ok(false), src: url }));
  if (!decoded) {
    reset(); // the previous image is not sent either
    return banner(`Cannot read ${file.name}: not an image`);
  }
  if ($("banner").textContent.startsWith("Cannot read ")) banner(""); // our own error, now outdated
  const scale = 256 / Math.max(img.width, img.height);
  const c = $("mask");
  c.width = maskLayer.width = Math.max(8, Math.round(img.width * scale));
  c.height = maskLayer.height = Math.max(8, Math.round(img.height * scale));
  Object.assign(state, { image: img, b64: toB64(url) });
  $("mask-box").hidden = false;
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
