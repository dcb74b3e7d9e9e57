"""VAE decode in tiles above a size (manifest ``vae_tile_px``; 1024 by default on CUDA, off on CPU):
past the size our decode is diffusers' own tiled decoder with that tile size, below it (and with 0)
the plain decode, and bad values are refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.sd_loader import SDLoadError  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from tests.support.sd_tiny import save_diffusers, write_manifest  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vae-tiles")
    save_diffusers(root / "sd1")
    write_manifest(root / "sd1", max_size=256)
    return root


def _load(store: Path, **fields: object) -> object:
    path = store / "sd1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("vae_tile_px", None)
    path.write_text(json.dumps({**manifest, **fields}))
    return ModelStore(store).load("sd1").text_model  # type: ignore[attr-defined]


def test_large_images_decode_in_tiles_as_diffusers_tiles_them(store: Path) -> None:
    m: object = _load(store, vae_tile_px=64)
    assert m.vae_tile_px == 64  # type: ignore[attr-defined]
    torch.manual_seed(0)
    big, small = torch.randn(1, 4, 24, 24), torch.randn(1, 4, 8, 8)  # 192 px and 64 px images
    vae = m.vae  # type: ignore[attr-defined]
    sf = m.scaling_factor  # type: ignore[attr-defined]
    with torch.inference_mode():
        plain = vae.decode(big / sf).sample.clamp(-1, 1)
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
        tiled = vae.decode(big / sf).sample.clamp(-1, 1)
        vae.disable_tiling()
        ours = m.decode(big)  # type: ignore[attr-defined]
        assert torch.equal(ours, tiled)
        assert (tiled - plain).abs().max() > 1e-3  # the tiles really differ from one piece
        assert torch.equal(m.decode(small), vae.decode(small / sf).sample.clamp(-1, 1))  # type: ignore[attr-defined]
        # decoding tiled left the VAE's own mode alone (encodes are never tiled by it)
        assert vae.use_tiling is False


def test_off_on_cpu_by_default_and_bad_values_refused(store: Path) -> None:
    assert _load(store).vae_tile_px == 0  # type: ignore[attr-defined]
    for bad in (-1, 1.5, "big", True):
        with pytest.raises(SDLoadError, match="vae_tile_px"):
            _load(store, vae_tile_px=bad)
