"""Training data that resumes exactly where a checkpoint left it: the same epoch order, from the next batch.

Lightning saves the state of a train loader that has ``state_dict``/``load_state_dict`` in every checkpoint and
restores it before resuming. The order of an epoch is a pure function of (seed, epoch) (never of the global RNG),
and the state is (epoch, items already handed out), so a run killed mid-epoch and resumed with ``ckpt_path=last``
sees exactly the batches the uninterrupted run would have seen. (Exact with ``num_workers=0``; workers prefetch.)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochPosition:
    """Where a sampler is in its epoch: (epoch, items handed out), saved in checkpoints and resumed from.

    A sampler calls :meth:`_resume_from` with the epoch's items (a pure function of seed and epoch) and yields
    what it returns; ``_epoch_length`` is the number of items per epoch."""

    epoch: int
    consumed: int = 0
    _resume: dict[str, int] | None = None

    def _epoch_length(self) -> int:
        raise NotImplementedError

    def _resume_from(self, items: list) -> Iterator:
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            skip = min(self._resume["consumed"], len(items))
        self._resume = None
        self.consumed = skip
        for item in items[skip:]:
            self.consumed += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "consumed": int(self.consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= self._epoch_length():  # saved after an epoch's last item: the next epoch starts afresh
            epoch, consumed = epoch + 1, 0
        self.epoch = epoch
        self._resume = {"epoch": epoch, "consumed": consumed}


class ResumableSampler(EpochPosition, DistributedSampler):
    """Shuffles by (seed, epoch) like :class:`DistributedSampler` (Lightning keeps it as is under DDP: each rank
    takes its own shard) and can start an epoch part-way through."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0) -> None:
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        DistributedSampler.__init__(self, dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)

    def _epoch_length(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return self._resume_from(list(DistributedSampler.__iter__(self)))


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position (its sampler's, or an iterable dataset's) goes into Lightning checkpoints.

    Its own ``generator`` keeps iterator creation from drawing on the global RNG, which dropout uses: a resumed
    run's dropout masks then match the uninterrupted run's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)

    def _position(self) -> Any:
        return next((part for part in (self.sampler, self.batch_sampler) if hasattr(part, "state_dict")), self.dataset)

    def state_dict(self) -> dict[str, int]:
        return self._position().state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._position().load_state_dict(state)
