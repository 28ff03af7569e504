"""Majority voting over clusters, CellTypist-style: over-cluster the query on the model's embedding, then give every
cell its cluster's most common label, with the share of the cluster that voted for it as an uncertainty.

Resolution follows the number of cells as CellTypist's ``over_cluster`` does (5 below 5,000 cells, up to 30 above
200,000), so clusters stay small enough to follow real cell types. A user's own clustering can replace it. Whether
it helps is an empirical question per dataset (it lowered CellTypist's macro-F1 on every cross-study task measured
in issue #22): evaluation reports both per-cell and voted figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def leiden_resolution(n_cells: int) -> float:
    """CellTypist's resolution for over-clustering ``n_cells`` cells."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0)):
        if n_cells < limit:
            return resolution
    return 30.0


def over_cluster(embedding: np.ndarray, resolution: float | None = None, n_neighbors: int = 15,
                 seed: int = 0) -> np.ndarray:
    """Leiden clusters (as strings) of the cells' embeddings: scanpy's neighbours graph (cosine) + Leiden (igraph).
    Rows with a non-finite embedding (cells with no expression) get no cluster (None)."""
    import anndata as ad
    import scanpy as sc

    ok = np.isfinite(embedding).all(axis=1)
    out = np.full(len(embedding), None, dtype=object)
    if ok.sum() < 3:
        out[ok] = "0"
        return out
    adata = ad.AnnData(np.zeros((int(ok.sum()), 1), dtype=np.float32))
    adata.obsm["X_emb"] = np.ascontiguousarray(embedding[ok], dtype=np.float32)
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, int(ok.sum()) - 1), use_rep="X_emb", metric="cosine",
                    random_state=seed, transformer="sklearn")  # not pynndescent: see evaluation/plots.py
    sc.tl.leiden(adata, resolution=resolution or leiden_resolution(int(ok.sum())), flavor="igraph",
                 n_iterations=2, directed=False, random_state=seed, key_added="over_clustering")
    out[ok] = adata.obs["over_clustering"].astype(str).to_numpy()
    return out


def majority_vote(labels: np.ndarray | pd.Series, clusters: np.ndarray | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: its cluster's most common label (ties: the alphabetically first) and that label's share of the
    cluster. Cells without a label or a cluster take no part and get None / NaN."""
    frame = pd.DataFrame({"label": pd.Series(np.asarray(labels, dtype=object)),
                          "cluster": pd.Series(np.asarray(clusters, dtype=object))})
    voting = frame.dropna()
    majority = np.full(len(frame), None, dtype=object)
    frequency = np.full(len(frame), np.nan)
    if voting.empty:
        return majority, frequency
    counts = voting.groupby(["cluster", "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["cluster", "n", "label"], ascending=[True, False, True])
    top = counts.drop_duplicates("cluster").set_index("cluster")
    sizes = voting.groupby("cluster").size()
    has = frame["cluster"].notna().to_numpy()
    clusters_of = frame.loc[has, "cluster"]
    known = clusters_of.isin(top.index).to_numpy()
    rows = np.flatnonzero(has)[known]
    majority[rows] = top.loc[clusters_of[known], "label"].to_numpy()
    frequency[rows] = (top.loc[clusters_of[known], "n"].to_numpy() / sizes.loc[clusters_of[known]].to_numpy())
    return majority, frequency
