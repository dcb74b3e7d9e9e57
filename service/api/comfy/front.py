"""The ComfyUI front end's state (one per app): the workflow executor (``service.comfy``), every key's
prompts, files and sockets, and what running a prompt does around the executor (history first, then
``executing`` with ``node: null``, then the new queue size)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from .files import ComfyFiles
from .history_store import HistoryStore
from .prompts import OwnerPrompts, Run, RunContext, failed_entry, history_entry, previews_wanted
from .sockets import Sockets

log = logging.getLogger(__name__)

MAX_HISTORY_BYTES = 64 * 2**20  # per key: a history item holds its whole prompt (base64 avatars included)


class QueueFull(Exception):
    """The caller has ``KDIFF_COMFY_MAX_PROMPTS`` prompts in flight."""


class ComfyFront:
    def __init__(
        self,
        make_comfy: Callable[[], Any],
        files: ComfyFiles,
        max_history: int,
        max_prompts: int,
        store: HistoryStore | None = None,
    ) -> None:
        self._make_comfy = make_comfy
        self.store = store  # KDIFF_STATE_DIR: history kept across restarts
        self._comfy: Any = None
        self.files = files
        self.sockets = Sockets()
        self.max_history, self.max_prompts = max_history, max_prompts
        self._owners: dict[str | None, OwnerPrompts] = {}
        self._sizes: dict[str, int] = {}  # prompt id -> bytes its history item is counted as
        if store is not None:
            for owner, prompt_id, item, size in store.load():
                state = self.owner(owner)
                self._sizes[prompt_id] = size
                self._remember(state, prompt_id, item)
                number = item.get("prompt", [0])[0]
                state.number = max(state.number, number + 1 if isinstance(number, int) else 0)

    @property
    def comfy(self) -> Any:
        """The workflow executor (``service.comfy.Comfy``: validate, run, object_info, models), made on
        first use: it holds the output cache, and an app that never serves ComfyUI needs none."""
        if self._comfy is None:
            self._comfy = self._make_comfy()
        return self._comfy

    @comfy.setter
    def comfy(self, value: Any) -> None:
        self._comfy = value

    def owner(self, owner: str | None) -> OwnerPrompts:
        return self._owners.setdefault(owner, OwnerPrompts())

    def context(self, owner: str | None, client_id: str | None = None, prompt_id: str = "") -> RunContext:
        return RunContext(owner, client_id, prompt_id, self.files, self.sockets, previews=False)

    def status(self, owner: str | None) -> dict[str, Any]:
        """ComfyUI's queue status (``GET /prompt``, the ``status`` socket message)."""
        return {"exec_info": {"queue_remaining": self.owner(owner).queue_remaining()}}

    def send_status(self, owner: str | None) -> None:
        self.sockets.send(owner, None, "status", {"status": self.status(owner)})

    def submit(
        self,
        owner: str | None,
        prompt: Any,
        prompt_id: str | None,
        client_id: str | None,
        extra_data: dict[str, Any],
        outputs: list[str],
        size: int,
    ) -> Run:
        """Start a validated prompt; it runs concurrently with every other one."""
        state = self.owner(owner)
        if len(state.running) >= self.max_prompts:
            raise QueueFull
        prompt_id = prompt_id or str(uuid.uuid4())
        if client_id is not None:
            extra_data = {**extra_data, "client_id": client_id}
        number = state.number
        state.number += 1
        ctx = RunContext(owner, client_id, prompt_id, self.files, self.sockets, previews_wanted(extra_data))
        run = Run([number, prompt_id, prompt, extra_data, outputs], client_id, ctx)
        state.running[prompt_id] = run
        self._sizes[prompt_id] = size
        run.task = asyncio.get_running_loop().create_task(self._execute(owner, run))
        self.send_status(owner)
        return run

    async def _execute(self, owner: str | None, run: Run) -> None:
        state, ctx = self.owner(owner), run.context
        try:
            result = await self.comfy.run(run.entry[2], run.prompt_id, ctx)
            item = history_entry(run.entry, result)
        except asyncio.CancelledError:  # shutdown
            state.running.pop(run.prompt_id, None)
            raise
        except Exception as exc:  # the executor promises not to raise; if it does, the prompt failed
            log.exception("ComfyUI prompt %s failed outside its nodes", run.prompt_id)
            item = failed_entry(run.entry, exc)
            ctx.on_event("execution_error", item["status"]["messages"][0][1])
        # ComfyUI's order, which clients rely on: the history item exists before "executing: null"
        state.running.pop(run.prompt_id, None)
        self._remember(state, run.prompt_id, item)
        if self.store is not None:  # on disk too before clients are told it is done
            try:
                await self.store.put(owner, run.prompt_id, item, self._sizes.get(run.prompt_id, 0))
            except Exception:
                log.exception("storing the history of ComfyUI prompt %s failed", run.prompt_id)
        ctx.on_event("executing", {"node": None, "display_node": None, "prompt_id": run.prompt_id})
        self.send_status(owner)

    def _remember(self, state: OwnerPrompts, prompt_id: str, item: dict[str, Any]) -> None:
        state.history.pop(prompt_id, None)
        state.history[prompt_id] = item
        total = sum(self._sizes.get(pid, 0) for pid in state.history)
        dropped = []
        while len(state.history) > self.max_history or (total > MAX_HISTORY_BYTES and len(state.history) > 1):
            old, _ = state.history.popitem(last=False)
            total -= self._sizes.pop(old, 0)
            dropped.append(old)
        if dropped and self.store is not None:
            self.store.delete(self._owner_of(state), dropped)

    def _owner_of(self, state: OwnerPrompts) -> str | None:
        return next(o for o, s in self._owners.items() if s is state)

    def history_bytes(self, items: list[tuple[str, Any]]) -> int:
        """About how many bytes these history items' prompts take (their request bodies)."""
        return sum(self._sizes.get(pid, 0) for pid, _ in items)

    def interrupt(self, owner: str | None, prompt_ids: list[str] | None) -> int:
        """Stop the caller's running prompts (those named, or all); how many were stopped."""
        state = self.owner(owner)
        runs = [r for pid, r in state.running.items() if prompt_ids is None or pid in prompt_ids]
        for run in runs:
            run.context.cancel()
        return len(runs)

    def delete_history(self, owner: str | None, prompt_ids: list[str] | None) -> None:
        state = self.owner(owner)
        for pid in list(state.history) if prompt_ids is None else prompt_ids:
            if state.history.pop(pid, None) is not None:
                self._sizes.pop(pid, None)
        if self.store is not None:
            self.store.delete(owner, prompt_ids)

    async def close(self) -> None:
        tasks = [r.task for s in self._owners.values() for r in s.running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await asyncio.to_thread(self.files.close)
