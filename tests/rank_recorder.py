"""For the multi-process tests: each rank writes how many training cells it saw per epoch."""

import json
from pathlib import Path

import lightning as L


class CellsPerRank(L.Callback):
    def __init__(self, out: str) -> None:
        self.out, self.cells = Path(out), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.cells += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}_of{trainer.world_size}_epoch{trainer.current_epoch}.json"
        (self.out / name).write_text(json.dumps({"cells": self.cells}))
        self.cells = 0
