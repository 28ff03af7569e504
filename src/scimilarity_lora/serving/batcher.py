"""The in-service micro-batcher: concurrent requests share forward passes.

BentoML's ``batchable=True`` merges requests before an endpoint could say which request or cell is bad, and its
dispatcher answers 503 when overloaded. Instead every request is validated and featurised in its endpoint, then
queued here; one inference thread runs whatever has queued as one forward pass (at most ``max_batch_rows``
cells): no added latency when idle, large batches under load, and requests wait rather than fail.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from scimilarity_lora.inference.predictor import CellTypePredictor


class MicroBatcher:
    """Queue featurised cells; one inference thread runs everything queued as one forward pass.

    ``forward(xs, names)`` (e.g. :meth:`~.adapter_set.AdapterSet.forward`) serves requests naming different
    adapters in one pass; without it, the predictor's own forward serves every request."""

    def __init__(self, predictor: CellTypePredictor | None, max_batch_rows: int = 256, forward: Any = None) -> None:
        self.predictor, self.max_batch_rows, self.forward = predictor, max_batch_rows, forward
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches_run = 0
        self.rows_run = 0

    async def run(self, x: torch.Tensor, model: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future, model))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            rows = items[0][0].shape[0]
            while rows < self.max_batch_rows and not self.queue.empty():
                items.append(self.queue.get_nowait())
                rows += items[-1][0].shape[0]
            try:
                answers = await loop.run_in_executor(self.executor, self._forward, [x for x, _, _ in items],
                                                     [m for _, _, m in items])
            except Exception as e:  # never leave a request hanging
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut, _), answer in zip(items, answers):
                if fut.done():
                    continue
                if isinstance(answer, BaseException):  # this request alone (e.g. its adapter was just removed)
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)

    def _forward(self, xs: list[torch.Tensor], names: list[str | None]) -> list[tuple[np.ndarray, np.ndarray]]:
        self.batches_run += 1
        self.rows_run += sum(x.shape[0] for x in xs)
        if self.forward is not None:
            return self.forward(xs, names)
        predictor = self.predictor
        probs, emb = predictor.forward(torch.cat(xs) if len(xs) > 1 else xs[0])
        probs, emb = probs.numpy(), emb.numpy()
        out, start = [], 0
        for x in xs:
            out.append((probs[start:start + x.shape[0]], emb[start:start + x.shape[0]], predictor))
            start += x.shape[0]
        return out
