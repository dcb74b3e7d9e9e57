"""The model store: ``model_store/<name>/manifest.json`` folders, loaded by kind.

Names resolve only to folders inside the store that hold a manifest; nothing a client sends is
used as a path. Loaders are registered per ``kind`` ("unet" here; "stable_diffusion" later).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from service.sampling.spec import sampling_dtype

if TYPE_CHECKING:
    from service.serving.request import GenerationRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Kinds whose loader lives in a module that registers it on import (issue 5 adds stable_diffusion).
PLUGINS = {
    "stable_diffusion": "service.models.stable_diffusion",
    "sd3": "service.models.flow_model",
    "flux": "service.models.flow_model",
}


class UnknownModelError(ValueError):
    def __init__(self, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; valid models: {', '.join(valid) or 'none'}")
        self.name, self.valid = name, valid


class ManifestError(ValueError):
    """A manifest that cannot be used (bad JSON, unknown kind, a file outside its folder)."""


@dataclass(frozen=True)
class ModelDefaults:
    """A model's defaults for what a request leaves out, parsed once from its manifest's
    ``defaults`` (the only place they fall back)."""

    sampler: str = "dpmpp_2m"
    schedule: str = "karras"
    steps: int = 20
    cfg_scale: float = 1.0
    guidance: float | None = None  # Flux-dev's distilled guidance
    width: int | None = None
    height: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ModelDefaults:
        base = cls()

        def num(key: str, kind: type, default: Any) -> Any:
            value = raw.get(key)
            return default if value is None else kind(value)

        try:
            return cls(
                sampler=str(raw.get("sampler") or base.sampler),
                schedule=str(raw.get("schedule") or base.schedule),
                steps=num("steps", int, base.steps),
                cfg_scale=num("cfg_scale", float, base.cfg_scale),
                guidance=num("guidance", float, None),
                width=num("width", int, None),
                height=num("height", int, None),
            )
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"'defaults' has a value of the wrong type: {exc}") from exc


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    folder: Path
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    model_defaults: ModelDefaults = field(init=False)  # ``defaults`` parsed once: the one place

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_defaults", ModelDefaults.parse(self.defaults))

    def tuned_schedules(self) -> dict[str, list[dict[str, int]]]:
        """Tuned schedules in schedules/ ({sampler: [{"nfe", "steps"}]}; kdiff tune-schedule)."""
        from service.models.tuned import available

        return available(self.folder)

    def file(self, key: str, default: str) -> Path:
        """A file named by the manifest, which must stay inside the model's folder."""
        rel = self.raw.get(key, default)
        if not isinstance(rel, str) or not rel:
            raise ManifestError(f"{self.name}: manifest field {key!r} must be a file name")
        path = (self.folder / rel).resolve()
        if not path.is_relative_to(self.folder.resolve()):
            raise ManifestError(f"{self.name}: {key} {rel!r} points outside the model folder")
        return path


@dataclass
class JobInputs:
    """What a model family adds to a job (:meth:`LoadedModel.job_inputs`)."""

    cond: dict[str, Tensor]  # n rows
    uncond: dict[str, Tensor] | None  # n rows; None when unguided
    init: Tensor | None = None  # [n, C, h, w] clean start latents (img2img)
    mask: Tensor | None = None  # the inpainting mask the driver blends with
    latent_shape: tuple[int, ...] | None = None  # None: the model's own
    resolved: dict[str, Any] = field(default_factory=dict)  # request fields the family settled


@dataclass(frozen=True)
class PromptAsk:
    """What a front end that speaks in prompts and sizes (A1111, OpenAI) asks for."""

    prompt: str
    negative_prompt: str | None = None
    cfg_scale: float | None = None
    size: tuple[int, int] | None = None  # (width, height); None: the model's own
    clip_skip: int = 1


