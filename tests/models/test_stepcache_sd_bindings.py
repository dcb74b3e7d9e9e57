"""What is bound to a call's rows by position (IP-Adapter image tokens) follows them into nested
split points: without batch-invariant shapes a deep part runs on some rows only, and rows of a deeper
level decide inside it, so their rows are picked from the enclosing part's rows, not the call's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.stepcache import STORE, CacheSpec, cache_rows  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.serving.request import GenerationRequest, IPAdapterRef  # noqa: E402
from tests.models.test_ipadapter import png  # noqa: E402
from tests.support.deepcache_oracle import assert_rows_as_alone, random_step, restore_fixed_shape  # noqa: E402
from tests.support.ipadapter_tiny import ip_store  # noqa: E402

fixed_shape = pytest.fixture(autouse=True)(restore_fixed_shape)


@pytest.fixture(scope="module")
def sd() -> Iterator[Any]:
    root, _ = ip_store()
    yield ModelStore(root).load("sd1").text_model  # type: ignore[attr-defined]


def _cond(sd: Any, refs: list[IPAdapterRef]) -> dict[str, torch.Tensor]:
    fields = GenerationRequest(ip_adapters=refs)
    job = sd.job_inputs("a red cat", "", n=1, cfg_scale=1.0, width=64, height=64, fields=fields)
    return {k: v for k, v in job.cond.items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def test_adapter_rows_in_a_nested_split_are_their_own(sd: Any) -> None:
    """Rows: level 0 interval 2 (no adapter); level 1 interval 3 with an adapter image; no cache with
    another. At the fourth evaluation row 0 holds its cache, so the level-0 deep part runs on rows 1
    and 2 only, and inside it row 1 (level 1) runs its own: its image tokens must be row 1's, found
    at place 0 of that part. Every row equals a call of four copies of it alone."""
    STORE.fixed_shape = False
    net = sd.denoiser.inner_model
    ip = "ip-adapter_sd15"
    conds = [_cond(sd, []), _cond(sd, [IPAdapterRef(ip, png(5), 0.9)]), _cond(sd, [IPAdapterRef(ip, png(6))])]
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    specs = [CacheSpec("deepcache", interval=2, level=0), CacheSpec("deepcache", interval=3, level=1), None]
    own = [cache_rows(s, 1) for s in specs]
    held = torch.cat(own)
    steps = [random_step(30 + i, 8, 8) for i in range(4)]
    STORE.reset_counts()
    mixed = [net(x, t, **cond, cache=held) for x, t in steps]
    assert STORE.reused == 4  # row 0 at evaluations 2 and 4, row 1 at 2 and 3
    assert_rows_as_alone(net, specs, cond, steps, mixed)
