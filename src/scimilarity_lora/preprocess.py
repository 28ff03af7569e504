"""Counts -> the encoder's input, exactly as SCimilarity preprocesses: align, normalise total to 1e4, log1p.

One implementation, applied per batch on sparse rows (never a dense copy of a whole dataset), and shared by
training, evaluation, annotation and serving. The settings travel inside every checkpoint
(:meth:`Preprocessing.to_dict`), so a served model applies what it was trained with.

A gene panel (``gene_panel``: positions in the model's gene order, chosen on the training cells by
:func:`highly_variable_panel`) keeps only those genes' values after normalisation: depth still comes from every
gene, as SCimilarity computes it, and the model never sees the rest (the study-specific noise a classifier trained
on one study would otherwise learn). It travels in the checkpoint like the other settings.

Log-normalised input (e.g. an AnnData whose ``.raw`` holds ``log1p(normalize_total(counts))``) is accepted with
``input_is_log1p=True``: ``expm1`` recovers per-cell-scaled counts, and because total-count normalisation is
invariant to a per-cell scale, re-normalising them after alignment gives what SCimilarity would compute from the
original counts restricted to the same genes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scimilarity_lora.model.sparse import SparseBatch
from scimilarity_lora.model.sparse import choose as choose_sparse

#: log1p(1e4) ~ 9.21: log-normalised values above this bound cannot come from normalize_total(1e4) + log1p.
_MAX_PLAUSIBLE_LOG1P = 15.0


class InvalidExpressionError(ValueError):
    """Expression values that cannot be preprocessed (NaN, inf, negative, or the wrong kind of values)."""


@dataclass(frozen=True)
class Preprocessing:
    target_sum: float = 1e4
    input_is_log1p: bool = False
    #: positions (in the model's gene order, ascending) of the only genes the model sees; None: every gene
    gene_panel: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gene_panel"] = None if self.gene_panel is None else list(self.gene_panel)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        panel = d.get("gene_panel")
        return cls(target_sum=float(d["target_sum"]), input_is_log1p=bool(d["input_is_log1p"]),
                   gene_panel=None if panel is None else tuple(int(i) for i in panel))

    def panel_mask(self, n_genes: int) -> np.ndarray | None:
        """Boolean mask over the model's ``n_genes`` genes: the panel (None without one)."""
        if self.gene_panel is None:
            return None
        mask = np.zeros(n_genes, dtype=bool)
        mask[np.asarray(self.gene_panel, dtype=np.int64)] = True
        return mask

    # -- validation --------------------------------------------------------------------------------------
    def validate(self, values: np.ndarray, where: str = "input") -> None:
        """Refuse values that would silently produce a wrong embedding."""
        if values.size == 0:
            return
        if not np.all(np.isfinite(values)):
            n = int((~np.isfinite(values)).sum())
            raise InvalidExpressionError(f"{where} contains {n} NaN or infinite values")
        if values.min() < 0:
            n = int((values < 0).sum())
            raise InvalidExpressionError(
                f"{where} contains {n} negative values; expected raw counts or log1p-normalised counts "
                "(scaled/centred data such as adata.X after sc.pp.scale cannot be used)"
            )
        if self.input_is_log1p and values.max() > _MAX_PLAUSIBLE_LOG1P:
            raise InvalidExpressionError(
                f"{where} was declared log-normalised (input_is_log1p=True) but has values up to "
                f"{values.max():.3g}, which look like raw counts; set input_is_log1p=False"
            )

    def check_kind(self, values: np.ndarray, where: str = "input") -> None:
        """Dataset-level check that declared raw counts are not already log-normalised.

        Raw counts are integers (or near-integers for some quantifiers) with a large range; log1p data are mostly
        fractional and small. Only run on whole datasets (a sample of their non-zeros), not single cells.
        """
        self.validate(values, where)
        if self.input_is_log1p or values.size < 100:
            return
        frac_nonint = float(np.mean(np.abs(values - np.round(values)) > 1e-3))
        if frac_nonint > 0.5 and values.max() < _MAX_PLAUSIBLE_LOG1P:
            raise InvalidExpressionError(
                f"{where} was declared raw counts but {frac_nonint:.0%} of its non-zero values are fractional "
                f"and the maximum is {values.max():.3g}: it looks log-normalised. "
                "Set input_is_log1p=True (or point at the layer holding raw counts)"
            )

    # -- transformation ----------------------------------------------------------------------------------
    def __call__(self, aligned: sp.csr_matrix, validate: bool = True,
                 output: str = "dense") -> "torch.Tensor | SparseBatch":
        """Cells x model-genes CSR (already aligned) -> encoder inputs.

        ``output``: ``"dense"`` (a float32 tensor), ``"sparse"`` (a :class:`SparseBatch` for the encoder's sparse
        first layer), or ``"auto"`` (sparse when the batch is sparse enough to be faster, see :mod:`sparse`).

        Totals and scaling are computed in float64, so neither a tiny total (1e-40) nor a huge one (2 x 2e38)
        over- or underflows float32. A cell with no expression in the model's genes has no composition to
        normalise and is refused (:class:`EmptyCellError`, naming the cells): it must never get a made-up label.
        """
        if validate:
            self.validate(aligned.tocsr().data)
        X = self._counts(aligned)
        totals = np.asarray(X.sum(axis=1)).ravel()
        # a cell with nothing in the panel is refused where answers are given (validate); training batches
        # (validate=False) keep it as a zero row: a thinned or rare cell must not stop a run
        empty = np.flatnonzero(~self.nonempty_rows(X) if validate else ~(totals > 0))
        if empty.size:
            raise EmptyCellError(empty, X.shape[0])
        self._log_normalise(X, totals)
        if self.gene_panel is not None:  # after normalising: depth comes from every gene
            X.data[~self.panel_mask(X.shape[1])[X.indices]] = 0
            X.eliminate_zeros()
        X = X.astype(np.float32)
        if not np.all(np.isfinite(X.data)):  # unreachable for finite, non-negative input; never hand on NaN
            raise InvalidExpressionError("normalisation produced non-finite values")
        if output == "sparse" or (output == "auto" and choose_sparse(X)):
            return SparseBatch.from_csr(X)
        return torch.from_numpy(X.toarray())

    def _counts(self, aligned: sp.csr_matrix) -> sp.csr_matrix:
        """A float64 copy on the counts scale (``expm1`` of log1p input: per-cell-scaled counts)."""
        X = aligned.tocsr().astype(np.float64, copy=True)
        if self.input_is_log1p:
            np.expm1(X.data, out=X.data)
        return X

    def _log_normalise(self, X: sp.csr_matrix, totals: np.ndarray) -> None:
        """In place: each row scaled to ``target_sum`` by its total, then log1p (rows with a total > 0)."""
        X.data *= np.repeat(self.target_sum / totals, np.diff(X.indptr))
        np.log1p(X.data, out=X.data)

    def nonempty_rows(self, aligned: sp.csr_matrix) -> np.ndarray:
        """Which cells have any expression in the model's genes, within its panel if it has one (the ones
        :meth:`__call__` accepts: a cell with nothing in the panel would get a made-up answer)."""
        X = aligned.tocsr()
        if self.gene_panel is not None:
            X = X[:, np.asarray(self.gene_panel, dtype=np.int64)]
        totals = np.asarray(X.astype(np.float64).sum(axis=1)).ravel()
        return totals > 0


