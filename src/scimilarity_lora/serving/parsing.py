"""Turning request payloads (JSON lists or .npz arrays) into a validated cells x genes CSR matrix.

Errors are :class:`~bentoml.exceptions.InvalidArgument` (HTTP 400) naming the first bad cell where there is one.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from bentoml.exceptions import InvalidArgument

from scimilarity_lora.genes import GeneAlignmentError
from scimilarity_lora.serving.schemas import FLOAT32_MAX, SparseCells
from scimilarity_lora.serving.settings import SETTINGS, max_npz_bytes

if TYPE_CHECKING:
    from scimilarity_lora.serving.fast_json import SparseArrays


def gene_error_message(e: GeneAlignmentError, n: int) -> str:
    msg = str(e)
    if "only 0 of" in msg and "panel genes" not in msg:  # a panel model says which genes it sees itself
        return f"none of the {n} genes in the request are in the model's gene order (symbols expected, e.g. CD3D)"
    return msg


def sparse_matrix(sparse: "SparseCells | SparseArrays") -> tuple[sp.csr_matrix, list[str]]:
    """From the pydantic block (lists) or :class:`~.fast_json.SparseArrays` (arrays): the same checks either way."""
    return csr_from_parts(sparse.genes, sparse.indptr, sparse.indices, sparse.data)


def csr_from_parts(genes, indptr, indices, data) -> tuple[sp.csr_matrix, list[str]]:
    """Validate CSR parts (JSON lists or .npz arrays) and build the cells x genes matrix."""
    try:
        indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)
        data = np.asarray(data, dtype=np.float64)
    except (OverflowError, ValueError, TypeError) as e:
        raise InvalidArgument(f"sparse: indptr and indices must be integers within int64, data numbers ({e})") from None
    if np.ndim(genes) != 1 or indptr.ndim != 1 or indices.ndim != 1 or data.ndim != 1:
        raise InvalidArgument("sparse: genes, indptr, indices and data must each be a 1-d array (a list)")
    n_genes = len(genes)
    if not 1 <= n_genes <= SETTINGS.max_genes:
        raise InvalidArgument(f"sparse: genes must hold 1 to {SETTINGS.max_genes} names")
    if not 2 <= len(indptr) <= SETTINGS.max_cells + 1 or len(indices) > SETTINGS.max_nnz:
        raise InvalidArgument(f"sparse: at most {SETTINGS.max_cells} cells and {SETTINGS.max_nnz} non-zeros per request")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise InvalidArgument("sparse.indptr must start at 0, never decrease, and end at len(sparse.indices)")
    if len(indices) != len(data):
        raise InvalidArgument(f"sparse.indices ({len(indices)}) and sparse.data ({len(data)}) differ in length")
    if len(indices) and (indices.max() >= n_genes or indices.min() < 0):
        raise InvalidArgument(f"cell {_cell_of(indptr, (indices >= n_genes) | (indices < 0))}: a gene index is "
                              f"outside 0..len(sparse.genes)-1 ({n_genes})")
    check_values(data, indptr)
    X = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(len(indptr) - 1, n_genes))
    if not X.has_sorted_indices:
        X = X.sorted_indices()
    if len(X.indices) > 1:  # sorted within rows: a repeat is an equal neighbour that is not a row's first entry
        starts = np.zeros(len(X.indices), dtype=bool)
        starts[X.indptr[:-1][np.diff(X.indptr) > 0]] = True
        repeated = np.zeros(len(X.indices), dtype=bool)
        repeated[1:] = (np.diff(X.indices) == 0) & ~starts[1:]
        if repeated.any():
            raise InvalidArgument(f"cell {_cell_of(X.indptr, repeated)}: a gene index appears twice in one cell "
                                  "(give each gene once; values are not summed)")
    return X, [str(g) for g in genes]


def cells_matrix(expressions: list[dict[str, float]]) -> tuple[sp.csr_matrix, list[str]]:
    """The list form's cells as one cells x genes CSR over the union of their genes (in order of first appearance),
    so a 10,000-cell request is aligned and normalised once rather than cell by cell."""
    column: dict[str, int] = {}
    indices: list[int] = []
    data: list[float] = []
    indptr = [0]
    for expression in expressions:
        indices.extend(column.setdefault(gene, len(column)) for gene in expression)
        data.extend(expression.values())
        indptr.append(len(indices))
    X = sp.csr_matrix((np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int64),
                       np.asarray(indptr, dtype=np.int64)), shape=(len(expressions), len(column)))
    return X, list(column)


def _cell_of(indptr: np.ndarray, bad: np.ndarray) -> int:
    return int(np.searchsorted(indptr, int(np.argmax(bad)), side="right") - 1)


def check_values(data: np.ndarray, indptr: np.ndarray | None = None) -> None:
    """Finite, non-negative, within float32 (named by cell when ``indptr`` is given)."""
    where = (lambda bad: f"cell {_cell_of(indptr, bad)}: ") if indptr is not None else (lambda bad: "")
    bad = ~np.isfinite(data)
    if bad.any():
        raise InvalidArgument(f"{where(bad)}NaN or infinite values")
    bad = data < 0
    if bad.any():
        raise InvalidArgument(f"{where(bad)}negative values; expected counts or log1p-normalised values")
    bad = data > FLOAT32_MAX
    if bad.any():
        raise InvalidArgument(f"{where(bad)}a value above {FLOAT32_MAX:.4g} (float32's largest) would overflow")


@dataclass
class NpzBatch:
    X: sp.csr_matrix
    genes: list[str]
    values: str
    top_k: int
    force_label: bool = False


def parse_npz(body: bytes) -> NpzBatch:
    """An .npz (``np.savez``) with arrays ``genes`` (str), ``indptr``, ``indices``, ``data`` and optional scalars
    ``values`` ('counts' | 'log1p') and ``top_k``, read with ``allow_pickle=False``. The archive's declared sizes
    are checked before anything is decompressed: a small body cannot expand into gigabytes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise InvalidArgument("body is not an .npz file (a zip archive written by np.savez) with arrays genes, "
                              "indptr, indices, data and optional values, top_k") from None
    declared = sum(m.file_size for m in members)
    if declared > max_npz_bytes(SETTINGS):
        raise InvalidArgument(f"the .npz declares {declared} bytes uncompressed, more than a request within the "
                              f"limits can need ({max_npz_bytes(SETTINGS)})")
    try:  # np.load's exceptions on malformed members are not enumerable (EOFError, ValueError, BadZipFile, ...)
        with np.load(io.BytesIO(body), allow_pickle=False) as f:
            missing = [k for k in ("genes", "indptr", "indices", "data") if k not in f.files]
            if missing:
                raise InvalidArgument(f"the .npz lacks the array(s) {missing}")
            parts = [np.asarray(f[k]) for k in ("genes", "indptr", "indices", "data")]
            values = np.asarray(f["values"]) if "values" in f.files else np.asarray("counts")
            top_k = np.asarray(f["top_k"]) if "top_k" in f.files else np.asarray(3)
            force = np.asarray(f["force_label"]) if "force_label" in f.files else np.asarray(False)
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's malformed body
        reason = "an array holds Python objects (not allowed)" if "allow_pickle" in str(e) else type(e).__name__
        raise InvalidArgument(f"the .npz could not be read: {reason}") from None
    if parts[0].ndim != 1 or parts[0].dtype.kind != "U":
        raise InvalidArgument("genes must be a 1-d array of strings")
    if values.ndim != 0 or str(values) not in ("counts", "log1p"):
        raise InvalidArgument("values must be the string 'counts' or 'log1p'")
    if top_k.ndim != 0 or top_k.dtype.kind not in "iu" or not 1 <= int(top_k) <= 100:
        raise InvalidArgument("top_k must be one integer from 1 to 100")
    if force.ndim != 0 or force.dtype.kind != "b":
        raise InvalidArgument("force_label must be one boolean")
    if any(p.dtype.kind not in "iu" for p in parts[1:3]) or parts[3].dtype.kind not in "iuf":
        raise InvalidArgument("indptr and indices must be integer arrays, data numeric")
    X, genes = csr_from_parts(*parts)
    return NpzBatch(X, genes, str(values), int(top_k), bool(force))