@dataclass
class PromptInputs:
    """What a front end that speaks in prompts and sizes (A1111, OpenAI) asks of a model family
    (:meth:`LoadedModel.prompt_inputs`): the request fields, the size it generates at (width, height),
    the class read from the prompt (class-conditional models) and notes on what it ignores."""

    fields: dict[str, Any]
    generated: tuple[int, int]
    label: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    """A loaded model as the service sees it (generic over pixel and latent models)."""

    manifest: Manifest
    denoiser: Any  # (x, sigma[B], **cond) -> denoised, with sigma_min / sigma_max
    latent_shape: tuple[int, ...]
    image_size: tuple[int, int]  # (height, width) of output images
    image_channels: int
    device: torch.device
    dtype: torch.dtype
    conditioning: str = "none"  # "none" | "class" | "text"
    num_classes: int = 0
    decode: Callable[[Tensor], Tensor] | None = None  # latents -> images in [-1, 1]
    encode: Callable[[Tensor], Tensor] | None = None  # images in [-1, 1] -> latents (img2img)
    info: dict[str, Any] = field(default_factory=dict)
    adapters: Any = None  # per-row LoRA support (service.models.lora.ModelAdapters), set once served
    # the pool's memory budget for weights loaded after the model (ControlNets), set once served
    memory_hook: Callable[[int], None] | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def reserve_memory(self, nbytes: int) -> None:
        """Count ``nbytes`` more (negative: fewer) in this model's memory before loading them; the
        pool evicts idle models to make room or raises ``ModelUnavailable`` (507) to refuse."""
        if self.memory_hook is not None:
            self.memory_hook(nbytes)

    @property
    def class_labels(self) -> list[int] | None:
        """The classes a request may ask for (class-conditional models), else None."""
        return list(range(self.num_classes)) if self.conditioning == "class" else None

    def class_conditioning(self, labels: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """cond and uncond dicts for class labels (None/-1 -> the null class)."""
        null = torch.full_like(labels, self.num_classes)
        return {"class_cond": labels}, {"class_cond": null}

    def job_inputs(
        self, request: GenerationRequest, *, n: int, cfg_scale: float, denoise: float
    ) -> JobInputs:
        """The request's conditioning, start image and mask for this model family (pixel models here;
        text-to-image models override it). Raises InputError naming the request field."""
        from .pixel import pixel_inputs

        return pixel_inputs(self, request, n, cfg_scale, denoise)

    def prompt_inputs(self, ask: PromptAsk) -> PromptInputs:
        """A prompt-and-size front end's request for this family. Pixel models generate at their own
        size; a class-conditional one reads its class from the prompt (a digit 0-9 or its word)."""
        from .pixel import pixel_prompt_inputs

        return pixel_prompt_inputs(self, ask)

    @property
    def fixed_size(self) -> bool:
        """Whether the family makes one image size only (a front end resizes what it asked for)."""
        return True

    def size_limit(self) -> int:
        """The largest width or height a front end may ask for (pixel models: resized to it)."""
        return 4096

    def mask_size(self, init_size: tuple[int, int], generated: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) a front end brings a mask to: pixel models take it at their own size."""
        return generated

    def edit_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The (width, height) a front end's edit without a size generates at from an init image of
        ``image_size`` (width, height); None: the model's own size (pixel models make one size)."""
        return None

    def conditioning_fields(self) -> frozenset[str]:
        """The optional conditioning fields of a request (those front ends pass through by name:
        guidance, SDXL's micro-conditioning, ...) this family reads; a request setting another is
        refused naming it."""
        return frozenset()

    def bind_driver(self, driver: Any) -> None:
        """Settle conditioning that depends on the job's sigmas once its driver is built (no-op)."""

    def builds_off_loop(self, request: GenerationRequest) -> bool:
        """Whether building ``request`` is torch work to keep off the event loop (images to decode)."""
        return request.init_image is not None or request.mask is not None

    def example_input(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One row of model input with the conditioning requests bring (to trace the model at startup)."""
        x = torch.zeros(1, *self.latent_shape, device=self.device, dtype=sampling_dtype(self.dtype))
        if self.conditioning != "class":
            return x, {}
        return x, self.class_conditioning(torch.zeros(1, dtype=torch.long, device=self.device))[0]


# Folders of the store's top level that hold what models share, not models (their own indexes read them).
SHARED_FOLDERS = frozenset({"loras", "embeddings", "controlnet", "annotators", "upscalers", "ipadapter"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")


def skip_reason(entry: Path) -> str | None:
    """Why the store's top-level ``entry`` is not a model: None for a model folder (a valid name and a
    manifest.json), "" for what is not meant as one (the shared folders, ``_examples``, hidden
    entries, other files), else the reason an operator reads in the log and in GET /models."""
    name = entry.name
    if name.startswith((".", "_")):
        return ""
    try:
        if name in SHARED_FOLDERS:
            if entry.is_dir():
                os.scandir(entry).close()  # its index lists nothing from a folder it cannot read: say so
            return ""
        if entry.is_symlink() and not entry.exists():  # exists() follows the link: False for a loop too
            return f"{entry}: a symbolic link to nothing (dangling, or a loop)"
        if entry.is_file():
            if entry.suffix.lower() not in WEIGHT_SUFFIXES:
                return ""
            return (
                f"{entry}: a weights file at the top of the store; a model is a folder <name>/ holding "
                "its weights and a manifest.json (model_store/_examples/)"
            )
        if not entry.is_dir():
            return ""
        manifest = entry / "manifest.json"
        if not manifest.exists():
            return f"{entry}: no manifest.json, so not a model (copy one from model_store/_examples/)"
        if not manifest.is_file():
            return f"{manifest}: not a file"
    except OSError as exc:  # a folder the service's user may not enter (permissions)
        return f"{entry}: cannot be read by the service: {exc.strerror or exc}"
    if not NAME_RE.match(name):
        return (
            f"{entry}: {name!r} is not a model name (letters, digits, '_', '.', '-'; starting with a "
            "letter or digit; at most 64 characters): rename the folder"
        )
    return None


Loader = Callable[[Manifest, torch.device, torch.dtype], LoadedModel]
LOADERS: dict[str, Loader] = {}


def register_loader(kind: str, loader: Loader) -> None:
    LOADERS[kind] = loader


def _load_unet(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from service.models.unet import load_denoiser

    for key, default in (("weights", "model.safetensors"), ("config", "config.json")):
        path = manifest.file(key, default)  # checked to stay inside the folder
        # the reader's own errors mislead: "No such device (os error 19)" for a folder, "No such file
        # or directory" for a file the service's user may not read
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "missing"
            raise ManifestError(f"{manifest.name}: {key} {str(path)!r} is {what}")
        if not os.access(path, os.R_OK):
            raise ManifestError(
                f"{manifest.name}: {key} {str(path)!r} cannot be read by the service: Permission denied"
            )
    denoiser, cfg = load_denoiser(manifest.folder, device, dtype)
    c, s = int(cfg.in_channels), int(cfg.image_size)
    return LoadedModel(
        manifest=manifest,
        denoiser=denoiser,
        latent_shape=(c, s, s),
        image_size=(s, s),
        image_channels=c,
        device=device,
        dtype=dtype,
        conditioning="class" if cfg.num_classes > 0 else "none",
        num_classes=int(cfg.num_classes),
        info={"sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max, "sigma_data": cfg.sigma_data},
    )


register_loader("unet", _load_unet)


class ModelStore:
    """The models under ``root``: one folder each, with a manifest.json."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def scan(self, errors: dict[str, str] | None = None) -> dict[str, Manifest]:
        """The store's manifests by name. With ``errors``, a bad manifest is recorded there (name ->
        message) instead of raising, so one broken folder does not hide the others; so is every other
        entry an operator may have meant as a model and that is skipped (:func:`skip_reason`)."""
        out: dict[str, Manifest] = {}
        if not self.root.is_dir():
            return out
        try:
            entries = sorted(self.root.iterdir())
        except OSError as exc:  # a store the service's user may not list (a mount without a+rX)
            if errors is None:
                raise
            errors[str(self.root)] = f"{self.root}: cannot be read by the service: {exc.strerror or exc}"
            return out
        for entry in entries:
            try:
                why = skip_reason(entry)
                if why is None:
                    out[entry.name] = self._read(entry, entry / "manifest.json")
                elif why and errors is not None:
                    errors[entry.name] = why
            except ManifestError as exc:
                if errors is None:
                    raise
                errors[entry.name] = str(exc)
        return out

    def _read(self, folder: Path, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
            raise ManifestError(f"{path}: a manifest is a JSON object with a 'kind'")
        name = raw.get("name", folder.name)
        if name != folder.name:
            raise ManifestError(f"{path}: name {name!r} differs from its folder {folder.name!r}")
        defaults = raw.get("defaults", {})
        if not isinstance(defaults, dict):
            raise ManifestError(f"{path}: 'defaults' must be an object")
        desc = str(raw.get("description", ""))
        try:
            return Manifest(folder.name, raw["kind"], folder, desc, defaults, raw)
        except ManifestError as exc:  # its defaults, parsed once here
            raise ManifestError(f"{path}: {exc}") from exc

    def resolve(self, name: str) -> Manifest:
        errors: dict[str, str] = {}  # another folder's broken manifest must not fail this model
        manifests = self.scan(errors)
        if isinstance(name, str) and name not in manifests and name in errors:
            raise ManifestError(errors[name])
        if not isinstance(name, str) or name not in manifests:
            raise UnknownModelError(str(name), sorted(manifests))
        return manifests[name]

    def load(
        self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> LoadedModel:
        manifest = self.resolve(name)
        if manifest.kind not in LOADERS and manifest.kind in PLUGINS:
            importlib.import_module(PLUGINS[manifest.kind])
        loader = LOADERS.get(manifest.kind)
        if loader is None:
            raise ManifestError(
                f"{name}: unknown kind {manifest.kind!r}; known kinds: {', '.join(sorted(LOADERS))}"
            )
        return loader(manifest, torch.device(device), dtype)


def disk_bytes(manifest: Manifest) -> int:
    """Bytes of weight files in the model's folder (LoRAs under ``loras/`` excluded): its size on disk,
    and the estimate of its memory use before it is loaded."""
    total = 0
    for path in manifest.folder.rglob("*"):
        rel = path.relative_to(manifest.folder).parts
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and rel[0] != "loras":
            total += path.stat().st_size
    return total


def memory_bytes(model: LoadedModel) -> int:
    """Bytes of the tensors a loaded model holds (parameters and buffers of the modules it reaches
    through its attributes, a few levels down, each tensor once)."""
    seen: dict[tuple[int, str], int] = {}
    visited: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if id(obj) in visited or depth > 3:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for t in [*obj.parameters(), *obj.buffers()]:
                seen[(t.data_ptr(), str(t.device))] = t.numel() * t.element_size()
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(model, 0)
    return sum(seen.values())
