// The service's HTTP API, with relative URLs (so the page works behind a path prefix) and the
// API key from the page's key field (kept in localStorage).
const KEY = "kdiff-api-key";

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (v) => (v ? localStorage.setItem(KEY, v) : localStorage.removeItem(KEY)),
};

function headers(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// An API error: status, a readable message, field errors (422 detail[]) and Retry-After.
export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail : `HTTP ${status}`;
    super(text);
    this.status = status;
    this.fields = Array.isArray(detail) ? detail : [];
    this.retryAfter = retryAfter;
  }
}

export async function call(method, path, body, signal) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}), signal };
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, data, r.headers.get("Retry-After"));
  return data;
}

// Server-Sent Events read with fetch(), not EventSource: EventSource cannot send the Authorization
// header. Calls onEvent(name, data) for each event until the stream ends or signal aborts.
export async function events(path, onEvent, signal) {
  const r = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null), r.headers.get("Retry-After"));
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// Submit a job and follow it to the end: resolves with {status, result|error}, reports progress.
export async function runJob(body, { onJob, onEvent, preview = false, signal } = {}) {
  const job = await call("POST", "jobs", body, signal);
  if (onJob) onJob(job.id);
  let end = null;
  const url = `jobs/${job.id}/events${preview ? "?preview=true" : ""}`;
  await events(url, (name, data) => {
    if (onEvent) onEvent(name, data);
    if (name === "done") end = { status: "succeeded", result: data };
    else if (name === "error") end = { status: "failed", error: data };
    else if (name === "cancelled") end = { status: "cancelled" };
  }, signal);
  return { id: job.id, ...(end || { status: "unknown" }) };
}

export const cancelJob = (id) => call("DELETE", `jobs/${encodeURIComponent(id)}`);
