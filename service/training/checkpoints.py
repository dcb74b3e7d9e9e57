"""Trainer checkpoints: tensors in safetensors, everything else in JSON; plus the exported model folder.

Layout of the output folder (also a valid model_store folder):
  state.safetensors / state.json   resumable training state (weights, EMA, AdamW moments, step, losses)
  model.safetensors                EMA weights (what sampling uses)
  config.json / manifest.json      UNetConfig and the model-store manifest
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # type only: trainer imports this module
    from service.training.trainer import Trainer


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written file


def _opt_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {
        f"opt.{idx}.{key}": value.detach().contiguous()
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    return tensors, {
        "param_groups": sd["param_groups"],
        "state_keys": {str(i): list(s) for i, s in sd["state"].items()},
    }


def save(trainer: Trainer) -> None:
    out = trainer.out
    out.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _opt_tensors(trainer.opt)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in trainer.inner.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in trainer.ema.state_dict().items()})
    tensors.update(opt_tensors)
    save_file(tensors, str(out / "state.safetensors.tmp"))
    (out / "state.safetensors.tmp").replace(out / "state.safetensors")
    write_json(
        out / "state.json",
        {
            "step": trainer.step,
            "train_seconds": trainer.train_seconds,  # exact: resumed runs add to it
            "losses": trainer.losses,
            "optimizer": opt_meta,
            **trainer.config_dict(),
        },
    )
    ema = {k: v.detach().float().contiguous() for k, v in trainer.ema.state_dict().items()}
    save_file(ema, str(out / "model.safetensors"))
    write_json(out / "config.json", trainer.mc.to_dict())
    write_json(
        out / "manifest.json",
        {
            "name": out.name,
            "kind": "unet",
            "weights": "model.safetensors",
            "config": "config.json",
            "description": f"UNet trained by `kdiff train` on {trainer.tc.dataset} for {trainer.step} steps",
            "defaults": {"sampler": "dpmpp_2m", "schedule": "karras", "steps": 20, "cfg_scale": 1.0},
        },
    )


def load(trainer: Trainer) -> None:
    """Restore a trainer from its output folder; the configs must match the saved run."""
    import json

    out = trainer.out
    if not (out / "state.json").exists():
        raise FileNotFoundError(f"no checkpoint to resume in {out} (state.json missing)")
    meta = json.loads((out / "state.json").read_text())
    if meta["model"] != trainer.mc.to_dict():
        raise ValueError(f"model config differs from the checkpoint's in {out}; resume with the same config")
    tensors = load_file(str(out / "state.safetensors"))
    trainer.inner.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    trainer.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_meta = meta["optimizer"]
    state = {
        int(i): {key: tensors[f"opt.{i}.{key}"] for key in keys} for i, keys in opt_meta["state_keys"].items()
    }
    groups = opt_meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    trainer.opt.load_state_dict({"state": state, "param_groups": groups})
    trainer.step = int(meta["step"])
    trainer.losses = [float(v) for v in meta["losses"]]
    trainer.train_seconds = float(meta.get("train_seconds", 0.0))
