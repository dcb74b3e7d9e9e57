// The sampler comparison grid (A1111's X/Y plot): samplers x values of one axis, same seed, every
// cell submitted at once. The engine batches all of them at every step, so the grid's wall time is
// close to its slowest cell, not the sum of the cells' times; the summary shows both.
import { cancelJob, runJob } from "./api.js";
import { readForm } from "./form.js";
import { figure, showError } from "./ui.js";

const $ = (id) => document.getElementById(id);
const MAX = 4;
let running = null; // the grid's cells while it runs: {ids, stopped}

// The values of the axis: the schedules picked in the list (only those the model runs), or numbers
// typed comma separated.
function parseValues(axis, text) {
  if (axis === "schedule") return [...$("cmp-schedules").selectedOptions].map((o) => o.value);
  const parts = text.split(",").map((s) => s.trim()).filter(Boolean);
  return parts.map((p) => {
    const v = Number(p);
    if (!Number.isFinite(v) || (axis === "steps" && !Number.isInteger(v))) throw new Error(`${p} is not a valid ${axis} value`);
    return v;
  });
}

function cellBody(base, sampler, axis, value) {
  const body = { ...base, sampler, n: 1, [axis]: value };
  delete body.sampler_options; // the form's options belong to the form's sampler
  if (axis === "schedule") delete body.schedule_options;
  return body;
}

async function run() {
  const err = document.querySelector('[data-for="cmp"]');
  err.textContent = "";
  const samplers = [...$("cmp-samplers").selectedOptions].map((o) => o.value);
  const axis = $("cmp-axis").value;
  let values;
  try {
    values = parseValues(axis, $("cmp-values").value);
  } catch (e) {
    err.textContent = e.message;
    return $("cmp-values").focus();
  }
  if (!samplers.length || samplers.length > MAX) {
    err.textContent = `pick 1 to ${MAX} samplers (ctrl/shift-click, or space with the keyboard)`;
    return $("cmp-samplers").focus();
  }
  if (!values.length || values.length > MAX) {
    const schedules = axis === "schedule";
    err.textContent = schedules ? `pick 1 to ${MAX} schedules` : `give 1 to ${MAX} values, comma separated`;
    return $(schedules ? "cmp-schedules" : "cmp-values").focus();
  }
  if ($("seed").value === "") $("seed").value = Math.floor(Math.random() * 2 ** 31); // same seed everywhere
  const base = readForm();
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.append(Object.assign(document.createElement("th"), { textContent: `sampler \\ ${axis}` }));
  for (const v of values) head.append(Object.assign(document.createElement("th"), { scope: "col", textContent: v }));
  const cells = [];
  const tbody = table.createTBody();
  for (const s of samplers) {
    const row = tbody.insertRow();
    row.append(Object.assign(document.createElement("th"), { scope: "row", textContent: s }));
    for (const v of values) {
      const td = row.insertCell();
      td.textContent = "queued";
      cells.push({ td, body: cellBody(base, s, axis, v), label: `${s}, ${axis} ${v}` });
    }
  }
  $("cmp-grid").replaceChildren(table);
  $("cmp-summary").textContent = `Running ${cells.length} cells...`;
  $("cmp-run").disabled = true;
  $("cmp-cancel").disabled = false;
  running = { ids: [], stopped: false };
  const t0 = performance.now();
  const times = await Promise.all(cells.map((c) => runCell(c)));
  const stopped = running.stopped;
  running = null;
  $("cmp-cancel").disabled = true;
  $("cmp-run").disabled = false;
  if (stopped) return void ($("cmp-summary").textContent = `Cancelled: ${times.filter((t) => t > 0).length} of ${cells.length} cells finished.`);
  const wall = (performance.now() - t0) / 1000;
  const sum = times.reduce((a, b) => a + b, 0);
  const summary = $("cmp-summary");
  summary.dataset.wallS = wall.toFixed(3);
  summary.dataset.sumS = sum.toFixed(3);
  summary.dataset.slowestS = Math.max(...times).toFixed(3);
  summary.textContent = `${cells.length} cells: total wall time ${wall.toFixed(2)} s (slowest cell ` +
    `${Math.max(...times).toFixed(2)} s); sum of the cells' times ${sum.toFixed(2)} s. The cells ran together: ` +
    "the service batches every running job into each model call.";
  $("cmp-run").disabled = false;
}

// One cell's job; resolves with its time (submission to result, as the server measured it).
async function runCell({ td, body, label }) {
  try {
    const grid = running;
    const end = await runJob(body, {
      // Cancel before this cell's id came back: its job is deleted as soon as it has one
      onJob: (id) => (grid.stopped ? cancelJob(id).catch(() => {}) : grid.ids.push(id)),
      onRetry: () => (td.textContent = "connection lost; reconnecting..."),
      onEvent: (name, d) => {
        if (name === "progress") td.textContent = `step ${d.step}/${d.total}`;
      },
    });
    if (end.status !== "succeeded") {
      td.textContent = end.status + (end.error ? `: ${end.error.message}` : "");
      return 0;
    }
    const r = end.result;
    const t = r.timings.total_s;
    td.replaceChildren(figure(r.images[0], { ...r.parameters, seed: r.seeds[0] }, `${label}: ${t.toFixed(2)} s`));
    return t;
  } catch (err) {
    td.textContent = err.fields && err.fields.length ? err.fields.map((f) => f.msg).join("; ") : err.message;
    if (!err.fields || !err.fields.length) showError(err, $("gen"));
    return 0;
  }
}

// The schedules the selected model runs (form.js: offeredSchedules), the picks kept where offered.
export function compareFor(model, names) {
  const keep = new Set([...$("cmp-schedules").selectedOptions].map((o) => o.value));
  $("cmp-schedules").replaceChildren(...names.map((n) => new Option(n, n, false, keep.has(n))));
}

// Varying the schedule: pick from the list; the other axes: type numbers.
function onAxis() {
  const schedules = $("cmp-axis").value === "schedule";
  $("cmp-schedules-row").hidden = !schedules;
  $("cmp-values-row").hidden = schedules;
}

// Cancel the grid: every cell's job is deleted (each cell then says "cancelled").
function cancel() {
  if (!running) return;
  running.stopped = true;
  $("cmp-cancel").disabled = true;
  for (const id of running.ids) cancelJob(id).catch((err) => showError(err, $("gen")));
}

export function setupCompare() {
  $("cmp-run").addEventListener("click", run);
  $("cmp-cancel").addEventListener("click", cancel);
  // the grid is not a form: Enter in its values field runs it, as Enter in the form generates
  $("cmp-values").addEventListener("keydown", (e) => e.key === "Enter" && !$("cmp-run").disabled && run());
  $("cmp-axis").addEventListener("change", onAxis);
  onAxis();
}