class EmptyCellError(InvalidExpressionError):
    """Cells with zero total expression over the model's genes (nothing to normalise, nothing to classify)."""

    def __init__(self, rows: np.ndarray, n_cells: int) -> None:
        self.rows = np.asarray(rows)
        shown = ", ".join(map(str, self.rows[:5])) + (", ..." if len(self.rows) > 5 else "")
        which = f"cell {shown}" if n_cells > 1 else "the cell"
        super().__init__(f"{which}: no expression in the model's genes (total 0); such a cell cannot be classified"
                         + (f" ({len(self.rows)} of {n_cells} cells)" if n_cells > 1 else ""))


def highly_variable_panel(aligned: sp.csr_matrix, preprocessing: Preprocessing, n_genes: int) -> tuple[int, ...]:
    """The ``n_genes`` most variable of the model's genes over these cells (positions, ascending): scanpy's
    ``highly_variable_genes`` (Seurat's normalised dispersion) on the cells normalised exactly as the model sees
    them. Every gene the cells express is kept when they express no more than ``n_genes``."""
    import anndata as ad
    import scanpy as sc

    X = preprocessing._counts(aligned)
    totals = np.asarray(X.sum(axis=1)).ravel()
    X = X[totals > 0]
    preprocessing._log_normalise(X, totals[totals > 0])
    expressed = np.flatnonzero(np.bincount(X.indices, minlength=X.shape[1]) > 0)
    if len(expressed) <= n_genes:
        return tuple(int(i) for i in expressed)
    a = ad.AnnData(X[:, expressed].astype(np.float32))
    sc.pp.highly_variable_genes(a, n_top_genes=n_genes, flavor="seurat")
    return tuple(int(i) for i in expressed[a.var["highly_variable"].to_numpy()])


def marker_panel(aligned: sp.csr_matrix, labels: np.ndarray, preprocessing: Preprocessing,
                 n_genes: int) -> tuple[int, ...]:
    """About ``n_genes`` marker genes of the labelled cells (positions, ascending), chosen the way SingleR chooses
    them: for every ordered pair of classes (a, b), the model's genes ranked by how much higher a's mean
    log-normalised expression is than b's (SingleR's classic markers use medians, which are mostly zero in single
    cells); the panel is the union of each pair's top k, k grown until it holds ``n_genes``.

    Pairs, not one class against the rest: every pair of classes, a rare one included (an 8-cell naive CD4 T class
    beside 240 dendritic cells), gets the genes that tell it apart. Study 3 (three seeds) found it the best panel
    within a study and slightly below the most variable genes across studies (a label's markers include what the
    reference's own sorts and runs differ by), so :func:`highly_variable_panel` stays the default."""
    X = preprocessing._counts(aligned)
    totals = np.asarray(X.sum(axis=1)).ravel()
    keep = totals > 0
    X, labels = X[keep], np.asarray(labels)[keep]
    preprocessing._log_normalise(X, totals[keep])
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("a marker gene panel needs at least two classes among the training cells")
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(classes), len(codes)))
    means = np.asarray((onehot @ X).todense()) / np.bincount(codes)[:, None]  # classes x genes
    n_total = means.shape[1]
    never = np.iinfo(np.int64).max  # the rank of a gene no pair puts higher in its first class
    best_rank = np.full(n_total, never, dtype=np.int64)
    best_gap = np.zeros(n_total)
    for a in range(len(classes)):
        gaps = means[a][None, :] - np.delete(means, a, axis=0)  # (classes - 1) x genes: a above each other
        order = np.argsort(-gaps, axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(n_total)[None, :], axis=1)
        ranks = np.where(gaps > 0, ranks, never)  # only genes higher in a count for a
        best_rank = np.minimum(best_rank, ranks.min(axis=0))
        best_gap = np.maximum(best_gap, gaps.max(axis=0))
    candidates = np.flatnonzero(best_rank < never)
    chosen = candidates[np.lexsort((-best_gap[candidates], best_rank[candidates]))][:n_genes]
    return tuple(int(i) for i in np.sort(chosen))
