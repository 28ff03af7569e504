"""A callback for tests: the train batch sampler's epoch and the labels of its first batch, per epoch."""

import lightning as L

SEEN: list[tuple[int, list[int]]] = []


class FirstBatchPerEpoch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            SEEN.append((trainer.train_dataloader.batch_sampler.epoch, batch[1].tolist()))
