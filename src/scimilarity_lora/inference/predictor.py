"""Inference with a trained model directory: counts in, labels, confidences and embeddings out.

Evaluation, ``annotate`` and the BentoML service all use :class:`CellTypePredictor`, which aligns genes with
:mod:`scimilarity_lora.genes` and normalises with :mod:`scimilarity_lora.preprocess` using the settings stored in
the model directory, so inference can never drift from training. Imports no Lightning or torchmetrics: the
service starts without them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from scimilarity_lora.genes import GeneAlignment, GeneAlignmentError, align_genes, gene_positions, symbol_aliases
from scimilarity_lora.inference.alignment_cache import AlignmentCache
from scimilarity_lora.inference.artifact import ModelSpec, read_model_dir
from scimilarity_lora.inference.calibration import UNKNOWN, Calibration
from scimilarity_lora.inference.coarse import CoarseTerms
from scimilarity_lora.model.classifier import CellClassifier
from scimilarity_lora.model.sparse import SparseBatch
from scimilarity_lora.preprocess import EmptyCellError


class CellTypePredictor:
    """A merged classifier with the gene order, classes and preprocessing it was trained with."""

    def __init__(self, classifier: CellClassifier, spec: ModelSpec, config: dict | None = None,
                 calibration: Calibration | None = None, alignments: AlignmentCache | None = None) -> None:
        self.classifier = classifier.eval()
        self.spec = spec
        #: temperature, confidence threshold and novelty detector fitted by training (None: every answer is a label)
        self.calibration = calibration
        self.genes, self.classes, self.preprocessing = tuple(spec.genes), list(spec.classes), spec.preprocessing
        self.gene_positions = gene_positions(self.genes)
        self.config = config or spec.to_json()
        #: class -> CL id (None where unmapped; empty for a model trained without ids)
        self.class_terms: dict[str, str | None] = dict(spec.ontology.get("class_terms") or {})
        #: the coarser answers this model may give, when its calibration allows them (``unknown.coarse``)
        self.coarse_terms = (CoarseTerms.from_ontology(spec.ontology, len(self.classes))
                             if calibration is not None and calibration.coarse else None)
        #: gene alignments per gene list: bounded by bytes, thread-safe, shareable by the adapters of one base
        self.alignments = alignments if alignments is not None else AlignmentCache()
        #: the model directory it was read from (names its encoder for a reference index); None if built in memory
        self.path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "CellTypePredictor":
        spec, classifier, config = read_model_dir(path)
        classifier.encoder.gene_major_first_layer()  # loaded for inference only: no transposed copy beside it
        predictor = cls(classifier, spec, config, Calibration.load(path))
        predictor.path = Path(path)
        return predictor

    @property
    def latent_dim(self) -> int:
        return self.classifier.latent_dim

    # -- featurisation (the shared path) ---------------------------------------------------------------------
    def alignment(self, data_genes: Sequence[str], data_gene_ids: Sequence[str] | None = None,
                  min_overlap: int = 1) -> GeneAlignment:
        """Cached per gene list (see :mod:`.alignment_cache`): a million-cell file or a stream of requests with one
        gene panel aligns once."""
        key = (tuple(data_genes), tuple(data_gene_ids) if data_gene_ids is not None else None, min_overlap,
               bool(self.spec.gene_aliases), id(self.gene_positions))

        def build() -> GeneAlignment:
            alignment = align_genes(data_genes, self.genes, data_gene_ids=data_gene_ids, min_overlap=min_overlap,
                                    model_positions=self.gene_positions,
                                    aliases=symbol_aliases() if self.spec.gene_aliases else None)
            panel = self.preprocessing.gene_panel
            if panel is not None:  # the genes the model sees are the panel's: overlap is counted there
                n = int(np.isin(alignment.target_index, panel).sum())
                if n < min_overlap:
                    raise GeneAlignmentError(
                        f"only {n} of the model's {len(panel)} panel genes (the genes it was trained to see, "
                        f"data.gene_panel) are in the data, need at least {min_overlap}")
            return alignment

        return self.alignments.get(key, build)

    def featurize(self, X: sp.spmatrix | np.ndarray, alignment: GeneAlignment, input_is_log1p: bool = False,
                  output: str = "dense") -> "torch.Tensor | SparseBatch":
        """Align + normalise. ``output="auto"`` keeps sparse batches sparse (the encoder's sparse first layer);
        the service asks for dense because its micro-batcher concatenates requests."""
        prep = replace(self.preprocessing, input_is_log1p=input_is_log1p)
        return prep(alignment.apply(X), output=output)

    # -- model -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, x: "torch.Tensor | SparseBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embeddings) for preprocessed inputs."""
        return self.classifier.logits_and_embedding(x)

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration is not None else 1.0

    def forward(self, x: "torch.Tensor | SparseBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities, embeddings) for preprocessed inputs."""
        logits, z = self.logits(x)
        return torch.softmax(logits / self.temperature, dim=1), z

    def status(self, probs: np.ndarray, z: np.ndarray, coarse: bool = True) -> np.ndarray:
        """Per cell "ok", "coarse", "low_confidence" or "novel" (see :mod:`.calibration` and :mod:`.coarse`); all
        "ok" without a calibration. ``coarse=False`` never answers an ancestor."""
        if self.calibration is None:
            return np.full(len(probs), "ok", dtype=object)
        status = self.calibration.status(probs, z)
        if coarse and self.coarse_terms is not None:
            hesitant = (status == "low_confidence") & self.calibration.coarse_allowed(z)
            if hesitant.any():
                chosen = self.coarse_terms.choose(probs[hesitant], self.calibration.confidence_threshold)
                status[np.flatnonzero(hesitant)[chosen >= 0]] = "coarse"
        return status

    def answer_with_terms(self, probs: np.ndarray, status: np.ndarray, force_label: bool = False
                          ) -> tuple[list[str], list[str | None]]:
        """(labels, CL ids): the answer per cell and its Cell Ontology id (None for "unknown" or an unmapped class)."""
        best = np.asarray(self.classes, dtype=object)[probs.argmax(axis=1)] if len(probs) else np.array([], object)
        labels = [b if force_label or s == "ok" else UNKNOWN for b, s in zip(best, status)]
        terms = [self.class_terms.get(b) if label != UNKNOWN else None for b, label in zip(best, labels)]
        coarse = np.flatnonzero(np.asarray(status, dtype=object) == "coarse") if not force_label else []
        if len(coarse):
            chosen = self.coarse_terms.choose(probs[coarse], self.calibration.confidence_threshold)
            for i, t in zip(coarse, chosen):
                labels[i], terms[i] = self.coarse_terms.labels[t], self.coarse_terms.ids[t]
        return labels, terms

    def iter_batches(self, X: sp.spmatrix | np.ndarray, alignment: GeneAlignment, *, input_is_log1p: bool = False,
                     batch_size: int = 1024, progress: bool = False
                     ) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, logits, embeddings, expressed) per batch of rows; sparse batches stay sparse (never cells x 28,231
        dense). Cells with no expression in the model's genes are not run (``expressed`` False, zeros in their
        rows): there is nothing to classify."""
        prep = replace(self.preprocessing, input_is_log1p=input_is_log1p)
        starts = range(0, X.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="predicting", unit="batch")
        for s in starts:
            rows = slice(s, min(s + batch_size, X.shape[0]))
            aligned = alignment.apply(X[rows])
            expressed = prep.nonempty_rows(aligned)
            n = aligned.shape[0]
            logits = np.zeros((n, len(self.classes)), dtype=np.float32)
            z = np.zeros((n, self.latent_dim), dtype=np.float32)
            if expressed.any():
                batch_logits, batch_z = self.logits(prep(aligned[expressed], output="auto"))
                logits[expressed], z[expressed] = batch_logits.numpy(), batch_z.numpy()
            yield rows, logits, z, expressed

    def predict_cells(self, X: sp.spmatrix | np.ndarray, genes: Sequence[str], *,
                      gene_ids: Sequence[str] | None = None, input_is_log1p: bool = False, batch_size: int = 1024,
                      min_overlap: int = 1, progress: bool = False, coarse: bool = True) -> Predictions:
        """Probabilities and embeddings of every cell, streamed in batches of rows, and which cells had any
        expression in the model's genes (the others have zero rows and must not be reported as classified)."""
        alignment = self.alignment(genes, gene_ids, min_overlap)
        out = Predictions(np.zeros((X.shape[0], len(self.classes)), dtype=np.float32),
                          np.zeros((X.shape[0], self.latent_dim), dtype=np.float32),
                          np.zeros(X.shape[0], dtype=bool), np.full(X.shape[0], "no_expression", dtype=object))
        for rows, logits, z, expressed in self.iter_batches(X, alignment, input_is_log1p=input_is_log1p,
                                                            batch_size=batch_size, progress=progress):
            probs = torch.softmax(torch.from_numpy(logits) / self.temperature, dim=1).numpy()
            out.probs[rows], out.embeddings[rows], out.expressed[rows] = np.where(expressed[:, None], probs, 0), z, expressed
            status = out.status[rows]
            status[expressed] = self.status(probs[expressed], z[expressed], coarse=coarse)
        return out

    def predict(self, X: sp.spmatrix | np.ndarray, genes: Sequence[str], *, gene_ids: Sequence[str] | None = None,
                input_is_log1p: bool = False, batch_size: int = 1024, min_overlap: int = 1,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (cells x classes) and embeddings (cells x latent); refuses cells with no expression."""
        out = self.predict_cells(X, genes, gene_ids=gene_ids, input_is_log1p=input_is_log1p, batch_size=batch_size,
                                 min_overlap=min_overlap, progress=progress)
        if not out.expressed.all():
            raise EmptyCellError(np.flatnonzero(~out.expressed), X.shape[0])
        return out.probs, out.embeddings


@dataclass
class Predictions:
    probs: np.ndarray       # cells x classes (zeros where not expressed)
    embeddings: np.ndarray  # cells x latent (zeros where not expressed)
    expressed: np.ndarray   # cells: any expression in the model's genes
    status: np.ndarray      # cells: "ok", "coarse", "low_confidence", "novel" or "no_expression"
