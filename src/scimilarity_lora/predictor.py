"""Inference with a trained model directory: counts in, labels, confidences and embeddings out.

Evaluation, ``annotate`` and the BentoML service all use :class:`CellTypePredictor`, which aligns genes with
:mod:`scimilarity_lora.genes` and normalises with :mod:`scimilarity_lora.preprocess` using the settings stored in
the model directory, so inference can never drift from training.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from scimilarity_lora.artifact import read_model_dir
from scimilarity_lora.encoder import Encoder, EncoderConfig, load_encoder_weights
from scimilarity_lora.genes import GeneAlignment, align_genes, gene_positions
from scimilarity_lora.module import ClassifierHead
from scimilarity_lora.preprocess import Preprocessing
from scimilarity_lora.sparse import SparseBatch


class CellTypePredictor:
    """A merged encoder + head with the gene order, classes and preprocessing it was trained with."""

    def __init__(self, encoder: Encoder, head: ClassifierHead, genes: list[str], classes: list[str],
                 preprocessing: Preprocessing, config: dict | None = None) -> None:
        self.encoder, self.head = encoder.eval(), head.eval()
        self.genes, self.classes, self.preprocessing = tuple(genes), classes, preprocessing
        self.gene_positions = gene_positions(self.genes)
        self.config = config or {}
        self._alignments: dict[tuple, GeneAlignment] = {}

    @classmethod
    def load(cls, path: str | Path) -> "CellTypePredictor":
        config, genes, encoder_state, head_state = read_model_dir(path)
        encoder = Encoder.from_config(EncoderConfig.from_dict(config["encoder"]))
        load_encoder_weights(encoder, encoder_state, source=f"{path}/encoder.safetensors")
        head = ClassifierHead(encoder.latent_dim, len(config["classes"]), config["head_scale"])
        head.load_state_dict(head_state)
        return cls(encoder, head, genes, list(config["classes"]),
                   Preprocessing.from_dict(config["preprocessing"]), config)

    # -- featurisation (the shared path) ---------------------------------------------------------------------
    def alignment(self, data_genes: Sequence[str], data_gene_ids: Sequence[str] | None = None,
                  min_overlap: int = 1) -> GeneAlignment:
        """Cached per gene list: a million-cell file or a stream of requests with one gene panel aligns once."""
        key = (tuple(data_genes), tuple(data_gene_ids) if data_gene_ids is not None else None, min_overlap)
        if key not in self._alignments:
            if len(self._alignments) > 64:
                self._alignments.clear()
            self._alignments[key] = align_genes(data_genes, self.genes, data_gene_ids=data_gene_ids,
                                                min_overlap=min_overlap, model_positions=self.gene_positions)
        return self._alignments[key]

    def featurize(self, X: sp.spmatrix | np.ndarray, alignment: GeneAlignment, input_is_log1p: bool = False,
                  output: str = "dense") -> "torch.Tensor | SparseBatch":
        """Align + normalise. ``output="auto"`` keeps sparse batches sparse (the encoder's sparse first layer);
        the service asks for dense because its micro-batcher concatenates requests."""
        prep = replace(self.preprocessing, input_is_log1p=input_is_log1p)
        return prep(alignment.apply(X), output=output)

    # -- model -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x: "torch.Tensor | SparseBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, embeddings) for preprocessed inputs."""
        z = self.encoder(x)
        return torch.softmax(self.head(z), dim=1), z

    def predict(self, X: sp.spmatrix | np.ndarray, genes: Sequence[str], *, gene_ids: Sequence[str] | None = None,
                input_is_log1p: bool = False, batch_size: int = 1024, min_overlap: int = 1,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (cells x classes) and embeddings (cells x latent), streamed in batches of rows."""
        alignment = self.alignment(genes, gene_ids, min_overlap)
        n = X.shape[0]
        probs = np.empty((n, len(self.classes)), dtype=np.float32)
        emb = np.empty((n, self.encoder.latent_dim), dtype=np.float32)
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="annotating", unit="batch")
        for s in starts:
            # never a dense cells x 28,231 copy of a sparse batch: 4,096 cells would be 462 MB
            p, z = self.forward(self.featurize(X[s:s + batch_size], alignment, input_is_log1p, output="auto"))
            probs[s:s + batch_size], emb[s:s + batch_size] = p.numpy(), z.numpy()
        return probs, emb
