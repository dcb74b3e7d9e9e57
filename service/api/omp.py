"""OpenMP's waiting threads in the serving process: spin briefly, even with several thread teams.

torch's CPU kernels run on GNU OpenMP (libgomp). Each thread that starts a parallel region gets its
own team of worker threads: the serving process has at least two (the start-up thread, which loads
and traces the model, and the engine thread, which runs it), so libgomp counts more threads than
cores and switches every waiting worker to "throttled" mode: a hundred spins, then a futex sleep.
A model call is hundreds of short parallel regions, and each then waits for a sleeping worker to be
woken: on this 2-core box the traced digits UNet called from a thread other than the
first ran at 467 rows/s at 8 rows and 1,271 at 32 with two threads (slower than one thread, 1,214
and 1,624), against 1,543 and 1,876 from the first thread (docs/BENCHMARKS.md "OpenMP teams").

``OMP_WAIT_POLICY=ACTIVE`` with a bounded ``GOMP_SPINCOUNT``: a worker spins up to 300,000 times
(libgomp's own default) before it sleeps, so the next region of a running call finds it awake, and a
team that stays idle still goes to sleep instead of taking a core from the event loop for good. In
throttled mode ACTIVE also raises libgomp's spin from 100 to 1,000 (its fixed throttled count, which
GOMP_SPINCOUNT only caps): better, but still a sleep between most regions, so the serving process
also frees every team but the running engine's (``service/engine/omp_teams.py``) and is then not
throttled at all.

libgomp reads these once, when torch loads it: :func:`set_wait_policy` must run before ``import
torch``. A value the user exported wins.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def wait_policy_env() -> dict[str, str]:
    """The two variables as this process should pass them on (the user's values where set)."""
    if any(k in os.environ for k in WAIT_POLICY):  # the user chose: pass their choice on unchanged
        return {k: os.environ[k] for k in WAIT_POLICY if k in os.environ}
    return dict(WAIT_POLICY)


def set_wait_policy() -> bool:
    """Set the defaults in this process's environment; False when the user set either variable or
    torch is already imported (libgomp has read its environment: too late to change it here)."""
    if "torch" in sys.modules or any(k in os.environ for k in WAIT_POLICY):
        return False
    os.environ.update(WAIT_POLICY)
    return True
