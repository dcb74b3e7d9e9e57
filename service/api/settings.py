"""Service settings, read from the environment (prefix ``KDIFF_``) by pydantic-settings."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.engine.scheduler import Mode


class Settings(BaseSettings):
    """Every field maps to ``KDIFF_<NAME>`` (lists: comma-separated, e.g. ``KDIFF_API_KEYS=a,b``)."""

    # env_ignore_empty: `KDIFF_TORCH_THREADS=` (an .env line left blank, compose's `${X:-}`) is the default
    model_config = SettingsConfigDict(
        env_prefix="KDIFF_", extra="ignore", protected_namespaces=(), env_ignore_empty=True
    )

    model_store: Path = Field(
        default=Path("model_store"), description="folder holding one subfolder per model"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models to load (names in the store); empty = all"
    )
    default_model: str | None = Field(default=None, description="model used when a request names none")
    device: str = Field(
        default="auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="model weights dtype; auto: bfloat16 on a CUDA GPU that supports it, else float16 there, "
        "float32 elsewhere",
    )
    batching: Mode = Field(default=Mode.iteration, description="iteration (default) | request | serial")
    max_batch_rows: int = Field(
        default=64, ge=1, le=8192, description="rows per model call (guided image = 2)"
    )
    max_queue: int = Field(
        default=256, ge=0, le=1_000_000, description="jobs waiting for admission before 429"
    )
    batch_wait_ms: float = Field(
        default=2.0, ge=0, le=10_000, description="wait for a burst when the engine idles"
    )
    invariant_rows: int = Field(
        default=8,
        ge=0,
        le=8192,
        description="batch-invariant mode: every model call runs exactly this many rows (padded), so the "
        "same seed gives the same image bit for bit alone or batched; 0 = off (calls of any size)",
    )
    job_timeout_s: float = Field(default=300.0, gt=0, description="deadline per job (queue time counts)")
    result_ttl_s: float = Field(default=600.0, gt=0, description="how long finished job results are kept")
    max_results: int = Field(default=1000, ge=1, description="most finished jobs kept (oldest dropped first)")
    max_result_bytes: int = Field(
        default=256 * 2**20,
        ge=0,
        description="most bytes of encoded result images kept for GET /jobs (oldest dropped first)",
    )
    state_dir: str = Field(
        default="",
        description="folder of what survives a restart: the job store (SQLite file + result PNGs: accepted "
        "jobs are re-run, finished results kept) and the webhook outbox; empty = in memory only",
    )
    state_reset: bool = Field(
        default=False,
        description="a corrupted job store is set aside (renamed) and an empty one started, instead of "
        "refusing to start",
    )
    replay_attempts: int = Field(
        default=3,
        ge=0,
        le=100,
        description="times a job is re-run after restarts that interrupted it before it is failed",
    )
    redis_url: str = Field(
        default="",
        description="a Redis shared by the replicas of a scaled-out service (redis://host:6379/0): the job "
        "store instead of KDIFF_STATE_DIR's, so a dead replica's jobs run on a live one; empty = none",
    )
    redis_prefix: str = Field(
        default="kdiff",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of this deployment's Redis keys (several deployments may share one Redis)",
    )
    redis_lease_s: float = Field(
        default=10.0, ge=0.5, le=3600, description="a job's lease on Redis (renewed every quarter of it)"
    )
    drain_timeout_s: float = Field(
        default=25.0, ge=0, description="on SIGTERM: time for running jobs to finish"
    )
    max_images: int = Field(default=16, ge=1, le=256, description="most images per request (n)")
    max_steps: int = Field(default=500, ge=1, le=10_000, description="most sampler steps per request")
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        le=89_478_485,  # PIL's own bomb limit (Image.MAX_IMAGE_PIXELS): beyond it PIL warns, then refuses
        description="largest incoming image (width x height; init images, masks, uploads, png-info): "
        "read from the header, refused before a pixel is decoded",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins; empty = CORS off"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="if set, requests need 'Authorization: Bearer <key>' (or HTTP Basic, for an entry "
        "'user:pass'); each key sees only its own jobs",
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="keys that see and cancel every job (and use management routes)"
    )
    public_docs: bool = Field(default=True, description="serve /docs, /redoc and /openapi.json without a key")
    max_body_bytes: int = Field(
        default=34_000_000,
        ge=1024,
        description="largest request body (413 beyond): two 16 MB base64 images and the rest",
    )
    max_chunked_bytes: int = Field(
        default=2**20,
        ge=1024,
        description="largest body sent without Content-Length (chunked): its size is only known as it "
        "is read, so a refused one would have been buffered up to the limit",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="time a request body may take to arrive (408)"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="time a client may take to send its request headers (then closed)"
    )
    send_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="time a client may leave a response unread (no byte taken) before it is dropped",
    )
    keep_alive_s: int = Field(
        default=5, ge=1, description="idle keep-alive connections are closed after this"
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="open connections and requests at once before 503 (uvicorn limit_concurrency)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's)"
    )
    memory_budget: int | None = Field(
        default=None,
        ge=0,
        description="bytes of device memory models may use (default: what the device has); idle models "
        "are unloaded least recently used first to make room",
    )
    jit: bool = Field(
        default=True,
        description="serve the project's UNet models as TorchScript traces (checked against eager; "
        "the model call then runs without the GIL)",
    )
    compile: bool = Field(
        default=False,
        description="serve every model's network through torch.compile (inductor), rows padded to "
        "KDIFF_COMPILE_BUCKETS, each graph checked against eager; supersedes KDIFF_JIT",
    )
    compile_buckets: Annotated[list[Annotated[int, Field(ge=1, le=8192)]], NoDecode] = Field(
        default_factory=list,
        description="row counts compiled graphs are made for (comma-separated); empty = powers of two "
        "up to max_batch_rows",
    )

    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts callback_url may name: comma-separated host[:port] patterns (* a wildcard, "
        "no port = 80/443, :* any port); private, loopback and link-local addresses only for a pattern "
        "naming its host without a wildcard (e.g. 127.0.0.1:*); empty = webhooks off",
    )
    webhook_urls: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="default callback per key: comma-separated '<api key>=<url>' ('*=<url>': every key)",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key of the Kdiff-Signature header (t=<unix>,v1=<hex>) on every webhook",
    )
    webhook_max_age_s: float = Field(
        default=86400.0, gt=0, description="a webhook is retried (back-off with jitter) for this long"
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="most time one webhook attempt may take (DNS to answer)"
    )
    webhook_retry_base_s: float = Field(
        default=2.0, gt=0, description="first webhook retry delay; doubles per attempt (to 1 h), jittered"
    )
    webhook_concurrency: int = Field(default=8, ge=1, le=256, description="webhook attempts at once")

    comfy_dir: Path | None = Field(
        default=None,
        description="ComfyUI routes: folder of each key's input/output/temp files (uploads, SaveImage); "
        "empty = a temporary folder removed at exit",
    )
    comfy_max_files: int = Field(
        default=1000, ge=1, description="ComfyUI routes: most files kept per key (oldest removed first)"
    )
    comfy_max_bytes: int = Field(
        default=2**30,
        ge=2**20,
        description="ComfyUI routes: most bytes of files kept per key (oldest removed first)",
    )
    comfy_max_history: int = Field(
        default=1000,
        ge=1,
        description="ComfyUI routes: most /history entries kept per key (oldest dropped first)",
    )
    comfy_max_prompts: int = Field(
        default=64,
        ge=1,
        description="ComfyUI routes: most prompts queued or running per key before /prompt refuses",
    )

    upscaler_tile: int = Field(
        default=256,
        ge=0,
        le=4096,
        description="upscaler models run on tiles of this many pixels a side (plus the overlap), so "
        "memory stays bounded for any image size; 0 = the whole image at once",
    )
    upscaler_tile_overlap: int = Field(
        default=16, ge=0, le=512, description="pixels of image context around each upscaler tile"
    )
    upscaler_batch: int = Field(
        default=4, ge=1, le=64, description="upscaler tiles (of concurrent requests too) per model call"
    )
    upscaler_noncommercial: bool = Field(
        default=False,
        description="allow upscaler files whose architecture is under a non-commercial licence "
        "(spandrel_extra_arches' list); refused by default",
    )
    upscale_max_pixels: int = Field(
        default=8192 * 4096,
        ge=64 * 64,
        le=2**31,
        description="largest upscaled image (width x height, also of an intermediate model pass)",
    )

    @field_validator(
        "models",
        "cors_origins",
        "api_keys",
        "admin_keys",
        "webhook_allow",
        "webhook_urls",
        "compile_buckets",
        mode="before",
    )
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N (N a GPU index) or mps")
        return value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _folder_text(cls, value: object) -> object:
        return "" if value is None else str(value) if isinstance(value, Path) else value

    @field_validator("webhook_secret", "comfy_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    def check_folders(self) -> None:
        """Make the folders the service writes to (KDIFF_STATE_DIR, KDIFF_COMFY_DIR) and write a file
        in each, at start-up: one that cannot be used otherwise fails requests later (the ComfyUI
        routes answered 500 on every upload and prompt). Raises StartupError naming the setting."""
        import tempfile

        from service.serving.errors import StartupError

        for setting, folder in (("KDIFF_STATE_DIR", self.state_dir), ("KDIFF_COMFY_DIR", self.comfy_dir)):
            if not folder:
                continue
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                why = exc.strerror or str(exc)
                raise StartupError(
                    f"{setting}={str(folder)!r} cannot be used as a folder to write in: {why}"
                ) from exc

    def resolve_dtype(self, device: str) -> str:
        """The weights dtype ``dtype`` names on ``device`` (the sampler state stays float32 regardless)."""
        import torch

        if self.dtype != "auto":
            return self.dtype
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} (KDIFF_DEVICE) but torch {torch.__version__} sees no CUDA GPU; "
                "use 'cpu' or 'auto'"
            )
        index = self.device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device {self.device!r} (KDIFF_DEVICE) but torch sees {torch.cuda.device_count()} GPU(s): "
                f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        return self.device


# KDIFF_* variables that are not settings of the service: read by the compose files, the image's
# entrypoint and healthcheck, the Makefile and the tests (a warning names any other one: a misspelling).
NOT_SETTINGS = frozenset(
    {
        "KDIFF_HOST",
        "KDIFF_PORT",
        "KDIFF_HOST_PORT",
        "KDIFF_MODELS_DIR",
        "KDIFF_IMAGE",
        "KDIFF_BASE_IMAGE",
        "KDIFF_REDIS_IMAGE",
        "KDIFF_TORCH_SPEC",
        "KDIFF_TORCH_INDEX_URL",
        "KDIFF_TORCH_WHEEL",
        "KDIFF_HEALTHCHECK_URL",
        "KDIFF_KEY",
        "KDIFF_CHROMIUM",
        "KDIFF_SOAK",
    }
)
SECRET_FIELDS = frozenset({"api_keys", "admin_keys", "webhook_urls", "webhook_secret", "redis_url"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``KDIFF_*`` variable of ``environ`` that no setting reads (with the closest
    setting's name): such a variable is otherwise ignored without a word."""
    known = [f"KDIFF_{name.upper()}" for name in Settings.model_fields]
    out = []
    for var in sorted(environ):
        if var.startswith("KDIFF_") and var not in known and var not in NOT_SETTINGS:
            close = difflib.get_close_matches(var, known, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else " (README 'Settings' lists them)"
            out.append(f"{var} is not a setting and is ignored{hint}")
    return out


def explain(exc: ValidationError) -> list[str]:
    """One line per invalid setting, named as the operator set it (``KDIFF_<NAME>``), with its value
    (secrets left out) and what is allowed."""
    out = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        shown = "" if field in SECRET_FIELDS or "input" not in err else f"={err['input']!r}"
        out.append(f"KDIFF_{field.upper()}{shown}: {err['msg'].removeprefix('Value error, ')}")
    return out


def settings_of(service: Any) -> Settings:
    """The HTTP app's settings of a :class:`service.serving.service.Service` it built (the serving layer
    types them by what it reads only)."""
    return cast(Settings, service.settings)
