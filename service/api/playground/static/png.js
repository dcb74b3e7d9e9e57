// Reading the generation parameters our PNGs carry: `kdiff` (our JSON) and `parameters` (A1111's
// infotext) text chunks.

// {keyword: text} of a PNG's tEXt and uncompressed iTXt chunks.
export function textChunks(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const sig = [137, 80, 78, 71, 13, 10, 26, 10];
  if (bytes.length < 8 || sig.some((b, i) => bytes[i] !== b)) throw new Error("not a PNG file");
  const out = {};
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder();
  for (let pos = 8; pos + 8 <= bytes.length; ) {
    const len = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + len);
    const nul = data.indexOf(0);
    if (type === "tEXt" && nul > 0) {
      out[latin1.decode(data.subarray(0, nul))] = latin1.decode(data.subarray(nul + 1));
    } else if (type === "iTXt" && nul > 0 && data[nul + 1] === 0) {
      // keyword \0 compression-flag method language \0 translated \0 text
      let p = data.indexOf(0, nul + 3);
      p = data.indexOf(0, p + 1);
      out[latin1.decode(data.subarray(0, nul))] = utf8.decode(data.subarray(p + 1));
    }
    if (type === "IEND") break;
    pos += 12 + len;
  }
  return out;
}

// A1111 infotext -> our field names (the parts this page can set).
export function fromInfotext(text) {
  const lines = text.trim().split("\n");
  const last = lines.pop() || "";
  const p = {};
  const neg = lines.findIndex((l) => l.startsWith("Negative prompt:"));
  p.prompt = (neg >= 0 ? lines.slice(0, neg) : lines).join("\n");
  if (neg >= 0) p.negative_prompt = lines.slice(neg).join("\n").replace("Negative prompt:", "").trim();
  for (const m of last.matchAll(/([\w ]+): ([^,]+)/g)) {
    const [k, v] = [m[1].trim(), m[2].trim()];
    if (k === "Steps") p.steps = Number(v);
    else if (k === "CFG scale") p.cfg_scale = Number(v);
    else if (k === "Seed") p.seed = Number(v);
  }
  return p;
}

// Our parameters from a PNG file, or null when it carries none.
export async function parametersOf(file) {
  const chunks = textChunks(await file.arrayBuffer());
  if (chunks.kdiff) return JSON.parse(chunks.kdiff);
  if (chunks.parameters) return fromInfotext(chunks.parameters);
  return null;
}
