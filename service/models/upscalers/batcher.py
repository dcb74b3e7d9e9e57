"""One thread per loaded upscaler model that runs its windows: windows of the same shape from
concurrent requests (and from one request's many tiles) go through the network in one call, up to
``max_batch`` at a time. Requests wait on futures in their own worker threads; the event loop never
runs a model call."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .nets import Net

log = logging.getLogger(__name__)


@dataclass
class _Item:
    x: Tensor
    future: Future[Tensor] = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters the tests and benchmarks read: model calls and windows run, the largest call."""

    calls: int = 0
    windows: int = 0
    largest: int = 0


class Batcher:
    def __init__(self, net: Net, device: torch.device, max_batch: int, name: str) -> None:
        self.net, self.device, self.max_batch, self.name = net, device, max(1, max_batch), name
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"upscaler-{name}", daemon=True)
        self._thread.start()

    def submit(self, x: Tensor) -> Future[Tensor]:
        """A window [1, 3, h, w] in 0..1 -> a future of the network's [1, 3, h*s, w*s] output (CPU)."""
        item = _Item(x)
        self._queue.put(item)
        return item.future

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        waiting: deque[_Item] = deque()
        while True:
            first = waiting.popleft() if waiting else self._queue.get()
            if first is None:
                break
            while True:  # everything queued meanwhile joins the choice
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                waiting.append(nxt)
            batch = [first]
            for item in list(waiting):
                if len(batch) >= self.max_batch:
                    break
                if item.x.shape == first.x.shape:
                    batch.append(item)
                    waiting.remove(item)
            self._run([i for i in batch if i.future.set_running_or_notify_cancel()])
        for item in waiting:
            item.future.cancel()

    def _run(self, batch: list[_Item]) -> None:
        if not batch:
            return
        try:
            out = self._forward(torch.cat([i.x for i in batch]))
        except Exception as exc:
            if len(batch) == 1:
                log.warning("upscaler %s failed on a %s window: %s", self.name, tuple(batch[0].x.shape), exc)
                batch[0].future.set_exception(exc)
                return
            for item in batch:  # retried one by one, so only the window that fails fails
                try:
                    item.future.set_result(self._forward(item.x))
                except Exception as one:
                    item.future.set_exception(one)
            return
        for k, item in enumerate(batch):
            item.future.set_result(out[k : k + 1])

    def _forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            y = self.net.forward(x.to(self.device, self.net.dtype))
            y = y.float().clamp_(0, 1).cpu()
        self.stats.calls += 1
        self.stats.windows += x.shape[0]
        self.stats.largest = max(self.stats.largest, x.shape[0])
        return y
