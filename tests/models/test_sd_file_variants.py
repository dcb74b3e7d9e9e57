"""SD / SDXL single-file checkpoints stored as ComfyUI's scaled fp8 (``scaled_fp8`` marker, a
``<layer>.scale_weight`` per layer: the weight is the stored fp8 value times its scale). diffusers'
``from_single_file`` ignores the scales and loads the fp8 values as weights; ours multiplies them out,
so the model equals diffusers' loader on the same checkpoint written with the real weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.store import ModelStore  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402

UNET = "model.diffusion_model."


def _copy(root: Path, name: str, state: dict[str, Tensor]) -> None:
    shutil.copytree(tiny_sd_store() / "sdxlfile", root / name)
    manifest = json.loads((root / name / "manifest.json").read_text())
    manifest.pop("name", None)
    (root / name / "manifest.json").write_text(json.dumps(manifest))
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / name / "model.safetensors"))


def test_sdxl_scaled_fp8_checkpoint_is_its_real_weights(tmp_path: Path) -> None:
    orig = load_file(str(tiny_sd_store() / "sdxlfile" / "model.safetensors"))
    scaled: dict[str, Tensor] = {UNET + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    real: dict[str, Tensor] = {}
    for i, (k, v) in enumerate(orig.items()):
        if k.startswith(UNET) and k.endswith(".weight") and v.dim() >= 2:
            s = torch.tensor(0.5 + i % 3, dtype=torch.float32)
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k.removesuffix(".weight") + ".scale_weight"] = s
            real[k] = (scaled[k].float() * s).to(torch.bfloat16).float()
        else:
            scaled[k] = real[k] = v
    _copy(tmp_path, "scaled", scaled)
    _copy(tmp_path, "real", real)
    store = ModelStore(tmp_path)
    ma, mb = store.load("scaled"), store.load("real")
    a, b = ma.text_model, mb.text_model  # type: ignore[attr-defined]
    want = b.unet.state_dict()
    assert max((t.float() - want[k]).abs().max().item() for k, t in a.unet.state_dict().items()) < 1e-6
    ia = a.job_inputs("a red cat", None, n=1, cfg_scale=1.0).cond
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(
            ma.denoiser(x, torch.tensor([2.0]), **ia), mb.denoiser(x, torch.tensor([2.0]), **ia)
        )
