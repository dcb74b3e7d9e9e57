"""Evaluation metrics for digit models: class accuracy and Fréchet distance in a classifier's features.

The project trains its own small digits classifier (shipped in model_store/digits/); its
penultimate layer is the feature space for the Fréchet distance, like Inception features in FID.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.models.stepcache import KEY as CACHE_KEY
from service.models.stepcache import CacheSpec, cache_rows

if TYPE_CHECKING:
    from service.sampling.ksampler import KSampler

BATCH = 500  # images per sampling call in generate

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class DigitClassifier(nn.Module):
    """Small CNN for S x S greyscale digits; ``features`` is the 64-d penultimate layer."""

    def __init__(self, image_size: int = 16, in_channels: int = 1, num_classes: int = 10, feat_dim: int = 64):
        super().__init__()
        self.config = {
            "image_size": image_size,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "feat_dim": feat_dim,
        }
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, feat_dim),
        )
        self.head = nn.Sequential(nn.GELU(), nn.Linear(feat_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_classifier(
    images: Tensor, labels: Tensor, epochs: int = 30, seed: int = 0, batch_size: int = 64
) -> DigitClassifier:
    """Adam on the training digits with small random shifts (so it is robust to sample jitter)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[-1], images.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, epochs * ((len(images) + batch_size - 1) // batch_size)
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = perm[i : i + batch_size]
            shift = torch.randint(-1, 2, [2], generator=gen).tolist()
            x = torch.roll(images[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


def save_classifier(model: DigitClassifier, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / CLASSIFIER_WEIGHTS))
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")


def load_classifier(folder: str | Path) -> DigitClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CLASSIFIER_WEIGHTS).exists():
        raise FileNotFoundError(
            f"no {CLASSIFIER_WEIGHTS} in {folder}; train one with `kdiff eval --train-classifier`"
        )
    model = DigitClassifier(**json.loads((folder / CLASSIFIER_CONFIG).read_text()))
    model.load_state_dict(load_file(str(folder / CLASSIFIER_WEIGHTS)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _batched(fn: Any, x: Tensor, batch_size: int = 500) -> Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(classifier: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier assigns to ``labels``."""
    pred = _batched(classifier, images.float()).argmax(1)
    return float((pred == labels).float().mean())


def features(classifier: DigitClassifier, images: Tensor) -> np.ndarray:
    return _batched(classifier.features, images.float()).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature sets."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt eigenvalues of the symmetric PSD matrix R S_b R, R = S_a^(1/2).
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_covmean = np.sqrt(np.clip(mid, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


@dataclass
class EvalRow:
    sampler: str
    schedule: str
    nfe: int
    steps: int
    accuracy: float
    fd: float
    seconds: float
    cache: str = "none"
    cost: float | None = None  # full-network-equivalent evaluations per image (step caching)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps giving ``nfe`` evaluations: N for 1-eval samplers, (NFE+1)/2 for 2-eval ones (2N-1 NFE)."""
    from service.sampling.registry import get_sampler

    info = get_sampler(sampler)
    if sampler == "dpm_adaptive":
        raise ValueError("dpm_adaptive has no fixed NFE; evaluate it separately")
    if info.nfe_per_step == 1 or sampler == "dpm_fast":
        return nfe
    return (nfe + 1) // 2


def generate(
    ks: KSampler,
    labels: Tensor,
    shape: tuple[int, int, int],
    steps: int,
    cfg_scale: float = 1.0,
    seed: int = 0,
    cache: CacheSpec | None = None,
) -> Tensor:
    """Class-conditional samples from ``ks``, one per label, with per-image seeds seed, seed+1, ...
    (in batches of at most BATCH); ``cache``: every row with that step cache (models/stepcache)."""
    out = []
    for i in range(0, len(labels), BATCH):
        lab = labels[i : i + BATCH]
        seeds = list(range(seed + i, seed + i + len(lab)))
        cond: Any = lab
        uncond = None
        if cache is not None:  # the guidance rows get ids of their own
            cond = {"class_cond": lab, CACHE_KEY: cache_rows(cache, len(lab))}
            null = torch.full_like(lab, int(getattr(ks.model, "num_classes", 10)))
            uncond = {"class_cond": null, CACHE_KEY: cache_rows(cache, len(lab))} if cfg_scale != 1 else None
        out.append(
            ks.sample(
                shape=(len(lab), *shape),
                steps=steps,
                seed=seeds,
                condition=cond,
                uncond=uncond,
                cfg_scale=cfg_scale,
            )
        )
    return torch.cat(out)
