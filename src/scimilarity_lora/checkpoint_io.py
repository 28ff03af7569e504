"""Checkpoint writing that a crash cannot corrupt.

Lightning's default goes through fsspec, which writes to the system temp dir and then ``shutil.move``s the file
into place: across filesystems that is a copy, and a kill during it leaves a truncated ``last.ckpt``. Here the
checkpoint is written to ``<name>.tmp`` beside the target, flushed to disk, then renamed over it with
``os.replace`` (atomic on POSIX), so the previous checkpoint stays intact until the new one is complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
