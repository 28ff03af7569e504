"""Turning request payloads (JSON lists or .npz arrays) into a validated cells x genes CSR matrix.

Errors are :class:`~bentoml.exceptions.InvalidArgument` (HTTP 400) naming the first bad cell where there is one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from bentoml.exceptions import InvalidArgument

from scimilarity_lora.genes import GeneAlignmentError
from scimilarity_lora.serving.schemas import SparseCells
from scimilarity_lora.serving.settings import SETTINGS


def gene_error_message(e: GeneAlignmentError, n: int) -> str:
    msg = str(e)
    if "only 0 of" in msg:
        return f"none of the {n} genes in the request are in the model's gene order (symbols expected, e.g. CD3D)"
    return msg


def sparse_matrix(sparse: SparseCells) -> tuple[sp.csr_matrix, list[str]]:
    return csr_from_parts(sparse.genes, sparse.indptr, sparse.indices, sparse.data)


def csr_from_parts(genes, indptr, indices, data) -> tuple[sp.csr_matrix, list[str]]:
    """Validate CSR parts (JSON lists or .npz arrays) and build the cells x genes matrix."""
    indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    data = np.asarray(data, dtype=np.float32)
    n_genes = len(genes)
    if not 1 <= n_genes <= SETTINGS.max_genes or indptr.ndim != 1 or indices.ndim != 1 or data.ndim != 1:
        raise InvalidArgument(f"sparse: genes must hold 1 to {SETTINGS.max_genes} names and indptr/indices/data be 1-d")
    if not 2 <= len(indptr) <= SETTINGS.max_cells + 1 or len(indices) > SETTINGS.max_nnz:
        raise InvalidArgument(f"sparse: at most {SETTINGS.max_cells} cells and {SETTINGS.max_nnz} non-zeros per request")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise InvalidArgument("sparse.indptr must start at 0, never decrease, and end at len(sparse.indices)")
    if len(indices) != len(data):
        raise InvalidArgument(f"sparse.indices ({len(indices)}) and sparse.data ({len(data)}) differ in length")
    if len(indices) and (indices.max() >= n_genes or indices.min() < 0):
        bad = int(np.argmax((indices >= n_genes) | (indices < 0)))
        cell = int(np.searchsorted(indptr, bad, side="right") - 1)
        raise InvalidArgument(f"cell {cell}: a gene index is outside 0..len(sparse.genes)-1 ({n_genes})")
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_genes)), [str(g) for g in genes]


def check_rows(X: sp.csr_matrix, values: str) -> None:
    """Name the first bad cell of a sparse block (the shared validation would only say 'the input')."""
    bad = X.data < 0
    if bad.any():
        cell = int(np.searchsorted(X.indptr, int(np.argmax(bad)), side="right") - 1)
        raise InvalidArgument(f"cell {cell}: negative values; expected {values}")


@dataclass
class NpzBatch:
    X: sp.csr_matrix
    genes: list[str]
    values: str
    top_k: int


def parse_npz(body: bytes) -> NpzBatch:
    """An .npz (``np.savez``) with arrays ``genes`` (str), ``indptr``, ``indices``, ``data`` and optional scalars
    ``values`` ('counts' | 'log1p') and ``top_k``, read with ``allow_pickle=False``."""
    try:  # np.load's exceptions on malformed input are not enumerable (EOFError, ValueError, BadZipFile, ...)
        with np.load(io.BytesIO(body), allow_pickle=False) as f:
            parts = [np.asarray(f[k]) for k in ("genes", "indptr", "indices", "data")]
            values = str(f["values"]) if "values" in f.files else "counts"
            top_k = int(f["top_k"]) if "top_k" in f.files else 3
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's malformed body
        raise InvalidArgument("body must be an .npz (np.savez) with arrays genes, indptr, indices, data "
                              f"and optional values, top_k ({type(e).__name__}: {e})") from None
    if parts[0].dtype.kind != "U" or values not in ("counts", "log1p") or not 1 <= top_k <= 100:
        raise InvalidArgument("genes must be strings, values 'counts' or 'log1p', top_k 1..100")
    if any(p.dtype.kind not in "iu" for p in parts[1:3]) or parts[3].dtype.kind not in "iuf":
        raise InvalidArgument("indptr and indices must be integer arrays, data numeric")
    X, genes = csr_from_parts(*parts)
    check_rows(X, values)
    return NpzBatch(X, genes, values, top_k)
