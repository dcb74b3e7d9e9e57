"""The iteration-level batching engine: jobs, the engine loop, its scheduler and executor."""

from .engine import Engine, EngineConfig
from .jobs import (
    Draining,
    EngineError,
    ImageResult,
    Job,
    JobError,
    JobRequest,
    JobStatus,
    JobStore,
    QueueFull,
)
from .metrics import Metrics
from .runner import ModelHandle, ModelRunner
from .scheduler import Mode, Scheduler

__all__ = [
    "Draining",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ImageResult",
    "Job",
    "JobError",
    "JobRequest",
    "JobStatus",
    "JobStore",
    "Metrics",
    "Mode",
    "ModelHandle",
    "ModelRunner",
    "QueueFull",
    "Scheduler",
]
