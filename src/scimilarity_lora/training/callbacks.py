"""Lightning callbacks: throughput, the per-epoch history that the plots and metrics.json use, the epoch of
streamed datasets, and RNG state across a resume."""

from __future__ import annotations

import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch


class TrainingSpeed(L.Callback):
    """Cells per second of training steps (forward + backward + optimizer; data loading excluded), the same
    including the data loading between steps (``stream_cells_per_second``: from the first batch's start to the
    last one's end, validation excluded), and the time from process start (imports included) to the first batch."""

    def __init__(self) -> None:
        self.cells = 0
        self.step_seconds = 0.0
        self.loop_seconds = 0.0
        self._t0 = 0.0
        self._last_end: float | None = None
        self.seconds_to_first_batch: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None and batch_idx > 0:  # the wait for this batch (not across epochs/validation)
            self.loop_seconds += now - self._last_end
        self._t0 = now
        if self.seconds_to_first_batch is None:
            import psutil

            self.seconds_to_first_batch = round(time.time() - psutil.Process().create_time(), 2)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last_end = time.perf_counter()
        self.step_seconds += self._last_end - self._t0
        self.loop_seconds += self._last_end - self._t0
        self.cells += int(len(batch[1]))

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.step_seconds if self.step_seconds else 0.0

    @property
    def stream_cells_per_second(self) -> float:
        return self.cells / self.loop_seconds if self.loop_seconds else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"cells": self.cells, "step_seconds": self.step_seconds, "loop_seconds": self.loop_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cells, self.step_seconds = int(state_dict["cells"]), float(state_dict["step_seconds"])
        self.loop_seconds = float(state_dict.get("loop_seconds", self.step_seconds))


class MetricsHistory(L.Callback):
    """Epoch-level metrics in memory (logger-independent), for learning-curve plots."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = int(trainer.global_step)  # > 0 when resumed from a checkpoint

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after this epoch's validation and its epoch-level training metrics: both splits of the same epoch
        # (recorded at validation end, the training metrics were the previous epoch's, and epoch 0 had none)
        row = {"epoch": int(trainer.current_epoch)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


class SetDatasetEpoch(L.Callback):
    """Before each training epoch, tell the train data which epoch it is (for its shuffle): an iterable train
    dataset (the Census stream), or a batch sampler (pretraining's class-balanced batches), which Lightning itself
    does not reach (it sets the epoch of samplers only).

    Lightning creates the epoch's iterator (and its workers) after ``on_train_epoch_start`` for epochs > 0.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
        batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        for part in (dataset, batch_sampler):
            if hasattr(part, "set_epoch"):
                part.set_epoch(trainer.current_epoch)


class RestoreRNGState(L.Callback):
    """Checkpoint the global RNGs (torch, numpy, random) and restore them before the first resumed training step,
    so dropout after a resume draws what the uninterrupted run drew (see :mod:`scimilarity_lora.data.resumable`).

    Stored as tensors and plain values, so checkpoints still load with ``weights_only=True``."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)),
                                                          int(pos), int(has_gauss), float(gauss)),
                 "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
