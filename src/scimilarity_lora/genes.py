"""The model's gene order, and aligning any gene list to it.

This is the only place where genes are matched to the model's input columns. Training (AnnData and Census),
evaluation, annotation and serving all go through :class:`GeneAlignment`, so they cannot disagree on which
column of the encoder a gene feeds.

SCimilarity's own ``align_dataset`` matches by symbol, zero-fills the model genes the data lacks and drops the
rest; we do the same, additionally accept Ensembl ids through a ``var`` column, and rescue genes that the data
names by an old or alias HGNC symbol (``TCEB2`` for the model's ``ELOB``) through the packaged table
(``resources/README.md`` gives its provenance and rules).

SCimilarity's 28,231-gene order ships with the package: :func:`scimilarity_gene_order`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


class GeneAlignmentError(ValueError):
    """The data's genes cannot be aligned to the model's gene order."""


def read_gene_order(path: str | Path) -> list[str]:
    """Read SCimilarity's ``gene_order.tsv``: one gene symbol per line, in encoder input order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene order file not found: {path}")
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not genes:
        raise GeneAlignmentError(f"gene order file is empty: {path}")
    dupes = [g for g, n in Counter(genes).items() if n > 1]
    if dupes:
        raise GeneAlignmentError(f"gene order file {path} lists genes more than once: {dupes[:10]}")
    return genes


#: ``model.gene_order`` value naming the packaged SCimilarity order (rather than a file path)
SCIMILARITY_GENE_ORDER = "scimilarity"


def _resource(name: str) -> Path:
    return Path(str(resources.files("scimilarity_lora") / "resources" / name))


@lru_cache(maxsize=1)
def _packaged_gene_order() -> tuple[str, ...]:
    return tuple(read_gene_order(_resource("scimilarity_gene_order.tsv")))


def scimilarity_gene_order() -> list[str]:
    """SCimilarity's 28,231 genes in encoder input order (package data, identical to ``model_v1.1``'s file)."""
    return list(_packaged_gene_order())


def resolve_gene_order(spec: str | Path) -> list[str]:
    """``"scimilarity"`` (the packaged order) or a path to a ``gene_order.tsv``."""
    return scimilarity_gene_order() if str(spec) == SCIMILARITY_GENE_ORDER else read_gene_order(spec)


@lru_cache(maxsize=1)
def symbol_aliases() -> dict[str, str]:
    """Old/alias HGNC symbol -> the symbol SCimilarity's gene order uses (package data, see resources/README.md)."""
    with gzip.open(_resource("hgnc_symbol_aliases.tsv.gz"), "rt", newline="") as f:
        return {row["alias"]: row["symbol"] for row in csv.DictReader(f, delimiter="\t")}


def gene_positions(genes: Sequence[str]) -> dict[str, int]:
    """Gene -> input column. Cached per gene order, so the many models over one base (and every alignment against
    the same order) share one read-only dict."""
    return _positions(tuple(genes))


@lru_cache(maxsize=16)
def _positions(genes: tuple[str, ...]) -> dict[str, int]:
    return {g: i for i, g in enumerate(genes)}


def write_gene_order(genes: Sequence[str], path: str | Path) -> None:
    Path(path).write_text("\n".join(genes) + "\n")


def gene_order_hash(genes: Sequence[str]) -> str:
    """sha256 of a gene order as ``gene_order.tsv`` holds it: lets a file that omits the list name it."""
    return hashlib.sha256(("\n".join(genes) + "\n").encode()).hexdigest()


