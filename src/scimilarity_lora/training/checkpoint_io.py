"""Lightning checkpoints: writing that a crash cannot corrupt, and reading without unpickling code.

Lightning's default goes through fsspec, which writes to the system temp dir and then ``shutil.move``s the file
into place: across filesystems that is a copy, and a kill during it leaves a truncated ``last.ckpt``. Here the
checkpoint is written to ``<name>.tmp`` beside the target, flushed to disk, then renamed over it with
``os.replace`` (atomic on POSIX), so the previous checkpoint stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from scimilarity_lora.user_errors import no_space_is_a_user_error
from scimilarity_lora.model.folder import ModelFolderError, require_gene_order

if TYPE_CHECKING:
    from scimilarity_lora.training.module import CellTypeClassifier


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with no_space_is_a_user_error(path), open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def load_lightning_checkpoint(path: str | Path) -> dict:
    """Read a Lightning ``.ckpt`` without unpickling code; clear errors for corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(f"{path} holds objects other than tensors and plain values; refused: {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ModelFolderError(f"{path} is corrupt or truncated: {e}") from e


def classifier_from_checkpoint(path: str | Path) -> "CellTypeClassifier":
    """Rebuild a :class:`CellTypeClassifier` from a Lightning checkpoint, safely."""
    from scimilarity_lora.training.module import CellTypeClassifier

    ckpt = load_lightning_checkpoint(path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ModelFolderError(f"{path} is not a scimilarity-lora Lightning checkpoint")
    hp = dict(ckpt["hyper_parameters"])
    hp.pop("base_state_dict", None)
    if "base_sha256" in ckpt:  # adapter-sized: the frozen base (and its gene order) come from where training recorded it
        encoder, genes = _recorded_base(Path(path), hp.get("base") or {}, ckpt["base_sha256"])
        hp["base_state_dict"] = encoder.state_dict()
        if hp.get("gene_order") is None:
            hp["gene_order"] = require_gene_order(genes, ckpt.get("gene_order_sha256"), str(path))
    try:
        model = CellTypeClassifier(**hp)
    except TypeError as e:
        raise ModelFolderError(f"{path} was written by another version of scimilarity-lora: {e}") from e
    if "base_sha256" in ckpt:
        model.on_load_checkpoint(ckpt)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelFolderError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _recorded_base(ckpt_path: Path, base: dict, sha256: str) -> tuple[torch.nn.Module, list[str]]:
    """The frozen base and its gene order for an adapter-sized checkpoint (in ``<run dir>/checkpoints``)."""
    from scimilarity_lora.inference.runs import recorded_base

    return recorded_base(ckpt_path.parent.parent, {**base, "sha256": sha256})
