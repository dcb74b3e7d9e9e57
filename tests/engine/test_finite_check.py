"""One finiteness check per batched model call (issue 28 §1), with the per-row check as the fallback:
the same jobs fail, with the same message, as when every row was checked on its own."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import service.sampling.driver as driver_module
from service.engine import JobStatus
from service.sampling.driver import finite_bound
from tests.support.engine_fakes import FakeDenoiser, request, run_jobs

HUGE_LABEL = 7  # rows of this class come back finite but huge: +1e36 (cond), -1e36 (uncond rows)


class HugeDenoiser(FakeDenoiser):
    """FakeDenoiser, except class-7 rows answer +1e36 and unconditional rows of a batch holding one
    answer -1e36: finite model output whose CFG combine (scale 1000) overflows float32."""

    def __call__(self, x: Tensor, sigma: Tensor, class_cond: Tensor | None = None) -> Tensor:
        out = super().__call__(x, sigma, class_cond)
        assert class_cond is not None
        huge = (class_cond == HUGE_LABEL).view(-1, 1, 1, 1)
        out = torch.where(huge, torch.full_like(out, 1e36), out)
        if huge.any():  # the uncond rows of the huge job (the other job is unguided: no class-10 rows)
            out = torch.where((class_cond == 10).view(-1, 1, 1, 1), torch.full_like(out, -1e36), out)
        return out


def test_finite_bound_sees_nan_and_inf_anywhere() -> None:
    assert finite_bound(torch.tensor([1.0, -3.0, 2.0])) == 3.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in range(3):
            t = torch.tensor([1.0, -3.0, 2.0])
            t[at] = bad
            assert finite_bound(t) is None, (bad, at)


def test_a_guided_combine_that_overflows_is_still_caught() -> None:
    """The raw batched output is finite (so the batched check passes), but uncond + 1000 (cond - uncond)
    is inf: that job fails non_finite, the job sharing its calls does not."""

    huge, ok = run_jobs(HugeDenoiser(), request("euler", 4, label=HUGE_LABEL, cfg=1000.0), request())
    assert ok.status == JobStatus.succeeded
    assert huge.status == JobStatus.failed and huge.error is not None
    assert huge.error.code == "non_finite" and "step 0" in huge.error.message


def test_a_finite_batch_is_checked_once_not_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guided and unguided rows of a finite batch skip the per-row check (one reduction, one sync per
    call instead of one per row)."""
    per_row: list[int] = []
    real = driver_module.check_finite
    monkeypatch.setattr(driver_module, "check_finite", lambda out, ev: (per_row.append(1), real(out, ev)))

    jobs = run_jobs(FakeDenoiser(), request("euler", 4, cfg=3.0), request("dpmpp_2m", 4))
    assert all(j.status == JobStatus.succeeded for j in jobs)
    assert per_row == []
