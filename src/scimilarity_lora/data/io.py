"""Reading expression data from AnnData: files or bundled datasets, the matrix to use, gene names, validation.

No Lightning here: ``annotate`` and evaluation read data through this module without loading the training stack.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimilarity_lora.preprocess import InvalidExpressionError, Preprocessing


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
    check_declared_shapes(path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for truncated or non-HDF5 files
        raise DataError(f"cannot read {path} as .h5ad (corrupt or truncated?): {type(e).__name__}: "
                        f"{str(e)[:300]}") from e
    for what, names in (("gene", adata.var_names), ("cell", adata.obs_names)):
        bad = [n for n in names if isinstance(n, str) and _undecodable(n)]
        if bad:
            raise DataError(f"{path}: {len(bad)} {what} names are not valid UTF-8 text (e.g. {bad[0]!r})")
    return adata


def _undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


#: a declared matrix needing more than this share of the available memory is refused before it is read
MEMORY_SHARE = 0.8


def check_declared_shapes(path: Path) -> None:
    """Read only the file's metadata (h5py) and refuse, before anything is allocated, a file whose matrices do not
    match its obs/var lengths, or whose dense matrices need more memory than the machine has (a 153 kB file can
    declare a compressed 10^7 x 765 dense X: 28.5 GiB when read)."""
    import h5py
    import psutil

    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001 - not HDF5 at all: read_h5ad's own error says so below
        raise DataError(f"cannot read {path} as .h5ad (corrupt or truncated? not HDF5?): {type(e).__name__}: "
                        f"{str(e)[:200]}") from e
    with f:
        n_obs, n_vars = _frame_length(f, "obs"), _frame_length(f, "var")
        available = psutil.virtual_memory().available
        for name in ("X", *(f"layers/{k}" for k in (f["layers"].keys() if "layers" in f else ()))):
            if name not in f:
                continue
            shape, nbytes = _declared(f[name])
            if shape is None:
                continue
            if n_obs is not None and n_vars is not None and tuple(shape) != (n_obs, n_vars):
                raise DataError(f"{path}: {name} is {shape[0]:,} x {shape[1]:,} but obs has {n_obs:,} cells and var "
                                f"{n_vars:,} genes; the file is inconsistent")
            if nbytes > MEMORY_SHARE * available:
                raise DataError(f"{path}: {name} is stored dense, {shape[0]:,} x {shape[1]:,} "
                                f"({nbytes / 2**30:.1f} GiB when read), more than the {available / 2**30:.1f} GiB of "
                                "memory available; store it sparse (CSR) or split the file")


def _frame_length(f, key: str) -> int | None:
    group = f.get(key)
    if group is None or not hasattr(group, "attrs") or "_index" not in group.attrs:
        return None
    index = group.get(group.attrs["_index"])
    return int(index.shape[0]) if index is not None and hasattr(index, "shape") else None


def _declared(node) -> tuple[tuple[int, int] | None, int]:
    """(shape, bytes needed in memory) of a dense dataset or a sparse group, from metadata only."""
    import h5py

    if isinstance(node, h5py.Dataset):
        if node.ndim != 2:
            return None, 0
        return tuple(int(n) for n in node.shape), int(np.prod(node.shape, dtype=np.float64) * node.dtype.itemsize)
    shape = node.attrs.get("shape")
    if shape is None or "data" not in node:
        return None, 0
    nnz = int(node["data"].shape[0])
    return tuple(int(n) for n in shape), nnz * (node["data"].dtype.itemsize + 8)


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
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool) or np.issubdtype(values.dtype, np.complexfloating):
        raise InvalidExpressionError(f"{where}: expression values must be numbers, but the matrix holds "
                                     f"{values.dtype} values")
    preprocessing.validate(values, where)
    sample = values[values != 0]
    if sample.size > 1_000_000:
        sample = np.random.default_rng(0).choice(sample, 1_000_000, replace=False)
    preprocessing.check_kind(sample, where)
