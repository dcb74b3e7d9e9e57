"""Train a LoRA for one of the project's UNet models (``kdiff train --lora-rank R --init FOLDER``).

The base UNet is frozen; every ``nn.Linear`` / ``nn.Conv2d`` gets a trainable low-rank update
``up(down(x)) * alpha / rank`` (down: the layer's kernel, Kaiming-uniform; up: 1x1, zeros, so
training starts at the base model), trained with the base model's own loss on the given images (e.g.
one class of digits). The result is a kohya-format ``.safetensors`` file (``lora_unet_<layer>``
keys with ``alpha``) that the service serves per request: put it in ``<model>/loras/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from service.training.datasets import ImageData
from service.training.densities import make_sigma_sampler


@dataclass
class LoraTrainConfig:
    init: Path
    out: Path
    rank: int = 4
    alpha: float | None = None  # default: the rank (scale 1)
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    max_minutes: float = 0.0


class LoraParams(nn.Module):
    """Trainable low-rank updates for every Linear / Conv2d of ``root``, added by forward hooks."""

    def __init__(self, root: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.names: list[str] = []
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self._handles = []
        for name, m in root.named_modules():
            if not isinstance(m, nn.Linear | nn.Conv2d):
                continue
            if isinstance(m, nn.Linear):
                down, up = torch.empty(rank, m.in_features), torch.zeros(m.out_features, rank)
            else:
                down = torch.empty(rank, m.in_channels, *m.kernel_size)
                up = torch.zeros(m.out_channels, rank, 1, 1)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            p = next(m.parameters())
            self.down.append(nn.Parameter(down.to(p.device)))
            self.up.append(nn.Parameter(up.to(p.device)))
            self._handles.append(m.register_forward_hook(self._hook(len(self.names))))
            self.names.append(name)

    def _hook(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x, down, up = args[0], self.down[i], self.up[i]
            scale = self.alpha / self.rank
            if isinstance(module, nn.Linear):
                return out + F.linear(F.linear(x, down), up) * scale
            assert isinstance(module, nn.Conv2d)
            h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
            return out + F.conv2d(h, up) * scale

        return hook

    def state(self) -> dict[str, Tensor]:
        """kohya / A1111 keys: ``lora_unet_<layer path with underscores>.lora_down/lora_up/alpha``."""
        out = {}
        for name, down, up in zip(self.names, self.down, self.up, strict=True):
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = up.detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(self.alpha))
        return out


def train_lora(cfg: LoraTrainConfig, data: ImageData, log=print) -> tuple[Path, list[float]]:  # type: ignore[no-untyped-def]
    from service.models.unet import load_denoiser

    device = torch.device(cfg.device)
    denoiser, mc = load_denoiser(cfg.init, device)
    inner = denoiser.inner_model
    assert isinstance(inner, nn.Module)
    inner.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    lora = LoraParams(inner, cfg.rank, float(cfg.alpha or cfg.rank))
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=0.0)
    sigmas = make_sigma_sampler("log-normal")
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = time.monotonic()
    denoiser.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data), [cfg.batch_size], generator=gen)
        x = data.images[idx].to(device)
        cond = {"class_cond": data.labels[idx].to(device)} if mc.num_classes else {}
        noise = torch.randn(x.shape, generator=gen).to(device)
        sigma = sigmas(x.shape[0], gen).to(device)
        loss = denoiser.loss(x, noise, sigma, **cond).mean()  # type: ignore[operator]
        if not math.isfinite(loss.item()):
            raise ValueError(f"LoRA training: loss is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            tail = losses[-max(1, cfg.steps // 10) :]
            log(f"step {step + 1}/{cfg.steps}: loss {sum(tail) / len(tail):.4f}")
        if cfg.max_minutes and time.monotonic() - start > cfg.max_minutes * 60:
            log(f"time limit reached at step {step + 1}")
            break
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha or cfg.rank),
            "kdiff_base_model": cfg.init.name}  # fmt: skip
    save_file(lora.state(), str(cfg.out), metadata=meta)
    return cfg.out, losses
