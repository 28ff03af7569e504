"""What every data source shares: the model's gene order, label encoding, the rare-class policy, splits and
preprocessing. :class:`~scimilarity_lora.data.anndata.AnnDataModule` and
:class:`~scimilarity_lora.data.census.CensusDataModule` differ only in where cells come from."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd

from scimilarity_lora.data.splits import Splits, split_cells
from scimilarity_lora.genes import GeneAlignment, symbol_aliases
from scimilarity_lora.labels import LabelEncoder, LabelError, drop_rare_classes
from scimilarity_lora.preprocess import Preprocessing

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "dense", "sparse")


class CellDataModule(L.LightningDataModule):
    #: the column naming cells in ``splits.csv``
    id_column = "cell_id"

    def __init__(self, *, label_key: str, donor_key: str | None, min_cells_per_class: int, val_fraction: float,
                 test_fraction: float, seed: int, batch_size: int, num_workers: int, min_gene_overlap: int,
                 min_gene_overlap_fraction: float, target_sum: float, input_is_log1p: bool,
                 input_format: str, gene_aliases: bool = True, exclude_classes: list[str] | None = None,
                 ontology_key: str | None = None, label_to_ontology: dict[str, str] | str | None = None) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"data.input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.label_key, self.donor_key, self.min_cells_per_class = label_key, donor_key, min_cells_per_class
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.batch_size, self.num_workers, self.input_format = batch_size, num_workers, input_format
        self.min_gene_overlap, self.min_gene_overlap_fraction = min_gene_overlap, min_gene_overlap_fraction
        self.preprocessing = Preprocessing(target_sum=target_sum, input_is_log1p=input_is_log1p)
        self.gene_aliases = gene_aliases
        self.n_cells_without_expression = 0
        self.exclude_classes = [str(c) for c in (exclude_classes or [])]
        #: where each class's Cell Ontology id comes from: an obs column of CL ids, and/or an explicit mapping
        #: (a dict, a ``label,cl_id`` CSV or ``packaged:<name>``), which wins
        self.ontology_key = ontology_key
        self.label_to_ontology = label_to_ontology
        self.observed_terms: dict[str, str] = {}
        self.gene_order: list[str] | None = None  # set to the model's genes before setup()
        self.labels: LabelEncoder | None = None
        self.alignment: GeneAlignment | None = None
        self.splits: Splits | None = None
        self.cell_ids: np.ndarray | None = None
        self.datasets: dict = {}
        self._y: np.ndarray | None = None

    def aliases(self) -> dict[str, str] | None:
        """The old/alias symbol table when ``data.gene_aliases`` is on (see :func:`~scimilarity_lora.genes.align_genes`)."""
        return symbol_aliases() if self.gene_aliases else None

    def _require_gene_order(self) -> list[str]:
        if self.gene_order is None:
            raise RuntimeError(f"{type(self).__name__}.gene_order must be set to the model's genes before setup()")
        return self.gene_order

    def encode_and_split(self, labels: np.ndarray, groups: np.ndarray | None, ids: np.ndarray,
                         expressed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Drop unlabelled cells, cells with no expression in the model's genes and rare classes (all logged), fit
        the label encoding, split.

        Returns the kept positions and their encoded labels; ``self.splits`` indexes into the kept cells. A pure
        function of (labels, groups, seed), so every DDP rank computes the same split.
        """
        has_label = pd.notna(labels)
        if not has_label.all():
            log.warning("dropping %d cells with no %r label", int((~has_label).sum()), self.label_key)
        if expressed is not None and not np.all(expressed):
            self.n_cells_without_expression = int((~expressed).sum())
            log.warning("dropping %d cells with no expression in the model's genes (total 0 after alignment): "
                        "nothing to learn from; e.g. %s", self.n_cells_without_expression,
                        list(np.asarray(ids)[~expressed][:5]))
            has_label = has_label & expressed
        labels = np.asarray([str(x) for x in labels], dtype=object)
        if self.exclude_classes:  # held out on purpose, e.g. to measure how the model flags unseen types
            excluded = np.isin(labels, self.exclude_classes) & has_label
            log.warning("excluding %d cells of classes %s (data.exclude_classes)", int(excluded.sum()),
                        self.exclude_classes)
            has_label = has_label & ~excluded
        keep, dropped = drop_rare_classes(labels[has_label], self.min_cells_per_class)
        if dropped:
            log.warning("dropping classes with fewer than %d cells: %s", self.min_cells_per_class, dropped)
        rows = np.flatnonzero(has_label)[keep]
        if rows.size == 0:
            raise LabelError(f"no cells left after dropping rare/missing labels in {self.label_key!r}")
        self.labels = LabelEncoder.fit(labels[rows])
        y = self.labels.encode(labels[rows])
        self.splits = split_cells(y, groups=None if groups is None else np.asarray(groups)[rows],
                                  val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed)
        self.cell_ids, self._y = np.asarray(ids)[rows], y
        log.info("%d cells, %d classes; split train/val/test = %d/%d/%d (%s)", rows.size, len(self.labels),
                 *(len(p) for p in self.splits.as_dict().values()),
                 f"by donor {self.donor_key!r}" if groups is not None else "stratified by label")
        return rows, y

    def class_terms(self) -> dict[str, str | None]:
        """CL id per class (None: unmapped, allowed and reported), validated against the shipped ontology."""
        from scimilarity_lora.data.ontology import class_terms_from, read_label_map

        terms = class_terms_from(self.labels.classes, read_label_map(self.label_to_ontology), self.observed_terms)
        unmapped = [c for c, t in terms.items() if not t]
        if unmapped and len(unmapped) < len(terms):
            log.warning("no Cell Ontology id for classes %s (data.ontology_key / data.label_to_ontology): they are "
                        "matched by name only and never answered coarsely", unmapped)
        return terms

    def split_ids(self) -> dict[str, np.ndarray]:
        return {name: self.cell_ids[part] for name, part in self.splits.as_dict().items()}

    def save_splits(self, path: str | Path) -> Path:
        """Record which cell went to which split (``<id_column>,split``)."""
        frames = [pd.DataFrame({self.id_column: ids, "split": name}) for name, ids in self.split_ids().items()]
        path = Path(path)
        pd.concat(frames).to_csv(path, index=False)
        return path

    def summary(self) -> dict:
        return {
            "gene_overlap": self.alignment.summary(),
            "n_cells_without_expression": self.n_cells_without_expression,
            "n_cells": {k: int(len(v)) for k, v in self.splits.as_dict().items()},
            "classes": list(self.labels.classes),
        }

    def seen_genes(self) -> np.ndarray:
        """Boolean mask over the model's genes: which ones the training data can show the model (see
        ``lora.unseen_genes``). Subclasses refine it; here, the genes the data provides at all."""
        seen = np.zeros(self.alignment.n_model_genes, dtype=bool)
        seen[self.alignment.target_index] = True
        return seen

    def train_labels(self) -> np.ndarray:
        """Encoded labels of the training split (for class weights)."""
        return self._y[self.splits.train]
