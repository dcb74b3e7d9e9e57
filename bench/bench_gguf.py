"""Memory and speed of a Flux transformer loaded from GGUF (kept quantized) vs the same weights in a
bf16 safetensors file, through the store's loader (ModelStore.load, as `kdiff serve` does).

    PYTHONPATH=<gguf-py> python bench/bench_gguf.py --width 1536 --doubles 2 --singles 4 \
        --types Q8_0,Q5_K,Q4_K,Q4_0,F16 --dtype bfloat16 --tokens 256

A Flux of FLUX.1's block structure at ``--width`` (heads of 128; FLUX.1 is 3072 wide with 19 + 38
blocks) with random weights; each file is loaded in a fresh process. Reported per file: its size, the
process's resident memory added by the load (VmRSS after - before) and after 3 calls (a mapped
safetensors file counts once its pages are read), the transformer's tensors
(service.models.store.memory_bytes) and one transformer call at ``--tokens`` image tokens (best of 3).
gguf-py (the dev extra) writes the files; the service reads them itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def weights(width: int, doubles: int, singles: int) -> tuple[dict[str, object], dict[str, object]]:
    """(the transformer config, its random weights in BFL's original layout)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from tests.support.flow_single_file import flux_to_original

    cfg = {"patch_size": 1, "in_channels": 16, "num_layers": doubles, "num_single_layers": singles,
           "attention_head_dim": 128, "num_attention_heads": width // 128, "joint_attention_dim": 64,
           "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        tr = FluxTransformer2DModel(**cfg)
        for p in tr.parameters():
            p.normal_(0, 0.02)
    return cfg, flux_to_original({k: v.detach() for k, v in tr.state_dict().items()})


def build(root: Path, cfg: dict[str, object], sd: dict[str, object], kind: str) -> str:
    """One model folder (``bf16``: a safetensors file, else a GGUF of that type); its name."""
    import torch
    from safetensors.torch import save_file

    from tests.support.gguf_files import flux_folder, write_gguf

    name = f"flux-{kind.lower()}"
    file = "flux1-dev.safetensors" if kind == "bf16" else f"flux1-dev-{kind}.gguf"
    folder = flux_folder(root, name, file, cfg)
    if kind == "bf16":
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(folder / file))  # type: ignore[attr-defined]
    else:
        write_gguf(folder / file, sd, kind, "flux")  # type: ignore[arg-type]
    return name


def measure(root: Path, name: str, dtype: str, tokens: int) -> dict[str, object]:
    import torch

    from service.models.store import ModelStore, memory_bytes

    torch.set_num_threads(2)
    # what every model's load imports, imported first: the difference is the model's own memory
    import diffusers
    import transformers

    import service.models.flow_model  # noqa: F401

    for cls in ("FluxTransformer2DModel", "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"):
        getattr(diffusers, cls)
    for cls in ("CLIPTextModel", "T5EncoderModel", "CLIPTokenizer"):
        getattr(transformers, cls)
    before = rss_mib()
    m = ModelStore(root).load(name, "cpu", getattr(torch, dtype))
    after = rss_mib()
    tm = m.text_model  # type: ignore[attr-defined]
    side = int(tokens**0.5) * 2
    x = torch.randn(1, 4, side, side, dtype=tm.dtype)
    cond = {"context": torch.randn(1, 8, 64, dtype=tm.dtype), "pooled": torch.randn(1, 32, dtype=tm.dtype),
            "guidance": torch.full([1], 3.5)}  # fmt: skip
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            tm.velocity(x, torch.tensor([0.5]), **cond)
            best = min(best, time.perf_counter() - t0)
    used = rss_mib()  # every weight touched (a mapped safetensors file is resident only once read)
    weights = next(p for p in (root / name).iterdir() if p.suffix in (".gguf", ".safetensors"))
    return {
        "file": weights.name,
        "file_mib": round(weights.stat().st_size / 2**20, 1),
        "rss_added_mib": round(after - before, 1),
        "rss_added_after_calls_mib": round(used - before, 1),
        "transformer_tensors_mib": round(memory_bytes(tm.transformer) / 2**20, 1),
        "call_s": round(best, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--doubles", type=int, default=2)
    ap.add_argument("--singles", type=int, default=4)
    ap.add_argument("--types", default="Q8_0,Q5_K,Q4_K,Q4_0,F16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--measure", nargs=2, metavar=("ROOT", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.dtype, args.tokens)))
        return
    root = Path(tempfile.mkdtemp())
    cfg, sd = weights(args.width, args.doubles, args.singles)
    try:
        for kind in ["bf16", *args.types.split(",")]:  # one file on disk at a time
            name = build(root, cfg, sd, kind)
            cmd = [sys.executable, __file__, "--dtype", args.dtype, "--tokens", str(args.tokens)]
            out = subprocess.run(
                [*cmd, "--measure", str(root), name], capture_output=True, text=True, check=True
            )
            print(out.stdout.strip().splitlines()[-1], flush=True)
            shutil.rmtree(root / name)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
