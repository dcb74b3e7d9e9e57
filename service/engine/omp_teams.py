"""OpenMP worker teams: only a running engine keeps one, so libgomp never throttles its workers.

torch's CPU kernels run on GNU OpenMP (libgomp). Every thread that runs a parallel region gets its
own team of worker threads, kept until that thread exits. When the process holds more such workers
than it has CPUs, libgomp switches every waiting worker to "throttled" waiting: a hundred spins (a
thousand with ``OMP_WAIT_POLICY=ACTIVE``), then a futex sleep, whatever ``GOMP_SPINCOUNT`` says. A
model call is hundreds of short parallel regions, so a throttled team spends its call waking
workers. The serving process loads and traces models in the event loop's default executor
(``asyncio.to_thread``) and runs them on the engine's own thread: the loader's idle team alone was
enough to throttle the engine's (measured on this 2-core box, the traced digits UNet at 32 rows on
an engine thread: ~2,800 worker sleeps/s and about 10 % fewer rows/s than with the loader's team
released; docs/BENCHMARKS.md "OpenMP teams").

So work off the engine thread gives its team back when it is done (:class:`TeamReleasingExecutor`,
the serving loop's default executor), and an engine gives its team back when it goes idle.
``omp_pause_resource_all`` (OpenMP 5.0) frees the calling thread's team only; the next parallel
region of that thread starts a new one (tens of microseconds).
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch  # noqa: F401 - loads the OpenMP runtime this module looks up

P = ParamSpec("P")
T = TypeVar("T")

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing the next region needs
# GNU OpenMP only: its pause frees the calling thread's team alone. LLVM's and Intel's runtimes pause
# every thread of the process (the engine's running team too), so with those nothing is released.
_RUNTIME = re.compile(r"/libgomp[-.\w]*\.so[.\d]*$")


@functools.cache
def _pause_all() -> Callable[[int], int] | None:
    """``omp_pause_resource_all`` of the GNU OpenMP runtime torch loaded (None: not that runtime)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: leave the runtime as it is
        return None
    paths = sorted({line.split()[-1] for line in maps.splitlines() if _RUNTIME.search(line)})
    for path in paths:
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):  # an older runtime without OpenMP 5.0's pause
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn  # type: ignore[no-any-return]
    return None


def release_team() -> bool:
    """Free the calling thread's OpenMP worker team (if it has one); False where that cannot be done
    (no OpenMP runtime with pause support, or called from inside a parallel region)."""
    fn = _pause_all()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0


def _released(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return fn(*args, **kwargs)
    finally:
        release_team()


class TeamReleasingExecutor(ThreadPoolExecutor):
    """A thread pool whose threads give their OpenMP team back after every work item: loading,
    tracing, encoding and decoding run here, model calls on the engine's thread."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(_released, fn, *args, **kwargs)
