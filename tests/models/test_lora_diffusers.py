"""Per-row LoRA against diffusers' load_lora_weights + fuse_lora on a tiny Stable Diffusion model:
kohya and diffusers/PEFT files, UNet and text encoder (<= 1e-4, fp32); a batch mixing rows with no
LoRA, A, B and A+B equals each row run alone (<= 1e-5)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (dev extra)")

from diffusers import StableDiffusionPipeline  # noqa: E402

from service.models.lora import LoraError, LoraIndex, attach  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from tests.support.lora_files import kohya_state, peft_state, random_layers, save  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402

WEIGHT = 0.8


@pytest.fixture(scope="module")
def sd1() -> Any:
    return ModelStore(tiny_sd_store()).load("sd1")


def _parts(model: Any, seed: int, rank: int = 4) -> dict[str, Any]:
    sd = model.sd
    return {
        "unet": random_layers(sd.unet, rank, seed),
        "text_encoder": random_layers(sd.components.text_encoders[0], rank, seed + 1),
    }


def _inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0, 1.0])
    ctx = torch.randn(4, 77, 32, generator=g)
    ids = torch.randint(0, 300, (4, 77), generator=g)
    return x, t, ctx, ids


def _reference(model: Any, state: dict[str, torch.Tensor], weight: float) -> tuple[Any, Any]:
    """diffusers' own LoRA loading, fused into copies of the UNet and text encoder."""
    c = model.sd.components
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=copy.deepcopy(c.text_encoders[0]),
        tokenizer=c.tokenizers[0],
        unet=copy.deepcopy(c.unet),
        scheduler=model.sd.components.scheduler if hasattr(c, "scheduler") else _scheduler(c),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(dict(state), adapter_name="x")
    pipe.fuse_lora(lora_scale=weight, components=["unet", "text_encoder"])
    return pipe.unet, pipe.text_encoder


def _scheduler(c: Any) -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(c.scheduler_config)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_matches_diffusers_fused_lora(sd1: Any, fmt: str, tmp_path: Path) -> None:
    parts = _parts(sd1, seed=1)
    state = kohya_state(parts, alpha=2.0) if fmt == "kohya" else peft_state(parts)
    save(state, tmp_path / "loras" / "a.safetensors")
    adapters = attach(sd1, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        resolved = adapters.resolve([("a", WEIGHT)])
        x, t, ctx, ids = _inputs(sd1)
        unet, te = sd1.sd.unet, sd1.sd.components.text_encoders[0]
        ref_unet, ref_te = _reference(sd1, state, WEIGHT)
        with torch.inference_mode():
            with adapters.call(adapters.encode(resolved, 4)):
                ours = unet(x, t, encoder_hidden_states=ctx).sample
            with adapters.text(resolved):
                ours_text = te(ids)[0]
            base = unet(x, t, encoder_hidden_states=ctx).sample
            want = ref_unet(x, t, encoder_hidden_states=ctx).sample
            want_text = ref_te(ids)[0]
        assert (want - base).abs().max() > 1e-2, (
            "the LoRA must change the output for the test to mean anything"
        )
        assert (ours - want).abs().max() <= 1e-4
        assert (ours_text - want_text).abs().max() <= 1e-4
        assert (te(ids)[0] - want_text).abs().max() > 1e-3  # outside the block: the base encoder again
    finally:
        adapters.close()


def test_mixed_batch_equals_each_row_alone(sd1: Any, tmp_path: Path) -> None:
    save(kohya_state(_parts(sd1, seed=3), alpha=4.0), tmp_path / "loras" / "a.safetensors")
    save(peft_state(_parts(sd1, seed=5)), tmp_path / "loras" / "b.safetensors")
    adapters = attach(sd1, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        a, b = adapters.resolve([("a", 0.7)]), adapters.resolve([("b", 1.2)])
        rows_of = [[], a, b, a + b]
        rows = torch.cat([adapters.encode(r, 1) for r in rows_of])
        x, t, ctx, _ = _inputs(sd1)
        unet = sd1.sd.unet
        with torch.inference_mode():
            with adapters.call(rows):
                mixed = unet(x, t, encoder_hidden_states=ctx).sample
            alone = []
            for i, r in enumerate(rows_of):
                with adapters.call(adapters.encode(r, 1)):
                    alone.append(
                        unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=ctx[i : i + 1]).sample
                    )
        solo = torch.cat(alone)
        assert (mixed - solo).abs().max() <= 1e-5
        assert all((solo[i] - solo[0]).abs().max() > 1e-3 for i in (1, 2, 3))  # the rows do differ
    finally:
        adapters.close()


def test_a_lora_for_another_base_model_is_refused_naming_it(sd1: Any, tmp_path: Path) -> None:
    layers = random_layers(sd1.sd.unet, 4, 0)
    name = next(n for n, (d, _) in layers.items() if d.dim() == 2)
    down, up = layers[name]
    layers[name] = (torch.randn(4, down.shape[1] + 8), up)
    save(kohya_state({"unet": layers}, None), tmp_path / "loras" / "other.safetensors")
    save({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loras" / "loha.safetensors")
    adapters = attach(sd1, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        with pytest.raises(LoraError, match="'other'.*another base model"):
            adapters.resolve([("other", 1.0)])
        with pytest.raises(LoraError, match="LyCORIS"):
            adapters.resolve([("loha", 1.0)])
        with pytest.raises(LoraError, match="unknown LoRA 'nope'"):
            adapters.resolve([("nope", 1.0)])
    finally:
        adapters.close()
