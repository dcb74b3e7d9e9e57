// What this tab keeps across a reload or a back/forward (sessionStorage: per tab, so two tabs keep
// their own): the form's values when the page was left, and the job it followed (running or not).
const KEY = "kdiff-session";

function read() {
  try {
    return JSON.parse(sessionStorage.getItem(KEY) || "{}") || {};
  } catch {
    return {}; // storage off (a privacy mode) or not ours: nothing kept
  }
}

function write(patch) {
  try {
    sessionStorage.setItem(KEY, JSON.stringify({ ...read(), ...patch }));
  } catch {
    // storage off or full: the page works, it just forgets on reload
  }
}

export const job = () => ({ job: read().job || null, running: Boolean(read().running) });
export const setJob = (id, running) => write({ job: id, running });
export const form = () => read().form || null;
export const setForm = (values) => write({ form: values });
