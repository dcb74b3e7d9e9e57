from __future__ import annotations

import torch

from service.training.augmentation import karras_augment, random_hflip, random_masks


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_karras_augment_off_is_identity() -> None:
    x = torch.randn(4, 1, 8, 8)
    out, cond = karras_augment(x, gen(), p=0.0)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    assert cond.shape == (4, 9) and torch.count_nonzero(cond) == 0


def test_karras_augment_on_changes_images_and_reports_it() -> None:
    x = torch.randn(16, 3, 8, 8)
    out, cond = karras_augment(x, gen(), p=1.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    changed = (out - x).flatten(1).abs().amax(1) > 1e-3
    assert changed.all() and (cond.abs().sum(1) > 0).all()


def test_pure_flip_matches_cond() -> None:
    # With every transform on, a batch image whose cond says "flip only" cannot be isolated, so
    # check the flip bit statistically: about half the images are flipped.
    _, cond = karras_augment(torch.randn(2000, 1, 4, 4), gen(1), p=1.0)
    assert 0.4 < cond[:, 0].mean().item() < 0.6


def test_hflip() -> None:
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(random_hflip(x, gen(), p=1.0), x.flip(-1))
    torch.testing.assert_close(random_hflip(x, gen(), p=0.0), x)


def test_random_masks_are_single_rectangles() -> None:
    m = random_masks(20, 16, gen(), min_frac=0.25, max_frac=0.5)
    assert m.shape == (20, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    for mask in m[:, 0]:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        h, w = len(rows), len(cols)
        assert 4 <= h <= 8 and 4 <= w <= 8 and mask.sum() == h * w  # filled box, size in range
