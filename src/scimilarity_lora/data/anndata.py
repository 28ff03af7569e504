"""A LightningDataModule over an in-memory AnnData (an ``.h5ad`` file or scanpy's bundled PBMC data).

The expression matrix is aligned to the model's gene order once, as sparse CSR (no dense copy); each batch is
then normalised on the fly by :class:`~scimilarity_lora.preprocess.Preprocessing`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from scimilarity_lora.data.splits import Splits, split_cells
from scimilarity_lora.genes import GeneAlignment, align_genes
from scimilarity_lora.labels import LabelEncoder, LabelError, drop_rare_classes
from scimilarity_lora.preprocess import InvalidExpressionError, Preprocessing

log = logging.getLogger(__name__)

#: Datasets that ship inside installed packages, usable offline by name.
BUNDLED = {
    # 700 PBMCs (10x 68k PBMC subset), 765 highly variable genes, 10 labels in obs['bulk_labels'];
    # .raw holds log1p(normalised counts), .X is scaled (negative values), so we read .raw.
    "pbmc68k_reduced": lambda: __import__("scanpy").datasets.pbmc68k_reduced(),
}


class DataError(ValueError):
    """An input dataset that cannot be used as given."""


def read_anndata(path_or_name: str) -> ad.AnnData:
    """Read an ``.h5ad`` file, or a bundled dataset by name, with a clear error for missing/corrupt files."""
    if path_or_name in BUNDLED:
        return BUNDLED[path_or_name]()
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        raise DataError(f"dataset not found: {path} (bundled datasets: {sorted(BUNDLED)})")
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for truncated or non-HDF5 files
        raise DataError(f"cannot read {path} as .h5ad (corrupt or truncated?): {type(e).__name__}: {e}") from e


def expression_matrix(adata: ad.AnnData, layer: str | None) -> tuple[sp.spmatrix | np.ndarray, pd.Index, pd.DataFrame]:
    """The matrix to use (``X``, ``raw`` or a layer name) with its gene names and var table."""
    if layer in (None, "X"):
        return adata.X, adata.var_names, adata.var
    if layer == "raw":
        if adata.raw is None:
            raise DataError("layer='raw' but the AnnData has no .raw")
        return adata.raw.X, adata.raw.var_names, adata.raw.var
    if layer not in adata.layers:
        raise DataError(f"layer {layer!r} not in the AnnData; layers: {list(adata.layers)}, or use 'X' / 'raw'")
    return adata.layers[layer], adata.var_names, adata.var


def gene_names(var_names: pd.Index, var: pd.DataFrame, symbol_key: str | None) -> list[str]:
    if symbol_key is None:
        return [str(g) for g in var_names]
    if symbol_key not in var.columns:
        raise DataError(f"gene symbol column {symbol_key!r} not in var; columns: {list(var.columns)}")
    return [str(g) for g in var[symbol_key]]


def validate_matrix(X: sp.spmatrix | np.ndarray, preprocessing: Preprocessing, where: str) -> None:
    """Check a whole matrix once (vectorised on the non-zeros), before any training starts."""
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    values = np.asarray(values)
    preprocessing.validate(values, where)
    sample = values[values != 0]
    if sample.size > 1_000_000:
        sample = np.random.default_rng(0).choice(sample, 1_000_000, replace=False)
    preprocessing.check_kind(sample, where)


class CellBatchDataset(Dataset):
    """Rows of an aligned CSR matrix; ``__getitems__`` fetches and normalises a whole batch at once."""

    def __init__(self, X: sp.csr_matrix, y: np.ndarray, preprocessing: Preprocessing, input_format: str = "auto") -> None:
        self.X, self.y, self.preprocessing = X, torch.as_tensor(y, dtype=torch.long), preprocessing
        self.input_format = input_format

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        # validated once for the whole matrix in setup(); skip the per-batch check on the hot path
        return self.preprocessing(self.X[idx], validate=False, output=self.input_format), self.y[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return (x.to_dense() if hasattr(x, "to_dense") else x)[0], y[0]


def collate_batch(batch: Any) -> Any:
    """The dataset already returns whole batches."""
    return batch


class AnnDataModule(L.LightningDataModule):
    """Train/val/test splits of one AnnData, aligned to the model's gene order.

    Set :attr:`gene_order` (the model's genes) before :meth:`setup`; :meth:`data_genes` tells which genes the
    data has (used to build a stand-in encoder when no pretrained model is given).
    """

    def __init__(
        self,
        path: str = "pbmc68k_reduced",
        label_key: str = "bulk_labels",
        layer: str | None = "raw",
        input_is_log1p: bool = True,
        gene_symbols_key: str | None = None,
        gene_ids_key: str | None = None,
        donor_key: str | None = None,
        min_cells_per_class: int = 5,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        min_gene_overlap: int = 50,
        min_gene_overlap_fraction: float = 0.0,
        target_sum: float = 1e4,
        input_format: str = "auto",
    ) -> None:
        super().__init__()
        if input_format not in ("auto", "dense", "sparse"):
            raise ValueError(f"data.input_format must be auto, dense or sparse, got {input_format!r}")
        self.input_format = input_format
        self.path, self.label_key, self.layer = path, label_key, layer
        self.gene_symbols_key, self.gene_ids_key, self.donor_key = gene_symbols_key, gene_ids_key, donor_key
        self.min_cells_per_class = min_cells_per_class
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.min_gene_overlap, self.min_gene_overlap_fraction = min_gene_overlap, min_gene_overlap_fraction
        self.preprocessing = Preprocessing(target_sum=target_sum, input_is_log1p=input_is_log1p)
        self.gene_order: list[str] | None = None
        self.labels: LabelEncoder | None = None
        self.alignment: GeneAlignment | None = None
        self.splits: Splits | None = None
        self.datasets: dict[str, CellBatchDataset] = {}
        self._adata: ad.AnnData | None = None

    # -- inputs ----------------------------------------------------------------------------------------------
    @property
    def adata(self) -> ad.AnnData:
        if self._adata is None:
            self._adata = read_anndata(self.path)
        return self._adata

    def data_genes(self) -> list[str]:
        _, var_names, var = expression_matrix(self.adata, self.layer)
        return gene_names(var_names, var, self.gene_symbols_key)

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.gene_order is None:
            raise RuntimeError("AnnDataModule.gene_order must be set to the model's genes before setup()")
        adata = self.adata
        if self.label_key not in adata.obs.columns:
            raise LabelError(
                f"label column {self.label_key!r} not in obs; available columns: {list(adata.obs.columns)}"
            )
        X, var_names, var = expression_matrix(adata, self.layer)
        where = f"{self.path} ({'X' if self.layer in (None, 'X') else self.layer})"
        validate_matrix(X, self.preprocessing, where)

        labels_raw = adata.obs[self.label_key]
        has_label = labels_raw.notna().to_numpy()
        if not has_label.all():
            log.warning("dropping %d cells with no %r label", int((~has_label).sum()), self.label_key)
        labels = labels_raw.astype(str).to_numpy()
        keep, dropped = drop_rare_classes(labels[has_label], self.min_cells_per_class)
        if dropped:
            log.warning("dropping classes with fewer than %d cells: %s", self.min_cells_per_class, dropped)
        rows = np.flatnonzero(has_label)[keep]
        if rows.size == 0:
            raise LabelError(f"no cells left after dropping rare/missing labels in {self.label_key!r}")

        ids = None
        if self.gene_ids_key is not None:
            if self.gene_ids_key not in var.columns:
                raise DataError(f"gene id column {self.gene_ids_key!r} not in var; columns: {list(var.columns)}")
            ids = var[self.gene_ids_key].astype(str).tolist()
        self.alignment = align_genes(
            gene_names(var_names, var, self.gene_symbols_key), self.gene_order, data_gene_ids=ids,
            min_overlap=self.min_gene_overlap, min_overlap_fraction=self.min_gene_overlap_fraction,
        )
        X_rows = X[rows] if sp.issparse(X) else np.asarray(X)[rows]
        aligned = self.alignment.apply(X_rows)

        self.labels = LabelEncoder.fit(labels[rows])
        y = self.labels.encode(labels[rows])
        groups = None
        if self.donor_key is not None:
            if self.donor_key not in adata.obs.columns:
                raise DataError(f"donor column {self.donor_key!r} not in obs; columns: {list(adata.obs.columns)}")
            groups = adata.obs[self.donor_key].astype(str).to_numpy()[rows]
        self.splits = split_cells(y, groups=groups, val_fraction=self.val_fraction,
                                  test_fraction=self.test_fraction, seed=self.seed)
        self.cell_ids = adata.obs_names.to_numpy()[rows]
        for name, part in self.splits.as_dict().items():
            self.datasets[name] = CellBatchDataset(aligned[part], y[part], self.preprocessing, self.input_format)
        log.info(
            "data %s: %d cells, %d classes; split train/val/test = %d/%d/%d (%s)", self.path, rows.size,
            len(self.labels), *(len(p) for p in self.splits.as_dict().values()),
            f"by donor {self.donor_key!r}" if groups is not None else "stratified by label",
        )

    def save_splits(self, path: str | Path) -> Path:
        """Record which cell went to which split (``cell_id,split``)."""
        assert self.splits is not None, "call setup() first"
        frames = [pd.DataFrame({"cell_id": self.cell_ids[p], "split": name}) for name, p in self.splits.as_dict().items()]
        path = Path(path)
        pd.concat(frames).to_csv(path, index=False)
        return path

    def summary(self) -> dict:
        assert self.splits is not None and self.alignment is not None and self.labels is not None
        return {
            "gene_overlap": self.alignment.summary(),
            "n_cells": {k: int(len(v)) for k, v in self.splits.as_dict().items()},
            "classes": list(self.labels.classes),
        }

    def train_labels(self) -> np.ndarray:
        """Encoded labels of the training split (for class weights)."""
        return self.datasets["train"].y.numpy()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=collate_batch, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


__all__ = ["AnnDataModule", "DataError", "InvalidExpressionError", "read_anndata"]
