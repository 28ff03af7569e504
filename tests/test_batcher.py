"""The service's micro-batcher: concurrent requests share forward passes, and each gets its own rows back."""

import asyncio

import numpy as np
import torch

from helpers import make_predictor
from scimilarity_lora.serving.batcher import MicroBatcher


def test_concurrent_requests_are_batched_and_answered_in_order():
    torch.manual_seed(0)
    predictor = make_predictor(50, classes=list("abcd"))
    batcher = MicroBatcher(predictor, max_batch_rows=16)
    requests = [torch.rand(1 if i % 3 else 2, 50) for i in range(40)]  # single cells and small batches

    async def main():
        return await asyncio.gather(*(batcher.run(x) for x in requests))

    answers = asyncio.run(main())
    assert batcher.rows_run == sum(len(x) for x in requests)
    assert batcher.batches_run < len(requests) // 2  # requests waiting together share a forward pass
    for x, (probs, emb) in zip(requests, answers):
        want_probs, want_emb = predictor.forward(x)
        np.testing.assert_allclose(probs, want_probs.numpy(), atol=1e-6)
        np.testing.assert_allclose(emb, want_emb.numpy(), atol=1e-6)
