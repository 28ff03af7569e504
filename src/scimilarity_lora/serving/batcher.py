"""The in-service micro-batcher: concurrent requests share forward passes.

BentoML's ``batchable=True`` merges requests before an endpoint could say which request or cell is bad, and its
dispatcher answers 503 when overloaded. Instead every request is validated and featurised in its endpoint, then
queued here; one inference thread runs whatever has queued as one forward pass (at most ``max_batch_rows``
cells): no added latency when idle, large batches under load, and requests wait rather than fail.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from scimilarity_lora.inference.predictor import CellTypePredictor


class MicroBatcher:
    """Queue featurised cells; one inference thread runs everything queued as one forward pass."""

    def __init__(self, predictor: CellTypePredictor, max_batch_rows: int = 256) -> None:
        self.predictor, self.max_batch_rows = predictor, max_batch_rows
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches_run = 0
        self.rows_run = 0

    async def run(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
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
                probs, emb = await loop.run_in_executor(self.executor, self._forward, [x for x, _ in items])
            except Exception as e:  # never leave a request hanging
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            start = 0
            for x, fut in items:
                n = x.shape[0]
                if not fut.done():
                    fut.set_result((probs[start:start + n], emb[start:start + n]))
                start += n

    def _forward(self, xs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        probs, emb = self.predictor.forward(torch.cat(xs) if len(xs) > 1 else xs[0])
        self.batches_run += 1
        self.rows_run += probs.shape[0]
        return probs.numpy(), emb.numpy()
