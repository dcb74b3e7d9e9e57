"""Per-model tuned schedules: ``model_store/<name>/schedules/<sampler>-<nfe>.json`` (kdiff tune-schedule).

The served schedule ``tuned`` picks the file for a request's sampler and step count; a model without
one gets an error listing the files it has. Files are small JSON objects (the sigmas and how they were
made, see :mod:`service.models.tune_cli`); names are built here, never taken from a request. A tuned
solver's file (``ipndm_tuned``) also holds its fitted ``coefficients`` and the sampler ``options``
they were fitted at; the request then runs with both and its parameters record them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TUNED = "tuned"  # the schedule name that serves these files
FILE_RE = re.compile(r"^(?P<sampler>[a-z0-9_]+)-(?P<nfe>[0-9]+)\.json$")


class NoTunedScheduleError(ValueError):
    """No tuned schedule for (sampler, steps); the message lists what the model has."""


def schedule_dir(folder: Path) -> Path:
    """Where a model folder keeps its tuned schedules."""
    return Path(folder) / "schedules"


def file_for(folder: Path, sampler: str, nfe: int) -> Path:
    """The file of one tuned schedule."""
    return schedule_dir(folder) / f"{sampler}-{int(nfe)}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(data, dict) and isinstance(data.get("sigmas"), list) and isinstance(data.get("steps"), int)
    )
    if ok and data.get("coefficients") is not None:  # a tuned solver's: numbers, and options a dict
        coeffs, opts = data["coefficients"], data.get("options", {})
        ok = isinstance(coeffs, list) and all(isinstance(v, int | float) for v in coeffs)
        ok = ok and isinstance(opts, dict)
    return data if ok else None


def available(folder: Path) -> dict[str, list[dict[str, int]]]:
    """{sampler: [{"nfe", "steps"}, ...]} for the model's readable tuned-schedule files."""
    out: dict[str, list[dict[str, int]]] = {}
    d = schedule_dir(folder)
    if not d.is_dir():
        return out
    for path in sorted(d.iterdir()):
        m = FILE_RE.match(path.name)
        data = _read(path) if m else None
        if m and data is not None:
            out.setdefault(m["sampler"], []).append({"nfe": int(m["nfe"]), "steps": int(data["steps"])})
    for rows in out.values():
        rows.sort(key=lambda r: r["nfe"])
    return out


def describe(have: dict[str, list[dict[str, int]]]) -> str:
    """'dpmpp_2m: steps 5, 8, 10; euler: steps 5' (or 'none')."""
    parts = [f"{s}: steps {', '.join(str(r['steps']) for r in rows)}" for s, rows in sorted(have.items())]
    return "; ".join(parts) or "none (make them with `kdiff tune-schedule`)"


@dataclasses.dataclass(frozen=True)
class TunedEntry:
    """One tuned file as a request runs it: sigmas, and for a tuned solver its coefficients and the
    sampler options they were fitted at."""

    sigmas: tuple[float, ...]
    coefficients: list[float] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def tuned_entry(folder: Path, model: str, sampler: str, steps: int) -> TunedEntry:
    """The tuned file of ``model`` for ``sampler`` at ``steps`` steps, else NoTunedScheduleError."""
    have = available(folder)
    for row in have.get(sampler, []):
        if row["steps"] == steps:
            data = _read(file_for(folder, sampler, row["nfe"]))
            if data is not None:
                sigmas = tuple(float(v) for v in data["sigmas"])
                if data.get("coefficients") is None:
                    return TunedEntry(sigmas)
                coeffs = [float(v) for v in data["coefficients"]]
                return TunedEntry(sigmas, coeffs, dict(data.get("options", {})))
    raise NoTunedScheduleError(
        f"model {model!r} has no tuned schedule for sampler {sampler!r} at {steps} steps; "
        f"tuned schedules: {describe(have)}"
    )


def tuned_sigmas(folder: Path, model: str, sampler: str, steps: int) -> tuple[float, ...]:
    """The tuned sigmas of ``model`` for ``sampler`` at ``steps`` steps, else NoTunedScheduleError."""
    return tuned_entry(folder, model, sampler, steps).sigmas


TUNED_DOC = (
    "sigmas tuned to the model for the request's sampler and step count (kdiff tune-schedule; "
    "after Optimal Stepsize Distillation, Pei et al. 2025); what each model has is listed here"
)


def catalogue_entry(folders: Mapping[str, Path]) -> dict[str, Any]:
    """The ``tuned`` entry of GET /schedules: per model, {sampler: [{"nfe", "steps"}]}."""
    return {
        "name": TUNED,
        "doc": TUNED_DOC,
        "needs_discrete": False,
        "uses_sigma_range": False,
        "options": {},
        "models": {name: available(folder) for name, folder in folders.items()},
    }


def tuned_request(req: Any, folder: Path, model: str, default_sampler: str, default_steps: int) -> Any:
    """``req`` (a dataclass with ``schedule``, ``sampler``, ``steps``, ``sigmas``, ``coefficients``,
    ``sampler_options``) with schedule ``tuned`` swapped for the model's tuned sigmas for its sampler
    and steps (defaults: the model's), and a tuned solver's coefficients and options. A request that
    gives sigmas (or coefficients) with ``tuned`` is refused unless they are the file's (a result's
    recorded parameters posted back)."""
    if getattr(req, "schedule", None) != TUNED:
        return req
    from service.sampling import aliases, registry
    from service.sampling.errors import InputError

    sampler = req.sampler or default_sampler
    steps = req.steps or default_steps
    try:
        if sampler not in registry.SAMPLERS:
            sampler = aliases.resolve(sampler)[0]
        entry = tuned_entry(folder, model, sampler, steps)
    except registry.UnknownNameError as exc:
        raise InputError(exc.kind, str(exc), exc.valid) from exc
    except NoTunedScheduleError as exc:
        have = available(folder)
        raise InputError(
            "schedule", str(exc), [f"{s}-{r['nfe']}" for s, rows in have.items() for r in rows]
        ) from exc
    given = getattr(req, "coefficients", None)
    recorded = req.sigmas is not None and _same(req.sigmas, entry.sigmas) and _same(given, entry.coefficients)
    if req.sigmas is not None and not recorded:
        raise InputError("schedule", "give a schedule or sigmas, not both")
    if given is not None and not recorded:
        raise InputError(
            "coefficients", "schedule 'tuned' sets the coefficients from the model's file; give one"
        )
    if entry.coefficients is None:
        return dataclasses.replace(req, schedule=None, sigmas=list(entry.sigmas), steps=steps)
    options = dict(getattr(req, "sampler_options", None) or {})
    for key, value in entry.options.items():
        if options.setdefault(key, value) != value:
            raise InputError(
                "sampler_options",
                f"the tuned solver of {sampler!r} at {steps} steps was fitted at {key}={value}",
            )
    return dataclasses.replace(
        req,
        schedule=None,
        sigmas=list(entry.sigmas),
        steps=steps,
        coefficients=list(entry.coefficients),
        sampler_options=options,
    )


def _same(given: Any, stored: Any) -> bool:
    """A request's list equal to a file's (both absent counts; floats compared as JSON gives them)."""
    if given is None or stored is None:
        return given is None and stored is None
    return [float(v) for v in given] == [float(v) for v in stored]
