"""CellTypist on one cross-study task, run in the peers' environment (.venv-peers, make_peers_env.sh).

    .venv-peers/bin/python experiments/cross_study/peers/celltypist_run.py REF.h5ad REF_LABEL QUERY.h5ad OUT.csv \
        [--ref-layer X|raw] [--query-layer X|raw] [--ref-log1p] [--query-log1p] [--feature-selection] [--majority-voting]

Both sides go to CellTypist as log1p(normalize_total(1e4)) (what it expects); counts are normalised here, already
log-normalised layers are used as they are. Writes one row per query cell: cell_id, predicted (and majority_voting),
plus wall time and peak RSS in OUT.json.
"""

import argparse
import json
import resource
import time

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp


def log_normalised(path: str, layer: str, is_log1p: bool) -> ad.AnnData:
    a = sc.datasets.pbmc68k_reduced() if path == "pbmc68k_reduced" else ad.read_h5ad(path)
    X, var = (a.raw.X, a.raw.var_names) if layer == "raw" else (a.X, a.var_names)
    out = ad.AnnData(sp.csr_matrix(X, dtype=np.float32), obs=a.obs.copy())
    out.var_names = [str(g) for g in var]
    out.var_names_make_unique()
    if not is_log1p:
        sc.pp.normalize_total(out, target_sum=1e4)
        sc.pp.log1p(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ref"), p.add_argument("ref_label"), p.add_argument("query"), p.add_argument("out")
    p.add_argument("--ref-layer", default="X"), p.add_argument("--query-layer", default="X")
    p.add_argument("--ref-log1p", action="store_true"), p.add_argument("--query-log1p", action="store_true")
    p.add_argument("--feature-selection", action="store_true"), p.add_argument("--majority-voting", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import celltypist

    t0 = time.perf_counter()
    ref = log_normalised(a.ref, a.ref_layer, a.ref_log1p)
    ref = ref[ref.obs[a.ref_label].notna()].copy()
    model = celltypist.train(ref, labels=a.ref_label, feature_selection=a.feature_selection, n_jobs=2,
                             use_SGD=False, check_expression=False, max_iter=200)
    train_s = time.perf_counter() - t0
    query = log_normalised(a.query, a.query_layer, a.query_log1p)
    result = celltypist.annotate(query, model=model, majority_voting=a.majority_voting)
    labels = result.predicted_labels
    table = labels.copy()
    table.index.name = "cell_id"
    table.to_csv(a.out)
    json.dump({"tool": "celltypist", "version": celltypist.__version__, "feature_selection": a.feature_selection,
               "majority_voting": a.majority_voting, "train_seconds": round(train_s, 1),
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
              open(a.out.removesuffix(".csv") + ".json", "w"), indent=2)


if __name__ == "__main__":
    main()
