"""Majority voting over Leiden clusters of the query's own expression (CellTypist's way: log-normalised, 2,000 HVGs,
scaled, 50 PCs, 10 neighbours, CellTypist's resolution rule) instead of the model's embedding (Study 3 ablation).

    python experiments/cross_study/ablations/majority_voting_expression.py RUN QUERY OUT_PREFIX CLASSES_MAP \
        QUERY_LABEL QUERY_MAP [raw]

Annotates QUERY with the run (``annotate --force-labels --majority-voting --over-clustering expr_clusters``) and
prints accuracy, macro-F1 and balanced accuracy per cell and after the vote, scored by score_predictions.py.
``raw``: the query is pbmc68k_reduced-like (log-normalised ``.raw``). The clusters are the product's
(``majority.expression_clusters``, also ``annotate --vote-on expression``); the single-run figures in
``results.json`` came from this script's former inline copy of the same recipe (unseeded Leiden), before Study 3's
three-seed rows (``+majority_voting_expression``) measured it through ``evaluate``."""
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import scanpy as sc

from scimilarity_lora.inference.majority import expression_clusters

REPO = Path(__file__).resolve().parents[3]


def main() -> None:
    run, query, out, classes_map, query_label, query_map = sys.argv[1:7]
    is_log1p = len(sys.argv) > 7 and sys.argv[7] == "raw"
    q = sc.datasets.pbmc68k_reduced() if query == "pbmc68k_reduced" else ad.read_h5ad(query)
    if is_log1p:
        q = q.raw.to_adata()
    q.obs["expr_clusters"] = expression_clusters(q.X, is_log1p)
    q.write_h5ad(out + ".in.h5ad")
    subprocess.run([sys.executable, "-m", "scimilarity_lora.inference.annotate", run, out + ".in.h5ad", out + ".h5ad",
                    "--force-labels", "--majority-voting", "--over-clustering", "expr_clusters",
                    *(["--log1p"] if is_log1p else [])], check=True, capture_output=True)
    a = ad.read_h5ad(out + ".h5ad")
    pd.DataFrame({"predicted_labels": a.obs["scimilarity_lora_best_guess"].astype(str),
                  "majority_voting": a.obs["scimilarity_lora_majority_voting"].astype(str)},
                 index=pd.Index(a.obs_names, name="cell_id")).to_csv(out + ".csv")
    for column in ("predicted_labels", "majority_voting"):
        scored = subprocess.run([sys.executable, str(REPO / "experiments" / "cross_study" / "score_predictions.py"),
                                 out + ".csv", query, query_label, "--classes-map", classes_map, "--query-map",
                                 query_map, "--column", column], capture_output=True, text=True, check=True).stdout
        r = json.loads(scored)
        print(out, column, r["accuracy"], r["macro_f1"], r["balanced_accuracy"])


if __name__ == "__main__":
    main()
