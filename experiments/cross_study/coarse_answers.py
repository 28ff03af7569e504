"""How often the demo model answers "unknown", with and without coarse answers (#21), on the 700 bundled PBMCs
(in-domain) and on the same cells with each cell's values permuted across genes (a stand-in for cells unlike any
blood type: no real non-blood data is at hand here; the permutation keeps each cell's depth and value
distribution and destroys every expression programme).

    python train.py hydra.run.dir=outputs/demo_coarse
    python experiments/cross_study/coarse_answers.py outputs/demo_coarse   # -> coarse_answers.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from scimilarity_lora.inference.annotate import annotate


def gene_permuted(adata: ad.AnnData, seed: int = 0) -> ad.AnnData:
    X = adata.raw.X
    X = np.asarray(X.todense() if sp.issparse(X) else X).copy()
    rng = np.random.default_rng(seed)
    for i in range(len(X)):
        X[i] = X[i, rng.permutation(X.shape[1])]
    out = ad.AnnData(X, var=adata.raw.var.copy())
    out.var_names = adata.raw.var_names
    return out


def main(run: str, out: str = "experiments/cross_study/coarse_answers.json") -> None:
    pbmc = sc.datasets.pbmc68k_reduced()
    rows = []
    for name, data, layer in (("in-domain (700 bundled PBMCs)", pbmc, "raw"),
                              ("gene-permuted PBMCs (not blood-like)", gene_permuted(pbmc), None)):
        for coarse in (False, True):
            annotate(data, Path(run) / "model", layer=layer, input_is_log1p=True, progress=False, coarse=coarse)
            status = data.obs["scimilarity_lora_status"].astype(str)
            rows.append({"cells": name, "coarse": coarse, "n_cells": int(data.n_obs),
                         "unknown": round(float(status.isin(["low_confidence", "novel"]).mean()), 4),
                         "class": round(float((status == "ok").mean()), 4),
                         "coarse_answer": round(float((status == "coarse").mean()), 4),
                         "coarse_terms": data.obs.loc[status == "coarse", "scimilarity_lora_label"]
                         .astype(str).value_counts().to_dict()})
            print(json.dumps(rows[-1]))
    Path(out).write_text(json.dumps({"command": f"python experiments/cross_study/coarse_answers.py {run}",
                                     "run": run, "rows": rows}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
