"""Per-row cache state and the per-row decision inside one batched model call.

A network that can cache calls :func:`run_cached` at its split point with each row's probe (the
features the decision reads) and a function that computes the skipped part for some rows. Rows
whose cache holds take the skipped part's output from their last full evaluation; only the other
rows run it. Rows without a cache (id 0) always run it, so they compute exactly what the plain
forward computes.

In fixed-shape mode (the engine's batch-invariant mode, on by default) the skipped part runs on
every row of the call when any row needs it (the outputs of rows whose cache holds are dropped): an
uncached row then runs every layer at the shape it would have alone and stays bit for bit the same
in a mixed call; the work saved is that of calls whose rows all hold their cache. Without it the
skipped part runs on the rows that need it only; what a call binds to its rows around the network
(per-row LoRA, IP-Adapter images) follows them through :func:`bound_rows`.

State lives in one process-wide store keyed by row id: :func:`cache_rows` registers a request's
rows, a call only updates registered rows, and :func:`release` (the engine, when the job ends) or
the rows tensor being freed (a request that never ran: refused at submit, or the direct loop)
removes them; a call still running when its job ends cannot bring a row back.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TypeGuard

import torch
from torch import Tensor

from .spec import DEFAULT_LEVEL, KEY, METHODS, WIDTH, CacheSpec


@dataclass
class RowState:
    since_full: int = 0  # evaluations since the last full one
    evals: int = 0  # evaluations so far (the cache acts from the spec's ``start`` on)
    ref: Tensor | None = None  # the probe at the last full evaluation (threshold mode)
    cached: Tensor | None = None  # the skipped part's output at the last full evaluation
    probe_shape: tuple[int, ...] = ()


class Store:
    """Every live row's state, counts of skipped-part row evaluations (run, padding, reused) and of
    calls with a live cache (``calls``) and those whose rows all held it (``all_held``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[int, RowState] = {}
        self.fixed_shape = True
        self.ran = self.padded = self.reused = self.calls = self.all_held = 0

    def __len__(self) -> int:
        return len(self.rows)

    def reset_counts(self) -> None:
        self.ran = self.padded = self.reused = self.calls = self.all_held = 0


STORE = Store()
_ids = itertools.count(1)


def cache_rows(spec: CacheSpec | None, rows: int) -> Tensor:
    """``rows`` rows of the cache tensor (:data:`KEY`): fresh registered ids for a spec, zeros (no
    cache) without one. The ids are forgotten when the tensor is freed, if not released before."""
    out = torch.zeros(rows, WIDTH, dtype=torch.float64)
    if spec is None:
        return out
    with STORE.lock:
        ids = [next(_ids) for _ in range(rows)]
        STORE.rows.update((i, RowState()) for i in ids)
    out[:, 0] = torch.tensor(ids, dtype=torch.float64)
    out[:, 1] = METHODS[spec.method]
    out[:, 2] = spec.interval or 0
    out[:, 3] = spec.threshold or 0.0
    out[:, 4] = spec.start or 0
    out[:, 5] = DEFAULT_LEVEL if spec.level is None else spec.level
    weakref.finalize(out, _forget, ids)
    return out


def _forget(ids: Iterable[int]) -> None:
    with STORE.lock:
        for i in ids:
            STORE.rows.pop(i, None)


def live(rows: Tensor | None) -> TypeGuard[Tensor]:
    """Whether a call's cache tensor has any row with a cache (a device read; CPU-side it is cheap)."""
    return rows is not None and rows.numel() > 0 and bool(rows[:, 0].any())


def release(conds: Iterable[Mapping[str, Tensor] | None]) -> None:
    """Forget the cache of every row in these conditioning dicts (a job's cond and uncond)."""
    ids: set[int] = set()
    for cond in conds:
        if cond is not None and KEY in cond:
            ids.update(int(i) for i in cond[KEY][:, 0].tolist() if i)
    _forget(ids)


RowBinder = Callable[[Tensor], AbstractContextManager[None]]
_binders = threading.local()


@contextmanager
def bound_rows(select: RowBinder) -> Iterator[None]:
    """Inside the block, a skipped part run on some rows of this thread's call (``index``) runs
    inside ``select(index)``: whatever is bound to the call's rows by position (per-row LoRA scales,
    IP-Adapter image rows) re-bound to those rows."""
    stack: list[RowBinder] = getattr(_binders, "stack", [])
    _binders.stack = [*stack, select]
    try:
        yield
    finally:
        _binders.stack = stack


def _on_rows(skipped: Callable[[Tensor | None], Tensor], index: Tensor) -> Tensor:
    with ExitStack() as stack:
        for select in getattr(_binders, "stack", []):
            stack.enter_context(select(index))
        return skipped(index)


def _decide(ids: list[int], rows: Tensor, probe: Tensor) -> list[bool]:
    """Per row: True when its cache holds (reuse the skipped part), False when it must run it."""
    settings = rows[:, 1:5].tolist()
    reuse = [False] * len(ids)
    by_threshold: list[tuple[int, RowState, float]] = []
    seen: dict[int, int] = {}
    for i, row_id in enumerate(ids):
        if row_id == 0 or row_id in seen:
            continue
        seen[row_id] = i
        state = STORE.rows.get(row_id)
        if state is None or state.cached is None or state.probe_shape != tuple(probe.shape[1:]):
            continue  # first evaluation, or a new size (the hires pass): run it
        _, interval, threshold, start = settings[i]
        if state.evals < start:
            continue  # before the cache's start: full evaluations
        if interval > 0:
            reuse[i] = state.since_full + 1 < interval
        else:
            by_threshold.append((i, state, threshold))
    if by_threshold:  # one batched comparison: the relative mean absolute change of the probe
        index = torch.tensor([i for i, _, _ in by_threshold], device=probe.device)
        now = probe.index_select(0, index).flatten(1).float()
        ref = torch.stack([s.ref for _, s, _ in by_threshold]).flatten(1).float()  # type: ignore[misc]
        change = ((now - ref).abs().mean(1) / ref.abs().mean(1).clamp_min(1e-12)).tolist()
        for (i, _, threshold), c in zip(by_threshold, change, strict=True):
            reuse[i] = c < threshold
    for i, row_id in enumerate(ids):  # padding rows repeat an id: they follow its first row
        if row_id and seen[row_id] != i:
            reuse[i] = reuse[seen[row_id]]
    return reuse


def run_cached(
    rows: Tensor, probe: Tensor, skipped: Callable[[Tensor | None], Tensor], base: Tensor | None = None
) -> Tensor:
    """The skipped part's output for every row of a call: ``skipped(index)`` computes it for the rows
    ``index`` (None: all rows, in order) and is called at most once; rows whose cache holds get
    their cached output. ``probe`` [B, ...] is what threshold decisions compare. With ``base`` (the
    skipped part's input) the cache keeps the residual output - base and a cached row gets its base
    plus that residual (First-Block-Cache); rows that run get the skipped part's output as computed."""
    ids = [int(i) for i in rows[:, 0].tolist()]
    b = len(ids)
    with STORE.lock:
        reuse = _decide(ids, rows, probe)
        cached = {ids[i]: STORE.rows[ids[i]].cached for i in range(b) if reuse[i]}
    run = [i for i in range(b) if not reuse[i]]
    STORE.calls += 1
    STORE.all_held += not run
    if len(run) == b:
        out = skipped(None)
        STORE.ran += b
    else:
        hits = [i for i in range(b) if reuse[i]]
        kept = torch.stack([cached[ids[i]] for i in hits])  # type: ignore[misc]
        if base is not None:
            kept = base[hits] + kept
        out = kept.new_empty((b, *kept.shape[1:]))
        out[hits] = kept
        if run and STORE.fixed_shape:  # every row, in call order: the shape and bindings of the call
            out[run] = skipped(None)[run].to(out.dtype)
            STORE.ran += len(run)
            STORE.padded += b - len(run)
        elif run:
            index = torch.tensor(run, device=probe.device)
            out[run] = _on_rows(skipped, index).to(out.dtype)
            STORE.ran += len(run)
        STORE.reused += b - len(run)
    _remember(ids, reuse, rows, probe, out if base is None else out - base)
    return out


_NO_HEAD = (0, 0.0, 0.0)


def predicted_hit(cond: Mapping[str, Tensor] | None) -> bool:
    """Whether the rows of ``cond`` (one request's) will reuse their cache at their next evaluation,
    as far as is known before it: interval rows after a full evaluation, until their next full one.
    Threshold rows (decided by what the call computes) and rows without a cache: False. A request's
    rows are evaluated together, so its first row speaks for all. For the scheduler's grouping only:
    a wrong guess costs speed, never changes a result."""
    rows = None if cond is None else cond.get(KEY)
    if rows is None:
        return False
    head = getattr(rows, "_head", None)  # read once per tensor: the planner asks every job every iteration
    if head is None:
        row_id, _, interval, _, start = rows[0, :5].tolist() if rows.shape[0] else (0.0,) * 5
        head = (int(row_id), interval, start) if row_id and interval > 0 else _NO_HEAD
        rows._head = head  # type: ignore[attr-defined]
    if head is _NO_HEAD:
        return False
    row_id, interval, start = head
    state = STORE.rows.get(row_id)  # a dict read: no lock needed for a guess
    if state is None or state.cached is None or state.evals < start:
        return False
    return state.since_full + 1 < interval


def _remember(ids: list[int], reuse: list[bool], rows: Tensor, probe: Tensor, out: Tensor) -> None:
    intervals = rows[:, 2].tolist()  # interval 0: threshold mode, which compares with the probe
    with STORE.lock:
        done: set[int] = set()
        for i, row_id in enumerate(ids):
            if row_id == 0 or row_id in done:
                continue
            done.add(row_id)
            state = STORE.rows.get(row_id)
            if state is None:  # released (its job ended) while this call ran
                continue
            state.evals += 1
            if reuse[i]:
                state.since_full += 1
                continue
            state.since_full = 0
            state.cached = out[i].clone()
            state.ref = probe[i].clone() if intervals[i] == 0 else None
            state.probe_shape = tuple(probe.shape[1:])
