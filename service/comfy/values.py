"""The values that flow along a workflow's links.

ComfyUI passes live objects (a patched model, CLIP, a latent tensor). Here the loaders, text
encoders and model patches are *descriptions* (which model of our store, which LoRAs, clip skip,
shift, guidance), and a sampler node turns them into one :class:`GenerationRequest` run by the
engine, so it batches with all other traffic. A LATENT is a size to start from noise
(EmptyLatentImage), pixels to be encoded by the sampler's model (VAEEncode), or a model's latents
(a sampler's result, with the engine's decoding of them, or those latents resized by LatentUpscale):
the next sampler starts from those very latents (``service/serving/latents.py``), as ComfyUI's do.

IMAGE is ComfyUI's own: a float tensor [B, H, W, 3] in [0, 1]; MASK [B, H, W] in [0, 1] (1 = repaint).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class ModelRef:
    """MODEL: a model of our store with the patches applied to it."""

    name: str
    loras: tuple[tuple[str, float], ...] = ()
    shift: float | None = None  # ModelSamplingSD3 / ModelSamplingFlux
    cache: Any = None  # a stepcache.CacheSpec: DeepCache / ApplyFBCacheOnModel (nodes_cache.py)
    ip_adapters: tuple[IPAdapterUnit, ...] = ()  # IPAdapter / IPAdapterAdvanced (nodes_ipadapter.py)

    def with_(self, **kw: Any) -> ModelRef:
        return replace(self, **kw)


@dataclass(frozen=True, eq=False)
class IPAdapterUnit:
    """An IP-Adapter applied to a MODEL: one image of the request's ``ip_adapters``."""

    adapter: str  # our adapter name (the file's stem in model_store/ipadapter/)
    image: Any  # a GatedImage: the IMAGE's first frame, 8-bit, as it passed the image gate
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class IPAdapterPipe:
    """IPADAPTER: an adapter file (IPAdapterModelLoader) or a preset's adapter and encoder
    (IPAdapterUnifiedLoader: ``encoder`` set, as cubiq's pipeline carries its CLIP vision model)."""

    adapter: str
    encoder: str | None = None  # the encoder folder, relative to model_store/ipadapter/


@dataclass(frozen=True)
class ClipVisionRef:
    """CLIP_VISION (CLIPVisionLoader): an image encoder folder of model_store/ipadapter/."""

    name: str  # as the workflow named it
    folder: str  # relative to model_store/ipadapter/


@dataclass(frozen=True)
class ClipRef:
    """CLIP: the text encoder(s) of a store model."""

    name: str
    clip_skip: int | None = None
    loras: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class VaeRef:
    """VAE: the autoencoder of a store model (our engine decodes with the sampled model's own)."""

    name: str


@dataclass(frozen=True)
class ControlNetRef:
    """CONTROL_NET (ControlNetLoader): a ControlNet of our store (GET /controlnet/model_list)."""

    name: str
    control_type: str = "auto"  # SetUnionControlNetType (union ControlNets only read it)


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """A ControlNet applied to a conditioning (ControlNetApply / ControlNetApplyAdvanced)."""

    net: str
    image: Tensor  # IMAGE [B, H, W, 3]: the first image is the control image
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_type: str = "auto"  # a union ControlNet's type (SetUnionControlNetType)


@dataclass(frozen=True)
class Conditioning:
    """CONDITIONING: the text a model's encoder reads (combined conditionings join their texts),
    and the ControlNets applied to it."""

    clip: ClipRef
    texts: tuple[str, ...]
    guidance: float | None = None  # FluxGuidance
    controls: tuple[ControlUnit, ...] = ()

    @property
    def text(self) -> str:
        return ", ".join(t for t in self.texts if t)


@dataclass(frozen=True, eq=False)
class Latent:
    """LATENT: a start for a sampler, of this pixel size and batch. Neither ``images`` nor
    ``samples``: an empty latent (noise only)."""

    width: int
    height: int
    batch: int
    images: Tensor | None = None  # [B, H, W, 3] in [0, 1]: VAEEncode's, or the decoding of samples
    noise_mask: Tensor | None = None  # [B or 1, H, W] in [0, 1]; 1 = sample, 0 = keep
    model: str | None = None  # the model whose latent space ``samples`` are in
    samples: Tensor | None = None  # [B, C, h, w]: a model's latents (a sampler's result)
    batch_index: tuple[int, ...] | None = None  # ComfyUI's: image i's noise is the seed's batch_index[i]

    def with_(self, **kw: Any) -> Latent:
        return replace(self, **kw)


class SamplerRef(NamedTuple):
    """SAMPLER (KSamplerSelect)."""

    name: str


@dataclass(frozen=True)
class SigmasRef:
    """SIGMAS: a schedule to be made for the sampler's model (BasicScheduler, KarrasScheduler)."""

    schedule: str
    steps: int
    denoise: float = 1.0
    options: tuple[tuple[str, float], ...] = ()
    model: str | None = None


class NoiseRef(NamedTuple):
    """NOISE (RandomNoise; DisableNoise has seed None)."""

    seed: int | None


@dataclass(frozen=True)
class Guider:
    """GUIDER (CFGGuider, BasicGuider)."""

    model: ModelRef
    positive: Conditioning
    negative: Conditioning | None
    cfg: float
