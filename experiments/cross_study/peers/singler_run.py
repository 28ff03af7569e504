"""SingleR (the `singler` package, BiocPy's bindings to the C++ SingleR) on one task, in the peers' environment.

    .venv-peers/bin/python experiments/cross_study/peers/singler_run.py REF.h5ad REF_LABEL QUERY.h5ad OUT.csv [...]

Both sides log1p(normalize_total(1e4)) (SingleR's log-expression input), genes x cells; SingleR picks marker genes
from the reference labels itself (its default "classic" markers) and fine-tunes. Same arguments as celltypist_run.py.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ref"), p.add_argument("ref_label"), p.add_argument("query"), p.add_argument("out")
    p.add_argument("--ref-layer", default="X"), p.add_argument("--query-layer", default="X")
    p.add_argument("--ref-log1p", action="store_true"), p.add_argument("--query-log1p", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import pandas as pd
    import singler

    t0 = time.perf_counter()
    ref = log_normalised(a.ref, a.ref_layer, a.ref_log1p)
    ref = ref[ref.obs[a.ref_label].notna()].copy()
    query = log_normalised(a.query, a.query_layer, a.query_log1p)
    def genes_by_cells(X):
        m = X.T.tocsc()
        m.sort_indices()  # SingleR's matrix reader wants increasing row indices within each column
        return m

    result = singler.annotate_single(
        test_data=genes_by_cells(query.X), test_features=list(query.var_names),
        ref_data=genes_by_cells(ref.X), ref_labels=ref.obs[a.ref_label].astype(str).tolist(),
        ref_features=list(ref.var_names), num_threads=2)
    best = np.asarray(result.column("best"), dtype=object)
    pd.DataFrame({"predicted_labels": best}, index=pd.Index(query.obs_names, name="cell_id")).to_csv(a.out)
    from importlib.metadata import version

    json.dump({"tool": "singler", "version": version("singler"), "wall_seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
              open(a.out.removesuffix(".csv") + ".json", "w"), indent=2)


if __name__ == "__main__":
    main()
