"""The iteration-level batching engine: jobs, the engine loop, its scheduler (which makes each
iteration's :class:`Plan`) and executor (which runs it)."""

from .codes import ErrorCode, JobStatus
from .engine import Engine, EngineConfig
from .jobs import (
    Draining,
    EngineError,
    ImageResult,
    Job,
    JobError,
    JobRequest,
    JobStore,
    QueueFull,
)
from .metrics import Metrics
from .plan import ModelCall, Plan, Slot
from .runner import ModelHandle, ModelRunner
from .scheduler import Mode, Scheduler

__all__ = [
    "Draining",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ErrorCode",
    "ImageResult",
    "Job",
    "JobError",
    "JobRequest",
    "JobStatus",
    "JobStore",
    "Metrics",
    "Mode",
    "ModelCall",
    "ModelHandle",
    "ModelRunner",
    "Plan",
    "QueueFull",
    "Scheduler",
    "Slot",
]
