// The playground: form from the catalogue, a job with live progress, results, errors.
import { apiKey, cancelJob, follow, runJob } from "./api.js";
import { setupCompare } from "./compare.js";
import { controlNetFields, loadControlNets, setupControlNet } from "./controlnet.js";
import { addErrorSlots, loadCatalogue, model, onModel, onSampler, onSchedule, readForm, refreshModels, restore, sizeLimits } from "./form.js";
import { ipAdapterFields, loadAdapters, setupIpAdapter, showAdaptersFor } from "./ipadapter.js";
import { img2imgFields, setupMask } from "./mask.js";
import { parametersOf } from "./png.js";
import * as session from "./session.js";
import { banner, clearErrors, figure, showError } from "./ui.js";

const $ = (id) => document.getElementById(id);
let current = null; // {id, abort} of the running job

function progressText(name, d) {
  if (name === "loading") return `Loading the model ${d.model}...`;
  if (name === "queued") return `Queued, position ${d.position}.`;
  if (name === "progress") {
    const eta = d.eta_s === null || d.eta_s === undefined ? "" : `, about ${d.eta_s.toFixed(1)} s left`;
    return `Step ${d.step} of ${d.total}${eta}.`;
  }
  return "";
}

async function generate(e) {
  e.preventDefault();
  clearErrors($("gen"));
  if (current || !model()) return;
  const body = { ...readForm(), ...img2imgFields(), ...controlNetFields(), ...ipAdapterFields() };
  await watch((opts) => runJob(body, opts), "Submitting...");
}

// A job this tab followed before a reload or a back/forward (session.js): follow it again, so a
// running one's progress and image, or a finished one's images, are back on the page.
async function resume() {
  const { job, running } = session.job();
  if (!job) return;
  await watch(async (opts) => {
    opts.onJob(job);
    return { id: job, ...(await follow(job, opts)) };
  }, "Reconnecting to the last job...", { resumed: true, quiet: !running });
}

