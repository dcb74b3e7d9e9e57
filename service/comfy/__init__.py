"""ComfyUI's workflows on our engine: node classes (``/object_info`` is generated from them),
ComfyUI's validation and error shapes, and an executor whose sampler nodes run as our requests.
No HTTP here: the routes (service/api) implement :class:`ComfyContext` and call :class:`Comfy`."""

from .api import NODES, Comfy
from .executor import OutputCache, RunResult
from .runtime import ComfyContext
from .validate import Validation

__all__ = ["NODES", "Comfy", "ComfyContext", "OutputCache", "RunResult", "Validation"]