@dataclass(frozen=True)
class GeneAlignment:
    """How the columns of a dataset map onto the model's gene order.

    ``source_index[k]`` is the dataset column feeding model gene ``target_index[k]``. Model genes absent from the
    dataset are zero-filled; dataset genes absent from the model are dropped.
    """

    model_genes: tuple[str, ...]
    source_index: np.ndarray
    target_index: np.ndarray
    n_source: int
    unknown_genes: tuple[str, ...]
    #: (data symbol, model symbol) pairs matched through the alias table
    rescued: tuple[tuple[str, str], ...] = field(default=())
    #: data symbols the alias table maps to a model gene that were not used, because another data gene provides that
    #: gene or several aliases claim it. Without them, aligning any subset of the data's genes gives this alignment
    #: restricted to the subset (the service aligns a batch's union of genes once on that ground)
    unused_aliases: tuple[str, ...] = field(default=())

    @property
    def n_overlap(self) -> int:
        return int(self.source_index.size)

    @property
    def n_model_genes(self) -> int:
        return len(self.model_genes)

    @property
    def overlap_fraction(self) -> float:
        """Fraction of the *model's* genes the data provides (what the encoder actually sees)."""
        return self.n_overlap / self.n_model_genes

    def summary(self) -> dict:
        return {
            "n_model_genes": self.n_model_genes,
            "n_data_genes": self.n_source,
            "n_overlap": self.n_overlap,
            "overlap_fraction": round(self.overlap_fraction, 6),
            "n_unknown": len(self.unknown_genes),
            "n_rescued_by_alias": len(self.rescued),
            "rescued_by_alias": {data: model for data, model in self.rescued},
        }

    def visibility(self, X: sp.spmatrix | np.ndarray, input_is_log1p: bool = False) -> dict:
        """How much of a dataset the model can see: the fraction of the genes the data *expresses* (non-zero in some
        cell) that the model has, and the fraction of all counts they carry (``expm1`` first for log1p data).
        A base over a few hundred genes sees a small share of a 20,000-gene file, and this says how small."""
        X = sp.csc_matrix(X) if not sp.issparse(X) else X.tocsc()
        values = X.copy()
        values.data = np.expm1(values.data.astype(np.float64)) if input_is_log1p else values.data.astype(np.float64)
        per_gene = np.asarray(values.sum(axis=0)).ravel()
        expressed = np.diff(X.indptr) > 0
        seen = np.zeros(self.n_source, dtype=bool)
        seen[self.source_index] = True
        total = float(per_gene.sum())
        return {"n_expressed_data_genes": int(expressed.sum()),
                "n_expressed_genes_seen": int((expressed & seen).sum()),
                "expressed_gene_fraction_seen": round(float((expressed & seen).sum() / max(expressed.sum(), 1)), 4),
                "count_fraction_seen": round(float(per_gene[seen].sum() / total), 4) if total > 0 else 0.0}

    def projection(self) -> sp.csr_matrix:
        """A 0/1 matrix P (n_source x n_model genes) so that ``X @ P`` is X in the model's gene order."""
        ones = np.ones(self.n_overlap, dtype=np.float32)
        return sp.csr_matrix(
            (ones, (self.source_index, self.target_index)), shape=(self.n_source, self.n_model_genes)
        )

    def apply(self, X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        """Reorder a cells x data-genes matrix into cells x model-genes CSR (float32), never densifying."""
        if X.shape[1] != self.n_source:
            raise GeneAlignmentError(
                f"matrix has {X.shape[1]} gene columns but the alignment was built for {self.n_source}"
            )
        X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
        out = (X @ self.projection()).tocsr()
        out.sort_indices()
        return out


def align_genes(
    data_genes: Sequence[str],
    model_genes: Sequence[str],
    *,
    data_gene_ids: Sequence[str] | None = None,
    min_overlap: int = 1,
    min_overlap_fraction: float = 0.0,
    model_positions: Mapping[str, int] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> GeneAlignment:
    """Match dataset genes to the model's gene order by symbol (and by Ensembl id if ``data_gene_ids``).

    ``model_genes`` may hold symbols and/or Ensembl ids; a dataset gene matches if either its symbol or its id is
    in the model. With ``aliases`` (e.g. :func:`symbol_aliases`), a data gene that matched nothing is mapped through
    it when the target is a model gene that no other data gene provides (directly or by another alias). Raises :class:`GeneAlignmentError` for duplicated dataset genes or an overlap below the minimum.
    ``model_positions`` (gene -> index in ``model_genes``) may be passed by callers that align many small gene
    lists against one model (the service), so the 28k-entry map is built once.
    """
    data_genes = [str(g) for g in data_genes]
    dupes = sorted(g for g, n in Counter(data_genes).items() if n > 1)
    if dupes:
        raise GeneAlignmentError(
            f"{len(dupes)} gene names occur more than once in the data (e.g. {dupes[:5]}); "
            "SCimilarity needs one column per gene. Sum or drop the duplicates first."
        )
    position = model_positions if model_positions is not None else gene_positions(model_genes)
    ids = [str(g) for g in data_gene_ids] if data_gene_ids is not None else [None] * len(data_genes)
    if len(ids) != len(data_genes):
        raise GeneAlignmentError("data_gene_ids must have one entry per gene")

    source, target, unknown = [], [], []
    taken: dict[int, str] = {}
    clashes: list[tuple[str, str, str]] = []
    for i, (symbol, gene_id) in enumerate(zip(data_genes, ids)):
        j = position.get(symbol)
        if j is None and gene_id is not None:
            j = position.get(gene_id)
        if j is None:
            unknown.append(symbol)
            continue
        if j in taken:  # symbol of one gene equals the id of another: keep the first, say so (once, below)
            clashes.append((taken[j], symbol, model_genes[j]))
            unknown.append(symbol)
            continue
        taken[j] = symbol
        source.append(i)
        target.append(j)
    if clashes:  # one line per gene list, never one per gene: a request can name thousands
        log.warning("%d data genes map to a model gene another data gene already provides; the first is kept "
                    "(e.g. %r and %r -> %r)", len(clashes), *clashes[0])
    rescued: list[tuple[str, str]] = []
    unused_aliases: list[str] = []
    if aliases and unknown:
        unknown, rescued, unused_aliases = _rescue_by_alias(unknown, aliases, position, taken, data_genes, source,
                                                            target)
    if rescued:
        order = np.argsort(source, kind="stable")
        source, target = list(np.asarray(source)[order]), list(np.asarray(target)[order])

    alignment = GeneAlignment(
        model_genes=model_genes if isinstance(model_genes, tuple) else tuple(model_genes),
        source_index=np.asarray(source, dtype=np.int64),
        target_index=np.asarray(target, dtype=np.int64),
        n_source=len(data_genes),
        unknown_genes=tuple(unknown),
        rescued=tuple(rescued),
        unused_aliases=tuple(unused_aliases),
    )
    needed = max(int(min_overlap), int(np.ceil(min_overlap_fraction * len(model_genes))))
    if alignment.n_overlap < needed:
        looks_like_ids = sum(g.startswith("ENS") for g in data_genes[:200]) > 100
        hint = (
            " The data's gene names look like Ensembl ids; pass the column holding symbols "
            "(or set the gene-id column) so they can be matched."
            if looks_like_ids
            else ""
        )
        raise GeneAlignmentError(
            f"only {alignment.n_overlap} of the model's {len(model_genes)} genes "
            f"({alignment.overlap_fraction:.1%}) are in the data; at least {needed} are required "
            f"(min_overlap={min_overlap}, min_overlap_fraction={min_overlap_fraction}). "
            f"First data genes: {data_genes[:5]}.{hint}"
        )
    (log.debug if model_positions is not None else log.info)(
        "gene alignment: %d of %d model genes present (%.1f%%, %d by old/alias symbol); %d data genes not in "
        "the model", alignment.n_overlap, len(model_genes), 100 * alignment.overlap_fraction, len(rescued),
        len(unknown),
    )
    return alignment


def _rescue_by_alias(unknown: list[str], aliases: Mapping[str, str], position: Mapping[str, int],
                     taken: dict[int, str], data_genes: list[str], source: list[int],
                     target: list[int]) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Map unmatched data symbols through ``aliases``; a target claimed twice is ambiguous and rescues neither.
    Returns the symbols still unknown, the rescued pairs, and the aliases of a model gene left unused."""
    claims: dict[int, list[str]] = {}
    unused: list[str] = []
    for symbol in unknown:
        j = position.get(aliases.get(symbol, ""))
        if j is None:
            continue
        if j in taken:
            unused.append(symbol)
        else:
            claims.setdefault(j, []).append(symbol)
    index = {g: i for i, g in enumerate(data_genes)}
    rescued_symbols: set[str] = set()
    rescued: list[tuple[str, str]] = []
    ambiguous = [symbols for symbols in claims.values() if len(symbols) != 1]
    if ambiguous:  # one line with a count, not one per gene (503 lines for one request before)
        log.warning("%d model genes are named by several old/alias symbols of the data, so none of those is used "
                    "(e.g. %s -> %r)", len(ambiguous), ambiguous[0], aliases[ambiguous[0][0]])
    for j, symbols in claims.items():
        if len(symbols) != 1:
            unused.extend(symbols)
            continue
        taken[j] = symbols[0]
        source.append(index[symbols[0]])
        target.append(j)
        rescued_symbols.add(symbols[0])
        rescued.append((symbols[0], aliases[symbols[0]]))
    return [g for g in unknown if g not in rescued_symbols], sorted(rescued), sorted(unused)
