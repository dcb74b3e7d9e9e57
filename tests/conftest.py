"""The whole run's torch settings (tests/training/conftest.py and every in-process app already ran at
one thread; this makes the rest of the pytest process do the same)."""

from __future__ import annotations

import torch

# One intra-op thread in the pytest process. The tests' tensors are tiny, and on the 2-core machine
# the second OpenMP thread spins against live server subprocesses and other sessions: test_tuning's
# reference sweep (1,024 draws) took 1.3 s of CPU / 21 s wall at 1 thread and 41 s CPU / 428 s wall at
# 2 on the loaded machine; the two tuned-schedule tests need ~10 s of CPU at 1 thread against 15.8 s
# of wall at 2 threads on the idle one (docs/TESTING.md). Servers started by the tests set their own
# (KDIFF_TORCH_THREADS).
torch.set_num_threads(1)
