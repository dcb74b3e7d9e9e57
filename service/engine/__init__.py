"""The iteration-level batching engine: jobs, the scheduler loop and the model runner thread."""

from .jobs import Draining, EngineError, Job, JobError, JobRequest, JobStatus, JobStore, QueueFull
from .metrics import Metrics
from .runner import ModelHandle, ModelRunner
from .scheduler import Engine, EngineConfig, Mode

__all__ = [
    "Draining",
    "Engine",
    "EngineConfig",
    "EngineError",
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
]
