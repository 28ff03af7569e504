"""Cells read in row chunks, never a whole matrix at once: an ``.h5ad`` file (its ``X``, ``raw/X`` or a layer, read
from HDF5 slice by slice) or a slice of a Census-shaped SOMA store (``cellxgene_census.open_soma(uri=...)`` and an
``obs`` value filter, read blockwise). A million-cell reference or query costs one chunk of memory plus its obs.

Used by the reference index (``inference.reference``); sparse stays sparse (CSR chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimilarity_lora.data.io import BUNDLED, DataError, check_declared_shapes, gene_names


@dataclass
class RowSource:
    """Gene names, cell table and a chunked reader of one set of cells."""

    genes: list[str]
    obs: pd.DataFrame
    read_rows: Callable[[int, int], "sp.csr_matrix | np.ndarray"]
    description: str
    gene_ids: list[str] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def chunks(self, size: int) -> Iterator[tuple[slice, "sp.csr_matrix | np.ndarray"]]:
        for s in range(0, self.n_obs, size):
            rows = slice(s, min(s + size, self.n_obs))
            yield rows, self.read_rows(rows.start, rows.stop)

    def close(self) -> None:
        for close in self.closers:
            close()

    def __enter__(self) -> "RowSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_rows(path: str, *, layer: str | None = "X", gene_symbols_key: str | None = None,
              obs_filter: str | None = None, measurement: str = "RNA", soma_layer: str = "raw") -> RowSource:
    """An ``.h5ad`` (or a bundled dataset by name), or a SOMA store directory (a Census copy or
    ``data.soma_store`` output: ``obs_filter`` selects the slice, e.g. ``"tissue_general == 'blood'"``)."""
    if path in BUNDLED:
        adata = BUNDLED[path]()
        from scimilarity_lora.data.io import expression_matrix

        X, var_names, var = expression_matrix(adata, layer)
        return RowSource(gene_names(var_names, var, gene_symbols_key), adata.obs.copy(),
                         lambda s, e: X[s:e], f"bundled {path}")
    p = Path(path).expanduser()
    if p.is_dir():
        return open_soma_rows(str(p), obs_filter=obs_filter, measurement=measurement, layer=soma_layer)
    if obs_filter:
        raise DataError("an obs filter selects a slice of a SOMA store; for an .h5ad, subset the file first")
    return open_h5ad_rows(p, layer=layer, gene_symbols_key=gene_symbols_key)


def open_h5ad_rows(path: Path, *, layer: str | None = "X", gene_symbols_key: str | None = None,
                   gene_ids_key: str | None = None) -> RowSource:
    import h5py
    from anndata.io import read_elem, sparse_dataset

    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    check_declared_shapes(path)
    try:
        f = h5py.File(path, "r")
        obs = read_elem(f["obs"])
        name = "X" if layer in (None, "X") else "raw/X" if layer == "raw" else f"layers/{layer}"
        if name not in f:
            available = list(f["layers"].keys()) if "layers" in f else []
            raise DataError(f"{path}: no {name!r} (layers: {available}, or 'X' / 'raw')")
        var = read_elem(f["raw/var"] if layer == "raw" else f["var"])
        node = f[name]
        matrix = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types for truncated or foreign files
        raise DataError(f"cannot read {path} as .h5ad (corrupt or truncated?): {type(e).__name__}: "
                        f"{str(e)[:300]}") from e

    def read(s: int, e: int) -> "sp.csr_matrix | np.ndarray":
        block = matrix[s:e]
        return block.tocsr() if sp.issparse(block) else np.asarray(block)

    if gene_ids_key is not None and gene_ids_key not in var.columns:
        f.close()
        raise DataError(f"gene id column {gene_ids_key!r} not in var; columns: {list(var.columns)}")
    ids = var[gene_ids_key].astype(str).tolist() if gene_ids_key else None
    return RowSource(gene_names(var.index, var, gene_symbols_key), obs, read, str(path), ids, closers=[f.close])


def open_soma_rows(uri: str, *, obs_filter: str | None = None, measurement: str = "RNA",
                   layer: str = "raw") -> RowSource:
    """A slice of a SOMA experiment (``census_data/homo_sapiens`` of a Census-shaped store), through the same
    ``open_soma(uri=...)`` the Census datamodule uses; X is read in blocks of rows of the slice."""
    import tiledbsoma as soma

    from scimilarity_lora.data.census import open_census

    census = open_census(uri, None)
    exp = census["census_data"]["homo_sapiens"]
    query = exp.axis_query(measurement, obs_query=soma.AxisQuery(value_filter=obs_filter) if obs_filter else None)
    obs = query.obs().concat().to_pandas()
    if obs.empty:
        census.close()
        raise DataError(f"{uri}: the obs filter {obs_filter!r} selects no cells")
    joinids = obs["soma_joinid"].to_numpy()
    var = query.var().concat().to_pandas()
    genes = var["feature_name"].astype(str).tolist()
    gene_ids = var["feature_id"].astype(str).tolist() if "feature_id" in var else None
    var_pos = pd.Index(var["soma_joinid"].to_numpy())
    X = exp.ms[measurement].X[layer]
    # the Census names no cells: its soma_joinid is the id; a store written from an AnnData keeps its obs names
    obs.index = pd.Index((obs["obs_id"] if "obs_id" in obs else obs["soma_joinid"]).astype(str), name="cell_id")

    def read(s: int, e: int) -> sp.csr_matrix:
        ids = joinids[s:e]
        table = X.read(coords=(ids,)).tables().concat()
        rows = pd.Index(ids).get_indexer(table["soma_dim_0"].to_numpy())
        cols = var_pos.get_indexer(table["soma_dim_1"].to_numpy())
        return sp.csr_matrix((table["soma_data"].to_numpy().astype(np.float32), (rows, cols)),
                             shape=(len(ids), len(genes)))

    return RowSource(genes, obs, read, f"{uri} ({obs_filter or 'all cells'})", gene_ids, closers=[census.close])
