"""Log-normalised genes + logistic regression, the baseline every cross-study method must beat (peers' env).

    .venv-peers/bin/python experiments/cross_study/peers/logreg_run.py REF.h5ad REF_LABEL QUERY.h5ad OUT.csv \
        [--ref-layer X|raw] [--query-layer X|raw] [--ref-log1p] [--query-log1p] [--l1] [--seed 0] \
        [--genes gene_order.tsv]

Both sides log1p(normalize_total(1e4)); the genes both measure (optionally only those in ``--genes``, e.g. a base's
gene order: the vocabulary ablation), standardised with the reference's statistics; C chosen on a stratified 20%
validation split of the reference (macro-F1), then refitted on 100% of it. ``--l1``: L1-penalised (saga).
Writes cell_id, predicted_labels, and wall time / peak RSS in OUT.json.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from celltypist_run import log_normalised  # noqa: E402

C_GRID = (0.001, 0.01, 0.1, 1.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ref"), p.add_argument("ref_label"), p.add_argument("query"), p.add_argument("out")
    p.add_argument("--ref-layer", default="X"), p.add_argument("--query-layer", default="X")
    p.add_argument("--ref-log1p", action="store_true"), p.add_argument("--query-log1p", action="store_true")
    p.add_argument("--l1", action="store_true"), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--genes", default=None, help="restrict to the genes of this list (one per line)")
    a = p.parse_args()
    import pandas as pd
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    ref = log_normalised(a.ref, a.ref_layer, a.ref_log1p)
    ref = ref[ref.obs[a.ref_label].notna()].copy()
    query = log_normalised(a.query, a.query_layer, a.query_log1p)
    genes = [g for g in ref.var_names if g in set(query.var_names)]
    if a.genes:
        allowed = {line.strip() for line in open(a.genes) if line.strip()}
        genes = [g for g in genes if g in allowed]
    X = np.asarray(ref[:, genes].X.toarray())
    Q = np.asarray(query[:, genes].X.toarray())
    y = ref.obs[a.ref_label].astype(str).to_numpy()
    scaler = StandardScaler().fit(X)
    X, Q = scaler.transform(X), scaler.transform(Q)

    def model(C: float) -> LogisticRegression:
        if a.l1:
            return LogisticRegression(C=C, penalty="l1", solver="saga", max_iter=300, random_state=a.seed)
        return LogisticRegression(C=C, max_iter=500, random_state=a.seed)

    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=a.seed)
    scores = {C: f1_score(y[va], model(C).fit(X[tr], y[tr]).predict(X[va]), average="macro") for C in C_GRID}
    best = max(scores, key=scores.get)
    fitted = model(best).fit(X, y)
    pd.DataFrame({"predicted_labels": fitted.predict(Q)}, index=pd.Index(query.obs_names, name="cell_id")).to_csv(a.out)
    json.dump({"tool": "logistic_regression" + ("_l1" if a.l1 else ""), "sklearn": sklearn.__version__,
               "n_genes": len(genes), "C": best, "validation_macro_f1": {str(k): round(v, 4) for k, v in scores.items()},
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
              open(a.out.removesuffix(".csv") + ".json", "w"), indent=2)


if __name__ == "__main__":
    main()
