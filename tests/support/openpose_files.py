"""The OpenPose annotator's weight files and the reference implementation (controlnet_aux 0.0.10, the
annotator code of lllyasviel's ControlNet v1.1 that the A1111 extension runs), for tests only.

``body_pose_model.pth`` is written with the reference's own key names: its ``bodypose_model``'s
state dict less the first name component (the ``transfer`` it loads the published file with maps
``model0.conv1_1.weight`` back to the file's ``conv1_1.weight``). Random weights use He
initialisation (zero biases) so activations keep their scale through the 40 layers and the maps
have distinct peaks; a final factor sets the heatmaps' range.

controlnet_aux's package ``__init__`` imports every detector it has (timm, torchvision, ...); the
open_pose package is loaded here on its own; its face module imports torchvision only to build two
transforms it never calls (stood in for when torchvision is absent); the hand module needs
scikit-image (make setup).
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import sys
import tempfile
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch


def _load_open_pose() -> types.ModuleType:
    name = "controlnet_aux.open_pose"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("controlnet_aux")
    if spec is None or spec.origin is None:
        raise ImportError("controlnet_aux is not installed (make setup installs the test oracles)")
    root = Path(spec.origin).parent
    pkg = types.ModuleType("controlnet_aux")
    pkg.__path__ = [str(root)]
    sys.modules["controlnet_aux"] = pkg
    stubs: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        # face.py builds torchvision's ToTensor / ToPILImage at import and never calls them; the
        # stand-ins leave sys.modules right after (transformers and diffusers probe torchvision)
        tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        tr.ToTensor = tr.ToPILImage = object  # type: ignore[attr-defined]
        tv.transforms = tr  # type: ignore[attr-defined]
        stubs = {"torchvision": tv, "torchvision.transforms": tr}
        sys.modules.update(stubs)
    op_spec = importlib.util.spec_from_file_location(
        name, root / "open_pose" / "__init__.py", submodule_search_locations=[str(root / "open_pose")]
    )
    assert op_spec is not None and op_spec.loader is not None
    module = importlib.util.module_from_spec(op_spec)
    sys.modules[name] = module
    try:
        op_spec.loader.exec_module(module)
    finally:
        for stub in stubs:
            sys.modules.pop(stub, None)
    return module


def reference() -> Any:
    """controlnet_aux's open_pose package (``OpenposeDetector``, ``body.Body``, ``util``, ``model``)."""
    return _load_open_pose()


def reference_keys(hand: bool = False) -> dict[str, tuple[int, ...]]:
    """The published body_pose_model.pth's (or hand_pose_model.pth's) keys and shapes, from the
    reference's model and transfer."""
    with torch.device("meta"):  # shapes only: no 52M-parameter initialisation
        model = reference().model.handpose_model() if hand else reference().model.bodypose_model()
    return {k.split(".", 1)[1]: tuple(v.shape) for k, v in model.state_dict().items()}


def save_hand_model(path: Path, seed: int = 1) -> Path:
    """A random hand_pose_model.pth with the published key names and shapes (He initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_keys(hand=True).items():
        fan_in = shape[1] * shape[2] * shape[3] if len(shape) == 4 else 1
        state[key] = (
            torch.zeros(shape)
            if key.endswith(".bias")
            else torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def save_body_model(path: Path, seed: int = 0, heat_gain: float = 1.0, paf_gain: float = 1.0) -> Path:
    """A random body_pose_model.pth with the published key names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_keys().items():
        if key.endswith(".bias"):
            state[key] = torch.zeros(shape)
            continue
        fan_in = shape[1] * shape[2] * shape[3]
        w = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        if key.startswith("Mconv7_stage6_"):  # the outputs: PAFs (L1), heatmaps (L2)
            w = w * (paf_gain if "_L1." in key else heat_gain)
        state[key] = w
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@lru_cache(maxsize=1)
def shared_body_model() -> Path:
    """One random body_pose_model.pth (200 MB) per test process, linked into each test's store."""
    # PAFs x2: on the test pictures the random network then joins limbs into people
    folder = Path(tempfile.mkdtemp(prefix="openpose-"))
    atexit.register(shutil.rmtree, folder, True)  # 200 MB per test process: /tmp filled up without this
    return save_body_model(folder / "body_pose_model.pth", paf_gain=2.0)


def link_body_model(store: Path) -> Path:
    """``store/annotators/body_pose_model.pth`` -> the shared file."""
    path = store / "annotators" / "body_pose_model.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(shared_body_model())
    return path


def reference_detector(path: Path, hand: Path | None = None) -> Any:
    """controlnet_aux's OpenposeDetector on a body model file (and a hand model file)."""
    op = reference()
    return op.OpenposeDetector(op.Body(str(path)), None if hand is None else op.Hand(str(hand)))
