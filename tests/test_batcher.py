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
    for x, (probs, emb, answered_by) in zip(requests, answers):
        assert answered_by is predictor  # the predictor whose head ran interprets the answer
        want_probs, want_emb = predictor.forward(x)
        np.testing.assert_allclose(probs, want_probs.numpy(), atol=1e-6)
        np.testing.assert_allclose(emb, want_emb.numpy(), atol=1e-6)


def test_one_failed_request_does_not_fail_the_others_of_its_batch():
    """A forward may answer one request with an exception (its adapter vanished): only that request fails."""
    torch.manual_seed(0)
    predictor = make_predictor(20)

    def forward(xs, names):
        return [KeyError(f"unknown model {n!r}") if n == "gone" else (*[t.numpy() for t in predictor.forward(x)],
                                                                       predictor) for x, n in zip(xs, names)]

    batcher = MicroBatcher(None, max_batch_rows=64, forward=forward)

    async def main():
        return await asyncio.gather(*(batcher.run(torch.rand(1, 20), "gone" if i % 4 == 0 else "a")
                                      for i in range(12)), return_exceptions=True)

    answers = asyncio.run(main())
    assert batcher.batches_run < 12
    assert [isinstance(a, KeyError) for a in answers] == [i % 4 == 0 for i in range(12)]
    assert all(a[0].shape == (1, 3) for a in answers if not isinstance(a, Exception))
