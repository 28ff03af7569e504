"""Reading expression data from AnnData: files or bundled datasets, the matrix to use, gene names, validation.

No Lightning here: ``annotate`` and evaluation read data through this module without loading the training stack.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimilarity_lora.preprocess import Preprocessing


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
