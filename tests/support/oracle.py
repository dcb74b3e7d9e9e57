"""Load k-diffusion 0.1.1.post1's ``sampling`` and ``external`` modules as a test oracle.

The package's ``__init__`` and ``utils`` want heavy extras (torchvision, clip, ...), so the two
modules are loaded on their own with a minimal ``utils`` stand-in (append_dims is all they use)
and a stub ``torchdiffeq`` (only its unused log-likelihood function needs it).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

_NAME = "_kdiff_oracle"


def _stub_utils() -> types.ModuleType:
    utils = types.ModuleType(f"{_NAME}.utils")

    def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims  # type: ignore[attr-defined]
    return utils


def load() -> types.SimpleNamespace:
    """Return the oracle's modules as ``ns.sampling`` and ``ns.external``; skip-proof: raises if absent."""
    if _NAME in sys.modules:
        pkg = sys.modules[_NAME]
        return types.SimpleNamespace(sampling=pkg.sampling, external=pkg.external)  # type: ignore[attr-defined]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "k-diffusion==0.1.1.post1 is the test oracle: pip install --no-deps k-diffusion==0.1.1.post1"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType(_NAME)
    pkg.__path__ = [str(root)]
    sys.modules[_NAME] = pkg
    sys.modules[f"{_NAME}.utils"] = pkg.utils = _stub_utils()  # type: ignore[attr-defined]
    if "torchdiffeq" not in sys.modules and importlib.util.find_spec("torchdiffeq") is None:
        stub = types.ModuleType("torchdiffeq")
        stub.odeint = None  # type: ignore[attr-defined]
        sys.modules["torchdiffeq"] = stub
    for name in ("sampling", "external"):
        mspec = importlib.util.spec_from_file_location(f"{_NAME}.{name}", root / f"{name}.py")
        assert mspec is not None and mspec.loader is not None
        module = importlib.util.module_from_spec(mspec)
        sys.modules[f"{_NAME}.{name}"] = module
        mspec.loader.exec_module(module)
        setattr(pkg, name, module)
    return types.SimpleNamespace(sampling=pkg.sampling, external=pkg.external)  # type: ignore[attr-defined]
