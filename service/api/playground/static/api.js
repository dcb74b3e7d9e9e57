// The service's HTTP API, with relative URLs (so the page works behind a path prefix) and the
// API key from the page's key field (kept in localStorage).
const KEY = "kdiff-api-key";

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (v) => (v ? localStorage.setItem(KEY, v) : localStorage.removeItem(KEY)),
  // another tab of this page changed the key: onChange(newKey)
  watch: (onChange) => window.addEventListener("storage", (e) => e.key === KEY && onChange(e.newValue || "")),
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

// Submit a job and follow it to the end: resolves with {id, status, result|error}, reports progress.
export async function runJob(body, { onJob, ...rest } = {}) {
  const job = await call("POST", "jobs", body, rest.signal);
  if (onJob) onJob(job.id);
  return { id: job.id, ...(await follow(job.id, rest)) };
}

const TERMINAL = { done: "succeeded", error: "failed", cancelled: "cancelled" };
const FIRST_WAIT_MS = 500;
const MOST_WAIT_MS = 8000;

function sleep(ms, signal) {
  return new Promise((ok, bad) => {
    const t = setTimeout(ok, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      bad(new DOMException("stopped following the job", "AbortError"));
    }, { once: true });
  });
}

// A connection that failed (network error, 5xx from a proxy or a restarting service): worth trying
// again. A 404 (the job is gone) and the other 4xx (no key, not ours) are answers, not failures.
const lost = (err) => err.name !== "AbortError" && (!err.status || err.status >= 500);

// Follow job `id` to its end. A dropped event stream is not the job's end (a proxy's idle timeout, a
// laptop's Wi-Fi, a service restart with a job store: the job goes on running there): ask GET
// jobs/{id} with backoff until the service answers, take the result when the job has ended,
// subscribe again while it runs. Only a 404 (the service no longer has the job) ends it as "gone".
// onRetry(attempt, waitMs) reports each wait.
export async function follow(id, { onEvent, onRetry, preview = false, signal } = {}) {
  const url = `jobs/${encodeURIComponent(id)}/events${preview ? "?preview=true" : ""}`;
  for (let attempt = 1, wait = FIRST_WAIT_MS; ; attempt++) {
    let end = null;
    try {
      await events(url, (name, data) => {
        wait = FIRST_WAIT_MS; // the connection worked: the next drop starts the backoff again
        if (onEvent) onEvent(name, data);
        if (name in TERMINAL) end = { status: TERMINAL[name], ...(name === "done" ? { result: data } : name === "error" ? { error: data } : {}) };
      }, signal);
      if (end) return end;
    } catch (err) {
      if (err.status === 404) return { status: "gone" };
      if (!lost(err)) throw err;
    }
    // the stream ended without the job's end: ask for the job until the service answers
    for (;; attempt++, wait = Math.min(wait * 2, MOST_WAIT_MS)) {
      if (onRetry) onRetry(attempt, wait);
      await sleep(wait, signal);
      let job;
      try {
        job = await call("GET", `jobs/${encodeURIComponent(id)}`, null, signal);
      } catch (err) {
        if (err.status === 404) return { status: "gone" };
        if (!lost(err)) throw err;
        continue;
      }
      if (job.status === "succeeded") return { status: "succeeded", result: job.result };
      if (job.status === "failed") return { status: "failed", error: job.error };
      if (job.status === "cancelled") return { status: "cancelled" };
      break; // queued or running: subscribe again
    }
  }
}

export const cancelJob = (id) => call("DELETE", `jobs/${encodeURIComponent(id)}`);
