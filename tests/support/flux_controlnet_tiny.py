"""A tiny random Flux-dev model and tiny random Flux ControlNets saved in the diffusers layout.

The Flux model has 3 double and 2 single blocks (so ControlNets with fewer blocks exercise the
interval rule) and a 4-level VAE (8 px per latent, Flux's): 64 x 64 images are 8 x 8 latents, 16
packed tokens. Its VAE's posterior has a negligible spread (log-variance -30) so diffusers'
FluxControlNetPipeline, which encodes the control image with a posterior *sample*, gets the mean we
encode. The ControlNets (``model_store/controlnet/<name>/config.json`` with ``_class_name:
FluxControlNetModel`` + ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes them):

- ``fcn_a``: InstantX-style, 2 double + 1 single blocks, guidance embedding (FLUX.1-dev ones have it);
- ``fcn_b``: 1 double block, no single blocks, no guidance embedding;
- ``fcn_union``: a union model (``num_mode``: 10, as InstantX's union config);
- ``fcn_xlabs``: XLabs-style (``conditioning_embedding_channels``: its own image embedding,
  residuals repeated over the double blocks).

diffusers zero-initialises the output layers; these get random values so every residual matters.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from tests.support.flow_tiny import T5_LEN, make_flow_components, tiny_flux_config
from tests.support.flow_tiny import _vae as flow_vae
from tests.support.sd_tiny import write_tokenizer

SIZE = 64
NETS = ("fcn_a", "fcn_b", "fcn_union", "fcn_xlabs")


def _vae() -> Any:
    """flow_tiny's VAE with two more levels (8 px per latent)."""
    from diffusers import AutoencoderKL

    cfg = dict(flow_vae(5).config)
    cfg.update(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=SIZE,
    )
    torch.manual_seed(5)
    vae = AutoencoderKL.from_config(cfg).eval()
    with torch.no_grad():  # the posterior's log-variance: -30 everywhere (a sample is the mean)
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-30.0)
    return vae


def flux_transformer_config() -> dict[str, Any]:
    return {**tiny_flux_config(True), "num_layers": 3, "num_single_layers": 2}


def save_flux(folder: Path) -> Path:
    """Flux-dev (guidance embedding) in the diffusers layout, with a manifest (64 px, euler, flow)."""
    from diffusers import FluxTransformer2DModel

    vocab = write_tokenizer(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer_2")
    comps = make_flow_components("flux", vocab, guidance=True)
    torch.manual_seed(1)
    tr = FluxTransformer2DModel(**flux_transformer_config())
    with torch.no_grad():
        tr.proj_out.weight.normal_(0, 0.02)
        tr.proj_out.bias.zero_()
    comps.update(transformer=tr.eval(), vae=_vae())
    index: dict[str, Any] = {"_class_name": "FluxPipeline"}
    for name, part in comps.items():
        part.save_pretrained(str(folder / name))
        index[name] = [
            "transformers" if name.startswith("text_encoder") else "diffusers",
            type(part).__name__,
        ]
    index.update(tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "CLIPTokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index))
    manifest = {
        "name": folder.name,
        "kind": "flux",
        "description": "tiny random Flux-dev with ControlNets",
        "defaults": {"sampler": "euler", "schedule": "flow", "steps": 4, "width": SIZE, "height": SIZE},
        "max_size": 128,
        "max_sequence_length": T5_LEN,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_flux_controlnet(name: str) -> Any:
    """The diffusers FluxControlNetModel ``name`` (see the module docstring), random outputs."""
    from diffusers import FluxControlNetModel

    base = tiny_flux_config(True)
    over: dict[str, Any] = {
        "fcn_a": {"num_layers": 2, "num_single_layers": 1},
        "fcn_b": {"num_layers": 1, "num_single_layers": 0, "guidance_embeds": False},
        "fcn_union": {"num_layers": 1, "num_single_layers": 1, "num_mode": 10},
        "fcn_xlabs": {
            "num_layers": 2,
            "num_single_layers": 0,
            "conditioning_embedding_channels": 4,
            "patch_size": 2,
        },
    }[name]
    torch.manual_seed(NETS.index(name) + 20)
    net = FluxControlNetModel(**{**base, **over}).eval()
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.copy_(torch.randn_like(p) * 0.3)
    return net


def to_xlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An XLabs-style network's diffusers tensors in XLabs' original layout (x-flux's ControlNetFlux:
    BFL names for the trunk, ``pos_embed_input``, ``input_hint_block.{0,2,...,14}``)."""
    from service.models.controlnet.flux_single import HINT_CONVS
    from tests.support.flow_single_file import flux_to_original

    sd = dict(sd)
    out = {k: sd.pop(k) for k in list(sd) if k.startswith("controlnet_blocks.")}
    for wb in ("weight", "bias"):
        out[f"pos_embed_input.{wb}"] = sd.pop(f"controlnet_x_embedder.{wb}")
        for i, name in enumerate(HINT_CONVS):
            out[f"input_hint_block.{2 * i}.{wb}"] = sd.pop(f"input_hint_block.{name}.{wb}")
    dim = sd["x_embedder.weight"].shape[0]  # the trunk map writes a final layer: ControlNets have none
    sd |= {"proj_out.weight": torch.zeros(1, dim), "proj_out.bias": torch.zeros(1)}
    sd |= {"norm_out.linear.weight": torch.zeros(2, dim), "norm_out.linear.bias": torch.zeros(2)}
    trunk = {k: v for k, v in flux_to_original(sd).items() if not k.startswith("final_layer.")}
    return {**out, **trunk}


def add_flux_controlnets(store: Path) -> dict[str, Any]:
    """The Flux ControlNets in ``store/controlnet/`` (diffusers folders; ``fcn_union`` also as a
    diffusers-named single file ``fcn_union_file.safetensors``, ``fcn_xlabs`` in XLabs' original
    layout ``fcn_xlabs_file.safetensors``); returns the diffusers networks (the oracles)."""
    from safetensors.torch import save_file

    nets = {name: make_flux_controlnet(name) for name in NETS}
    for name, net in nets.items():
        net.save_pretrained(str(store / "controlnet" / name), safe_serialization=True)
    tensors = {n: {k: v.detach().clone().contiguous() for k, v in nets[n].state_dict().items()} for n in NETS}
    save_file(tensors["fcn_union"], str(store / "controlnet" / "fcn_union_file.safetensors"))
    save_file(to_xlabs(tensors["fcn_xlabs"]), str(store / "controlnet" / "fcn_xlabs_file.safetensors"))
    return nets


_STORE: dict[str, tuple[Path, dict[str, Any]]] = {}
_LOCK = threading.Lock()


def flux_controlnet_store() -> tuple[Path, dict[str, Any]]:
    """A store with ``fluxcn`` (the Flux-dev above), ``sd1`` (sd_tiny's SD 1.x), the Flux ControlNets
    and an SD ControlNet ``cn_sd``, built once per process (tests only read it); with the diffusers
    Flux ControlNets by name."""
    from tests.support.controlnet_tiny import make_controlnet, save_folder
    from tests.support.sd_tiny import save_diffusers, write_manifest

    with _LOCK:
        if "root" not in _STORE:
            root = Path(tempfile.mkdtemp(prefix="tiny-flux-cn-store-"))
            atexit.register(shutil.rmtree, root, True)
            save_flux(root / "fluxcn")
            save_diffusers(root / "sd1")
            write_manifest(root / "sd1")
            nets = add_flux_controlnets(root)
            save_folder(make_controlnet(seed=1), root / "controlnet" / "cn_sd")
            _STORE["root"] = (root, nets)
        return _STORE["root"]
