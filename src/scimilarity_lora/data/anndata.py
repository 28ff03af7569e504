"""A LightningDataModule over an in-memory AnnData (an ``.h5ad`` file or scanpy's bundled PBMC data).

The expression matrix is aligned to the model's gene order once, as sparse CSR (no dense copy); each batch is
then normalised on the fly by :class:`~scimilarity_lora.preprocess.Preprocessing`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from scimilarity_lora.data.base import CellDataModule
from scimilarity_lora.genes import align_genes
from scimilarity_lora.labels import LabelError
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


class AnnDataModule(CellDataModule):
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
        super().__init__(label_key=label_key, donor_key=donor_key, min_cells_per_class=min_cells_per_class,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, min_gene_overlap=min_gene_overlap,
                         min_gene_overlap_fraction=min_gene_overlap_fraction, target_sum=target_sum,
                         input_is_log1p=input_is_log1p, input_format=input_format)
        self.path, self.layer = path, layer
        self.gene_symbols_key, self.gene_ids_key = gene_symbols_key, gene_ids_key
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
        gene_order = self._require_gene_order()
        adata = self.adata
        if self.label_key not in adata.obs.columns:
            raise LabelError(
                f"label column {self.label_key!r} not in obs; available columns: {list(adata.obs.columns)}"
            )
        if self.donor_key is not None and self.donor_key not in adata.obs.columns:
            raise DataError(f"donor column {self.donor_key!r} not in obs; columns: {list(adata.obs.columns)}")
        X, var_names, var = expression_matrix(adata, self.layer)
        where = f"{self.path} ({'X' if self.layer in (None, 'X') else self.layer})"
        validate_matrix(X, self.preprocessing, where)

        ids = None
        if self.gene_ids_key is not None:
            if self.gene_ids_key not in var.columns:
                raise DataError(f"gene id column {self.gene_ids_key!r} not in var; columns: {list(var.columns)}")
            ids = var[self.gene_ids_key].astype(str).tolist()
        self.alignment = align_genes(
            gene_names(var_names, var, self.gene_symbols_key), gene_order, data_gene_ids=ids,
            min_overlap=self.min_gene_overlap, min_overlap_fraction=self.min_gene_overlap_fraction,
        )
        groups = adata.obs[self.donor_key].astype(str).to_numpy() if self.donor_key is not None else None
        rows, y = self.encode_and_split(adata.obs[self.label_key].to_numpy(dtype=object), groups,
                                        adata.obs_names.to_numpy())
        aligned = self.alignment.apply(X[rows] if sp.issparse(X) else np.asarray(X)[rows])
        for name, part in self.splits.as_dict().items():
            self.datasets[name] = CellBatchDataset(aligned[part], y[part], self.preprocessing, self.input_format)

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
