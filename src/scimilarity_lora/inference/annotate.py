"""Annotate any AnnData with a trained model, CellTypist-style: results go into ``.obs`` and ``.obsm``.

    python -m scimilarity_lora.inference.annotate outputs/runs/<date>/<time>/model cells.h5ad annotated.h5ad --layer counts

Cells are processed in batches of rows (aligned, normalised and embedded per batch), so a million-cell sparse
file is never densified as a whole; the CLI also reads and writes files in row chunks
(:mod:`.annotate_file`), so it is never loaded whole either. Writes ``obs["scimilarity_lora_label"]`` (a class, a coarser Cell Ontology
term, or "unknown"), ``..._ontology_term_id``, ``..._best_guess``, ``..._confidence`` (calibrated), ``..._status``
(ok | coarse | low_confidence | novel | no_expression), ``..._top{k}`` (``"label:prob; ..."``),
``obsm['X_scimilarity']`` and ``uns['scimilarity_lora']``. With ``--majority-voting``, also
``..._over_clustering``, ``..._majority_voting`` (the cluster's most common label) and
``..._majority_frequency`` (its share of the cluster), as CellTypist writes them; ``--vote-on expression``
clusters the cells' own expression (CellTypist's way) instead of the model's embedding.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from scimilarity_lora.data.io import BUNDLED, DataError, expression_matrix, gene_names, read_anndata, validate_matrix
from scimilarity_lora.inference.calibration import STATUSES, UNKNOWN
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.user_errors import one_line_errors

if TYPE_CHECKING:
    from scimilarity_lora.inference.reference.index import ReferenceIndex

log = logging.getLogger(__name__)

#: what majority voting over-clusters when no clusters are given
VOTE_ON = ("embedding", "expression")


def check_vote_on(vote_on: str) -> None:
    if vote_on not in VOTE_ON:
        raise DataError(f"vote_on must be one of {VOTE_ON}, not {vote_on!r}")


def annotate(
    adata: ad.AnnData,
    model: str | Path | CellTypePredictor,
    *,
    layer: str | None = None,
    input_is_log1p: bool = False,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    batch_size: int = 4096,
    top_k: int = 3,
    min_overlap: int = 50,
    key_added: str = "scimilarity_lora",
    progress: bool = True,
    force_label: bool = False,
    coarse: bool = True,
    majority_voting: bool = False,
    over_clustering: str | None = None,
    vote_on: str = "embedding",
    seed: int = 0,
    reference: "str | Path | ReferenceIndex | None" = None,
    k: int = 15,
) -> ad.AnnData:
    """Predict labels and embeddings for every cell of ``adata`` (modified in place and returned).

    A cell the model declines (low calibrated confidence, or unlike every training class: ``..._status``) is
    labelled "unknown", its best guess kept in ``..._best_guess``; a hesitant one whose candidate classes share a
    Cell Ontology ancestor that together passes the threshold gets that ancestor (status ``coarse``; ``coarse=False``
    switches it off); ``force_label=True`` labels every cell with its best class. ``majority_voting`` adds the
    per-cluster majority of those labels over Leiden clusters of the embedding (``vote_on="embedding"``) or of the
    cells' own expression (``vote_on="expression"``), or over ``adata.obs[over_clustering]``.
    ``reference`` (an index directory, see :mod:`.reference`) adds the distance-weighted vote of each cell's ``k``
    nearest reference cells beside the head's answer (``..._knn_*`` columns; "unknown" beyond the index's calibrated
    distance)."""
    from dataclasses import replace

    predictor = model if isinstance(model, CellTypePredictor) else CellTypePredictor.load(model)
    index = None
    if reference is not None:  # opened (and checked) before any cell is embedded
        from scimilarity_lora.inference.reference.query import open_reference

        index = open_reference(reference)
    if over_clustering is not None and over_clustering not in adata.obs.columns:
        raise DataError(f"over-clustering column {over_clustering!r} not in obs; columns: {list(adata.obs.columns)}")
    check_vote_on(vote_on)
    X, var_names, var = expression_matrix(adata, layer)
    validate_matrix(X, replace(predictor.preprocessing, input_is_log1p=input_is_log1p), f"AnnData ({layer or 'X'})")
    ids = var[gene_ids_key].astype(str).tolist() if gene_ids_key else None
    genes = gene_names(var_names, var, gene_symbols_key)
    result = predictor.predict_cells(X, genes, gene_ids=ids, input_is_log1p=input_is_log1p, batch_size=batch_size,
                                     min_overlap=min_overlap, progress=progress, coarse=coarse)
    probs, emb, ok = result.probs, result.embeddings, result.expressed
    classes = np.asarray(predictor.classes)
    order = np.argsort(-probs, axis=1)[:, :top_k]
    answers, terms = predictor.answer_with_terms(probs, result.status, force_label)
    coarse_names = [] if predictor.coarse_terms is None else list(predictor.coarse_terms.labels)
    labels = pd.Categorical(answers, categories=list(dict.fromkeys([*predictor.classes, *coarse_names, UNKNOWN])))
    labels[~ok] = np.nan  # no expression in the model's genes: left unlabelled, never a made-up answer
    adata.obs[f"{key_added}_label"] = labels
    adata.obs[f"{key_added}_ontology_term_id"] = pd.Categorical(np.where(ok, np.asarray(terms, dtype=object), None))
    adata.obs[f"{key_added}_best_guess"] = pd.Categorical(np.where(ok, classes[order[:, 0]], None),
                                                          categories=predictor.classes)
    adata.obs[f"{key_added}_confidence"] = np.where(ok, probs[np.arange(len(probs)), order[:, 0]], np.nan)
    adata.obs[f"{key_added}_top{top_k}"] = [
        "; ".join(f"{classes[j]}:{probs[i, j]:.3f}" for j in row) if ok[i] else "" for i, row in enumerate(order)
    ]
    adata.obs[f"{key_added}_status"] = pd.Categorical(result.status, categories=list(STATUSES))
    adata.obsm["X_scimilarity"] = np.where(ok[:, None], emb, np.nan).astype(np.float32)
    if not ok.all():
        log.warning("%d of %d cells have no expression in the model's genes: their label is left empty "
                    "(obs[%r] == 'no_expression')", int((~ok).sum()), len(ok), f"{key_added}_status")
    if majority_voting:
        from scimilarity_lora.inference.majority import expression_clusters, majority_vote, over_cluster

        clusters = (adata.obs[over_clustering].astype("string").to_numpy(dtype=object, na_value=None)
                    if over_clustering else expression_clusters(X, input_is_log1p, seed=seed)
                    if vote_on == "expression" else over_cluster(adata.obsm["X_scimilarity"], seed=seed))
        majority, frequency = majority_vote(np.asarray(labels, dtype=object), clusters)
        adata.obs[f"{key_added}_over_clustering"] = pd.Categorical(clusters)
        adata.obs[f"{key_added}_majority_voting"] = pd.Categorical(majority)
        adata.obs[f"{key_added}_majority_frequency"] = frequency
    alignment = predictor.alignment(genes, ids, min_overlap)
    adata.uns[key_added] = {
        "classes": list(predictor.classes),
        "gene_overlap": alignment.summary(),
        "input_is_log1p": bool(input_is_log1p),
        "n_cells_without_expression": int((~ok).sum()),
        "status_counts": {s: int((result.status == s).sum()) for s in STATUSES},
        "force_label": bool(force_label),
        "coarse": bool(coarse and predictor.coarse_terms is not None),
        "majority_voting": bool(majority_voting),
        "vote_on": over_clustering or vote_on if majority_voting else None,
        # two lists, not a dict: class names such as "CD4+/CD25 T Reg" cannot be HDF5 keys
        "class_ontology_terms": [predictor.class_terms.get(c) or "" for c in predictor.classes],
        "finetune": str(predictor.spec.finetune),
    }
    if index is not None:
        from scimilarity_lora.inference.reference.query import index_embeddings, write_knn_columns

        z = index_embeddings(index, predictor, emb, X, genes, ids, input_is_log1p, min_overlap, batch_size)
        write_knn_columns(adata, index, index.annotate(z[ok], k), ok, key_added, k, force_label)
    return adata


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Annotate an .h5ad with a trained scimilarity-lora model.")
    p.add_argument("model", help="a model directory (a run's model/) or a run directory")
    p.add_argument("input", help=".h5ad to annotate, or a Census-shaped SOMA store directory (see --obs-filter)")
    p.add_argument("output", help=".h5ad to write")
    p.add_argument("--layer", default=None, help="X (default), raw, or a layer name")
    p.add_argument("--log1p", action="store_true", help="the matrix is log1p(normalize_total), not raw counts")
    p.add_argument("--gene-symbols-key", default=None)
    p.add_argument("--gene-ids-key", default=None)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--obs-filter", default=None,
                   help="for a SOMA store: which cells, e.g. \"tissue_general == 'blood'\" (default: all)")
    p.add_argument("--chunk-cells", type=int, default=65_536,
                   help="cells read from the file at a time (memory: one chunk, the model and the cell table)")
    p.add_argument("--force-labels", action="store_true", help="label every cell, never 'unknown'")
    p.add_argument("--no-coarse", action="store_true",
                   help="never answer a coarser Cell Ontology term for a hesitant cell ('unknown' instead)")
    p.add_argument("--majority-voting", action="store_true",
                   help="also write each over-cluster's majority label and its vote frequency (CellTypist-style)")
    p.add_argument("--reference", default=None,
                   help="a reference index directory: also label each cell by its nearest reference cells (kNN)")
    p.add_argument("--k", type=int, default=15, help="neighbours for --reference")
    p.add_argument("--over-clustering", default=None,
                   help="obs column of your own clusters for --majority-voting (default: Leiden, see --vote-on)")
    p.add_argument("--vote-on", choices=VOTE_ON, default="embedding",
                   help="what --majority-voting over-clusters: the model's embedding, or the cells' own expression "
                        "(CellTypist's way; the file's matrix is read whole for it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = Path(args.model)
    if (model / "model").is_dir():
        model = model / "model"
    options = dict(layer=args.layer, input_is_log1p=args.log1p, gene_symbols_key=args.gene_symbols_key,
                   gene_ids_key=args.gene_ids_key, batch_size=args.batch_size, top_k=args.top_k,
                   force_label=args.force_labels, coarse=not args.no_coarse,
                   majority_voting=(args.majority_voting or args.over_clustering is not None
                                    or args.vote_on != "embedding"),
                   over_clustering=args.over_clustering, vote_on=args.vote_on, reference=args.reference, k=args.k)
    if args.obs_filter and not Path(args.input).is_dir():
        raise DataError("--obs-filter selects cells of a SOMA store; for an .h5ad, subset the file first")
    if args.input in BUNDLED:  # a bundled dataset lives in memory already
        adata = annotate(read_anndata(args.input), model, **options)
        adata.write_h5ad(args.output)
        obs = adata.obs
    else:  # a file: read and written in row chunks (a million-cell file is never loaded whole)
        from scimilarity_lora.inference.annotate_file import annotate_file

        annotate_file(args.input, args.output, model, chunk_cells=args.chunk_cells, obs_filter=args.obs_filter,
                      **options)
        obs = read_obs(args.output)
    log.info("annotated %d cells -> %s\n%s", len(obs), args.output,
             obs["scimilarity_lora_label"].value_counts().to_string())
    if args.reference:
        log.info("kNN labels from %s:\n%s", args.reference,
                 obs["scimilarity_lora_knn_label"].value_counts().to_string())


def read_obs(path: str | Path) -> pd.DataFrame:
    """Only the cell table of an .h5ad (its matrix stays on disk)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return read_elem(f["obs"])

if __name__ == "__main__":
    main()
