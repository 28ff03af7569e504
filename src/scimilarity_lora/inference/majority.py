"""Majority voting over clusters, CellTypist-style: over-cluster the query, then give every cell its cluster's most
common label, with the share of the cluster that voted for it as an uncertainty.

Two sources of clusters: the model's embedding (``over_cluster``), or the query's own expression
(``expression_clusters``: CellTypist's recipe, 2,000 highly variable genes of the query, scaled, 50 PCs, 10
neighbours). The second does not inherit the model's errors: across studies it is what moves whole clusters of
cells the head splits wrongly (Study 3, ``experiments/cross_study``).

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


def expression_clusters(X, input_is_log1p: bool = False, seed: int = 0, n_top_genes: int = 2000,
                        n_pcs: int = 50, n_neighbors: int = 10, resolution: float | None = None) -> np.ndarray:
    """Leiden clusters (as strings) of the cells' own expression, as CellTypist over-clusters a query: counts are
    log-normalised (skipped when ``input_is_log1p``), the ``n_top_genes`` most variable genes scaled (clipped at
    10), ``n_pcs`` principal components, a ``n_neighbors`` graph, Leiden at CellTypist's resolution. ``X`` holds
    all the query's genes (cells x genes, sparse or dense). Memory: the scaled genes are dense, cells x
    ``n_top_genes`` x 4 bytes (0.8 GB for 100,000 cells). Cells with no counts get no cluster (None)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    ok = np.asarray(X.sum(axis=1)).ravel() > 0
    out = np.full(X.shape[0], None, dtype=object)
    n = int(ok.sum())
    if n < 3 or X.shape[1] < 3:
        out[ok] = "0"
        return out
    e = ad.AnnData(X[ok])
    if not input_is_log1p:
        sc.pp.normalize_total(e, target_sum=1e4)
        sc.pp.log1p(e)
    varying = np.asarray((e.X.power(2) if sp.issparse(e.X) else e.X ** 2).mean(axis=0)).ravel() > np.asarray(
        e.X.mean(axis=0)).ravel() ** 2  # genes with any variance (HVG selection fails on constant ones)
    e = e[:, varying].copy()
    sc.pp.highly_variable_genes(e, n_top_genes=min(n_top_genes, e.n_vars - 1))
    e = e[:, e.var["highly_variable"].to_numpy()].copy()
    if sp.issparse(e.X):
        e.X = e.X.toarray()  # scaling centres the genes: dense either way, said here rather than warned
    sc.pp.scale(e, max_value=10)
    sc.tl.pca(e, n_comps=max(1, min(n_pcs, e.n_vars - 1, n - 1)), random_state=seed)
    sc.pp.neighbors(e, n_neighbors=min(n_neighbors, n - 1), random_state=seed, transformer="sklearn")
    sc.tl.leiden(e, resolution=resolution or leiden_resolution(n), flavor="igraph", n_iterations=2, directed=False,
                 random_state=seed, key_added="over_clustering")
    out[ok] = e.obs["over_clustering"].astype(str).to_numpy()
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
