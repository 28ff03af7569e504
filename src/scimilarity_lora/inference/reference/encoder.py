"""The encoder a reference index is built with, and its identity.

An index holds embeddings of one encoder: the same cells embedded by another adapter are other points, so an index
must never be searched with another encoder's query embeddings. The identity names the weights that make the
embedding, independently of where the files sit (a run's ``model/`` and its copy in the BentoML store agree):

- ``base``: a base encoder (``--base``, or a ``frozen`` probe run, whose embedding is its base's): its sha256;
- ``adapter``: a LoRA run: its base's sha256 and the hash of the LoRA weights;
- ``encoder``: a fully fine-tuned (merged) encoder: the hash of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from scimilarity_lora.genes import GeneAlignment
from scimilarity_lora.inference.artifact import ADAPTER_DIR, ENCODER_FILE, load_safetensors, read_model_config
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.model.folder import ModelFolderError, state_dict_hash

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class IndexMismatchError(ModelFolderError):
    """An index searched with another encoder than the one that built it."""


def encoder_identity(model_dir: str | Path, base: bool = False) -> dict[str, str]:
    """The identity (see the module docstring) of the embedding a model directory computes (or its base's)."""
    folder = Path(model_dir)
    config = read_model_config(folder)
    base_sha = (config.get("base") or {}).get("sha256")
    mode = (config.get("finetune") or {}).get("mode")
    if base or mode == "frozen":
        if not base_sha:
            raise ModelFolderError(f"{folder} records no base identity (sha256): its base's embedding cannot be "
                                   "named")
        return {"kind": "base", "base_sha256": base_sha}
    adapter = folder / ADAPTER_DIR / ADAPTER_WEIGHTS
    if mode == "lora" and base_sha and adapter.is_file():
        return {"kind": "adapter", "base_sha256": base_sha, "adapter_sha256": state_dict_hash(load_safetensors(adapter))}
    if not (folder / ENCODER_FILE).is_file():
        raise ModelFolderError(f"{folder} has neither an adapter of a recorded base nor {ENCODER_FILE}")
    return {"kind": "encoder", "encoder_sha256": state_dict_hash(load_safetensors(folder / ENCODER_FILE))}


def describe(identity: dict[str, str]) -> str:
    """One readable line: ``adapter 1a2b3c4d5e6f... of base 9f8e7d6c5b4a...``."""
    if identity.get("kind") == "adapter":
        return f"adapter {identity['adapter_sha256'][:12]}... of base {identity['base_sha256'][:12]}..."
    if identity.get("kind") == "base":
        return f"base {identity['base_sha256'][:12]}..."
    return f"encoder {str(identity.get('encoder_sha256'))[:12]}..."


def require_same_encoder(index_identity: dict, identity: dict, index_dir: str) -> None:
    if dict(index_identity) != dict(identity):
        raise IndexMismatchError(f"the reference index {index_dir} was built with {describe(index_identity)}, not "
                                 f"with this model's {describe(identity)}: rebuild it with this model "
                                 "(python -m scimilarity_lora.inference.reference build ...)")


@dataclass
class ReferenceEncoder:
    """Counts in, L2-normalised embeddings out, with the model's gene alignment and preprocessing (the predictor's,
    so an index can never be built with other preprocessing than the model's inference)."""

    predictor: CellTypePredictor
    encoder: torch.nn.Module
    identity: dict[str, str]
    model_dir: str

    @classmethod
    def load(cls, model_dir: str | Path, base: bool = False,
             predictor: CellTypePredictor | None = None) -> "ReferenceEncoder":
        """The model's encoder, or with ``base=True`` the base it was fine-tuned from (checked by its sha256)."""
        folder = Path(model_dir)
        predictor = predictor or CellTypePredictor.load(folder)
        identity = encoder_identity(folder, base=base)
        encoder = predictor.classifier.encoder
        if identity["kind"] == "base" and predictor.spec.finetune.get("mode") != "frozen":
            from scimilarity_lora.inference.runs import load_recorded_base

            encoder = load_recorded_base(folder.parent, predictor.spec.base, predictor.spec.genes)
        return cls(predictor, encoder.eval(), identity, str(folder))

    @property
    def dim(self) -> int:
        return self.predictor.latent_dim

    def alignment(self, genes: Sequence[str], gene_ids: Sequence[str] | None = None,
                  min_overlap: int = 50) -> GeneAlignment:
        return self.predictor.alignment(genes, gene_ids, min_overlap)

    @torch.inference_mode()
    def embed(self, X: "sp.spmatrix | np.ndarray", alignment: GeneAlignment,
              input_is_log1p: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the expressed cells, which rows are expressed): a cell with no expression in the model's
        genes has no embedding and is never indexed or answered."""
        prep = replace(self.predictor.preprocessing, input_is_log1p=input_is_log1p)
        aligned = alignment.apply(X)
        expressed = prep.nonempty_rows(aligned)
        if not expressed.any():
            return np.zeros((0, self.dim), dtype=np.float32), expressed
        return self.encoder(prep(aligned[expressed], output="auto")).numpy().astype(np.float32), expressed