// Follow the job `run(options)` makes or names to its end, with progress, Cancel and the result.
// resumed: the page's clock did not see the job start; quiet: a 404 drops the job silently (a
// finished one whose result expired is nothing to report).
async function watch(run, status, { resumed = false, quiet = false } = {}) {
  const abort = new AbortController();
  current = { id: null, abort };
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("status").textContent = status;
  $("progress").value = 0;
  const t0 = performance.now();
  let loading = false; // the job loaded its model: GET /models has news after it
  try {
    const end = await run({
      preview: true,
      signal: abort.signal,
      onJob: (id) => {
        current.id = id;
        session.setJob(id, true);
        if (current.cancelled) stop(id); // Cancel came before the id: delete the job now
      },
      onRetry: (attempt, ms) => {
        $("status").textContent = `Connection lost; the job may still be running. Reconnecting in ${(ms / 1000).toFixed(1)} s (try ${attempt})...`;
      },
      onEvent: (name, d) => {
        if (name === "loading") loading = true;
        if (progressText(name, d)) $("status").textContent = progressText(name, d);
        if (name === "progress") $("progress").value = d.fraction;
        if (d.preview) Object.assign($("preview"), { src: `data:image/png;base64,${d.preview}`, hidden: false });
      },
    });
    $("preview").hidden = true;
    session.setJob(end.status === "gone" ? null : end.id, false);
    if (!model()?.conditioning || loading) refreshModels().catch(() => {}); // what the loaded model takes
    if (end.status === "succeeded") {
      const r = end.result;
      $("progress").value = 1;
      const server = `server ${r.timings.total_s.toFixed(2)} s`;
      $("status").textContent = resumed ? `Done (${server}).` : `Done in ${((performance.now() - t0) / 1000).toFixed(2)} s (${server}).`;
      $("results").replaceChildren(...r.images.map((b64, i) => figure(b64, { ...r.parameters, seed: r.seeds[i] }, `seed ${r.seeds[i]}`)));
    } else if (end.status === "cancelled") {
      $("status").textContent = "Cancelled.";
    } else if (end.status === "gone") {
      $("status").textContent = quiet ? "Ready." : "Lost.";
      if (!quiet) banner(`Job ${end.id} is gone: the service no longer has it (it restarted without a job store, or the result expired). Generate again.`);
    } else {
      $("status").textContent = "Failed.";
      banner(`The job failed: ${end.error ? `${end.error.code}: ${end.error.message}` : "unknown error"}`);
    }
  } catch (err) {
    if (abort.signal.aborted) $("status").textContent = `Stopped following job ${current.id}: the service could not be reached to cancel it.`;
    else $("status").textContent = current.id ? "Failed." : "Not run.";
    showError(err, $("gen"));
  } finally {
    current = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

// Before the job's id is back ("Submitting...") the request is left to finish, so the job it makes
// is known and deleted (aborting it could leave a job running on the server); generate() deletes it.
async function cancel() {
  if (!current) return;
  $("status").textContent = "Cancelling...";
  $("cancel").disabled = true;
  if (!current.id) return void (current.cancelled = true);
  await stop(current.id);
}

async function stop(id) {
  try {
    await cancelJob(id); // the event stream then ends with `cancelled`
  } catch (err) {
    showError(err, $("gen"));
    // the service cannot be reached (the page is reconnecting): stop waiting for the job here
    if (!err.status && current && current.id === id) current.abort.abort();
  }
}

// A dropped or chosen image's parameters into the form; the service's words when it refuses the file.
async function loadParameters(file) {
  try {
    const p = await parametersOf(file);
    if (!p) return banner(`${file.name} carries no generation parameters.`);
    const skipped = restore(p);
    const not = skipped.length ? ` Not restored (not offered here): ${skipped.join(", ")}.` : "";
    banner(`Parameters restored from ${file.name}.${not}`, "info");
  } catch (err) {
    if (err.status && err.status !== 422) return showError(err, $("gen"));
    const why = err.fields && err.fields.length ? err.fields.map((f) => f.msg).join("; ") : err.message;
    banner(`Cannot read ${file.name}: ${why}`);
  }
}

async function start() {
  const form = $("gen");
  $("api-key").value = apiKey.get();
  $("api-key").addEventListener("change", (e) => {
    apiKey.set(e.target.value.trim());
    startCatalogue();
  });
  // the key typed in another tab is the one this tab's requests send too: show it, and load with it
  apiKey.watch((key) => {
    $("api-key").value = key;
    if (document.body.dataset.ready !== "true") startCatalogue();
  });
  addErrorSlots(form);
  form.addEventListener("submit", generate);
  form.addEventListener("input", (e) => {
    const slot = e.target.name && form.querySelector(`#err-${e.target.name}`);
    if (slot) slot.textContent = "";
    e.target.removeAttribute("aria-invalid");
  });
  $("cancel").addEventListener("click", cancel);
  // Escape stops the running job from anywhere on the page (an open select's list takes it first)
  document.addEventListener("keydown", (e) => e.key === "Escape" && current && !$("cancel").disabled && cancel());
  // Ctrl/Cmd+Enter in the prompts generates (Enter writes a new line there), as in A1111's web UI
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (e) => e.key === "Enter" && (e.ctrlKey || e.metaKey) && (e.preventDefault(), form.requestSubmit()));
  }
  $("model").addEventListener("change", onModel);
  $("sampler").addEventListener("change", onSampler);
  $("schedule").addEventListener("change", onSchedule);
  for (const f of ["width", "height"]) $(f).addEventListener("input", sizeLimits);
  $("dice").addEventListener("click", () => ($("seed").value = Math.floor(Math.random() * 2 ** 31)));
  $("load-png").addEventListener("change", (e) => e.target.files[0] && loadParameters(e.target.files[0]));
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    const file = e.dataTransfer.files[0];
    if (!file || e.target === $("init_image")) return;
    e.preventDefault();
    loadParameters(file);
  });
  setupMask();
  setupCompare();
  setupControlNet();
  setupIpAdapter();
  // leaving (reload, a link, back): the form's values are kept for this tab's return
  window.addEventListener("pagehide", () => model() && session.setForm(readForm()));
  await startCatalogue();
}

let returned = false;

// Back in this tab after a reload or back/forward: the form as it was left, the job it followed.
function comeBack() {
  if (returned) return;
  returned = true;
  const values = session.form();
  if (values) {
    restore(values);
    if (values.n) $("n").value = values.n;
  }
  resume();
}

async function startCatalogue() {
  try {
    const [, controlTypes] = await Promise.all([loadCatalogue(), loadControlNets()]);
    loadAdapters(controlTypes);
    showAdaptersFor(model());
    banner("");
    // Generate and the grid need the catalogue (a slow service: they stay disabled until it is here)
    if (!current) $("generate").disabled = false;
    $("cmp-run").disabled = false;
    if (!current) $("status").textContent = "Ready.";
    document.body.dataset.ready = "true";
    comeBack();
  } catch (err) {
    if (!current) $("status").textContent = "The list of models could not be loaded.";
    showError(err, $("gen"));
  }
}

start();
