"""The training loop: Karras-preconditioned denoiser loss, AdamW + warmup, EMA, checkpoints.

Every random draw of step ``k`` (batch indices, sigmas, noise, label dropout, augmentation,
dropout layers) comes from generators seeded by ``(seed, k)``. A checkpoint therefore only
needs the weights, EMA, optimizer state and step: resuming replays the same loss sequence.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.models.unet import UNet, UNetConfig
from service.sampling.denoisers import KarrasDenoiser
from service.training import checkpoints
from service.training.augmentation import karras_augment, random_hflip
from service.training.checkpoints import write_json  # noqa: F401  (was defined here)
from service.training.datasets import DatasetError, ImageData
from service.training.densities import make_sigma_sampler

PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENTS = ("none", "hflip", "karras")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad settings); the message says why."""


@dataclass
class TrainConfig:
    out: str = "runs/digits"
    dataset: str = "digits"
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_power: float = 2 / 3
    ema_max: float = 0.9999
    sigma_density: str = "log-normal"
    density_options: dict[str, float] = field(default_factory=dict)
    weighting: str = "karras"
    cond_dropout: float = 0.1
    augment: str = "none"
    aug_prob: float = 0.12
    precision: str = "fp32"
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 1000
    sample_every: int = 0  # 0 = only at the end
    max_minutes: float = 0.0  # 0 = no wall-clock limit; otherwise stop (and save) when reached

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, not {self.augment!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("fp16 needs CUDA (it uses a grad scaler); use bf16 on CPU")


def ema_decay(step: int, power: float, max_decay: float) -> float:
    """EMA warmup: decay = 1 - (1 + step)^-power, capped; early weights are forgotten quickly."""
    return min(max_decay, 1 - (1 + step) ** -power) if step > 0 else 0.0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


class Trainer:
    def __init__(
        self,
        model_config: UNetConfig,
        train_config: TrainConfig,
        data: ImageData,
        log: Callable[[str], None] = print,
    ) -> None:
        self.mc, self.tc, self.data, self.log = model_config, train_config, data, log
        if len(data) == 0:
            raise DatasetError("the dataset is empty")
        if data.images.shape[1:] != (
            model_config.in_channels,
            model_config.image_size,
            model_config.image_size,
        ):
            raise DatasetError(
                f"dataset images have shape {tuple(data.images.shape[1:])}, the model expects "
                f"({model_config.in_channels}, {model_config.image_size}, {model_config.image_size})"
            )
        if model_config.num_classes and data.num_classes != model_config.num_classes:
            raise DatasetError(
                f"model has num_classes={model_config.num_classes} but the dataset has {data.num_classes}"
            )
        if train_config.augment == "karras" and not model_config.has_aug_cond:
            raise ValueError("augment=karras needs a model with has_aug_cond=true")
        self.device = torch.device(train_config.device)
        torch.manual_seed(train_config.seed)  # weight init
        self.inner = UNet(model_config).to(self.device)
        self.model = KarrasDenoiser(self.inner, model_config.sigma_data, weighting=train_config.weighting)
        self.ema = copy.deepcopy(self.inner).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.inner.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
        )
        self.sigmas = make_sigma_sampler(train_config.sigma_density, **train_config.density_options)
        self.scaler = torch.amp.GradScaler("cuda") if train_config.precision == "fp16" else None
        self.step = 0
        self.losses: list[float] = []
        self.train_seconds = 0.0  # wall time spent in train(), summed over resumes
        self.out = Path(train_config.out)

    # -- one optimisation step ---------------------------------------------------------------
    def _micro_batch(self, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        tc, data = self.tc, self.data
        idx = torch.randint(0, len(data), [tc.batch_size], generator=gen)
        x = data.images[idx]
        cond: dict[str, Tensor] = {}
        if tc.augment == "hflip":
            x = random_hflip(x, gen)
        elif tc.augment == "karras":
            x, cond["aug_cond"] = karras_augment(x, gen, tc.aug_prob)
        if self.mc.num_classes:
            labels = data.labels[idx].clone()
            drop = torch.rand([tc.batch_size], generator=gen) < tc.cond_dropout
            labels[drop] = self.mc.num_classes  # null class: teaches the unconditional model for CFG
            cond["class_cond"] = labels
        return x.to(self.device), {k: v.to(self.device) for k, v in cond.items()}

    def lr_at(self, step: int) -> float:
        return self.tc.lr * min(1.0, (step + 1) / max(1, self.tc.warmup_steps))

    def train_step(self) -> float:
        tc = self.tc
        gen = step_generator(tc.seed, self.step)
        torch.manual_seed(gen.initial_seed() + 1)  # dropout layers use the global RNG
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.inner.train()
        total = 0.0
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        for _ in range(tc.grad_accum):
            x, cond = self._micro_batch(gen)
            noise = torch.randn(x.shape, generator=gen).to(self.device)
            sigma = self.sigmas(x.shape[0], gen).to(self.device)
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = self.model.loss(x, noise, sigma, **cond).mean() / tc.grad_accum
            if not math.isfinite(loss.item()):
                raise TrainingError(f"loss is not finite ({loss.item()}) at step {self.step}; stopping")
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.inner.parameters(), tc.grad_clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        ema_update(self.ema, self.inner, ema_decay(self.step, tc.ema_power, tc.ema_max))
        self.losses.append(total)
        return total

    # -- the loop ----------------------------------------------------------------------------
    def train(self, progress: bool = True) -> list[float]:
        """Run until ``steps``; saves checkpoints, sample grids, and on Ctrl-C or time limit."""
        from tqdm import tqdm

        tc = self.tc
        start, seconds_before = time.monotonic(), self.train_seconds
        bar = tqdm(total=tc.steps, initial=self.step, disable=not progress, dynamic_ncols=True, mininterval=2)
        try:
            while self.step < tc.steps:
                loss = self.train_step()
                self.train_seconds = seconds_before + time.monotonic() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.save_samples()
                if tc.max_minutes and time.monotonic() - start > tc.max_minutes * 60:
                    self.log(f"time limit of {tc.max_minutes} min reached at step {self.step}")
                    break
        except KeyboardInterrupt:
            bar.close()
            self.save()
            self.log(f"interrupted at step {self.step}: checkpoint written to {self.out}")
            raise
        bar.close()
        self.save()
        self.save_samples()
        return self.losses

    # -- persistence -------------------------------------------------------------------------
    def save(self) -> None:
        checkpoints.save(self)

    def resume(self) -> None:
        checkpoints.load(self)

    def save_samples(self, steps: int = 20) -> Path | None:
        from service.training.grids import sample_grid

        path = self.out / "samples" / f"step_{self.step:06d}.png"
        return sample_grid(self.ema, self.mc, path, steps=steps, seed=self.tc.seed)

    def config_dict(self) -> dict[str, Any]:
        return {"train": dataclasses.asdict(self.tc), "model": self.mc.to_dict()}
