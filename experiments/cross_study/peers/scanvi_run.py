"""scANVI (scvi-tools) on one task, in the peers' environment: scVI then scANVI on the reference's raw counts, the
query mapped onto it with scArches surgery (``SCANVI.load_query_data``), then labelled by the query model.

    .venv-peers/bin/python experiments/cross_study/peers/scanvi_run.py REF.h5ad REF_LABEL QUERY.h5ad OUT.csv [...]

scVI models counts: a log1p layer (pbmc68k_reduced's .raw) is turned back into integer counts as
``data.soma_store.pbmc_counts`` does (expm1, divided by each cell's smallest non-zero value). Genes: the 2,000 most
variable of the reference (seurat_v3 on counts) that the query also measures. Epochs: scVI 200, scANVI 50, surgery
100 (scvi-tools' tutorial settings, scaled down for 2 CPU cores); ``--seed`` seeds scvi-tools.
"""

import argparse
import json
import resource
import time

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp


def counts(path: str, layer: str, is_log1p: bool) -> ad.AnnData:
    a = sc.datasets.pbmc68k_reduced() if path == "pbmc68k_reduced" else ad.read_h5ad(path)
    X, var = (a.raw.X, a.raw.var_names) if layer == "raw" else (a.X, a.var_names)
    X = sp.csr_matrix(X, dtype=np.float64)
    if is_log1p:
        np.expm1(X.data, out=X.data)
        unit = np.array([X.data[X.indptr[i]:X.indptr[i + 1]].min() if X.indptr[i + 1] > X.indptr[i] else 1.0
                         for i in range(X.shape[0])])
        X = sp.csr_matrix(sp.diags(1.0 / unit) @ X)
        X.data = np.round(X.data)
    out = ad.AnnData(sp.csr_matrix(X, dtype=np.float32), obs=a.obs.copy())
    out.var_names = [str(g) for g in var]
    out.var_names_make_unique()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ref"), p.add_argument("ref_label"), p.add_argument("query"), p.add_argument("out")
    p.add_argument("--ref-layer", default="X"), p.add_argument("--query-layer", default="X")
    p.add_argument("--ref-log1p", action="store_true"), p.add_argument("--query-log1p", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-genes", type=int, default=2000)
    a = p.parse_args()
    import pandas as pd
    import scvi
    import torch

    torch.set_num_threads(2)
    scvi.settings.seed = a.seed
    t0 = time.perf_counter()
    ref = counts(a.ref, a.ref_layer, a.ref_log1p)
    ref = ref[ref.obs[a.ref_label].notna()].copy()
    query = counts(a.query, a.query_layer, a.query_log1p)
    shared = ref.var_names.intersection(query.var_names)
    ref = ref[:, shared].copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=min(a.n_genes, len(shared)), flavor="seurat_v3")
    genes = ref.var_names[ref.var["highly_variable"]]
    ref = ref[:, genes].copy()
    ref.obs["label"] = ref.obs[a.ref_label].astype(str)
    scvi.model.SCVI.setup_anndata(ref)
    vae = scvi.model.SCVI(ref, n_latent=30)
    vae.train(max_epochs=200, accelerator="cpu", enable_progress_bar=False)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, labels_key="label", unlabeled_category="Unknown")
    lvae.train(max_epochs=50, n_samples_per_label=100, accelerator="cpu", enable_progress_bar=False)
    q = query[:, genes].copy()
    q.obs["label"] = "Unknown"
    scvi.model.SCANVI.prepare_query_anndata(q, lvae)
    qvae = scvi.model.SCANVI.load_query_data(q, lvae)
    qvae.train(max_epochs=100, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu", enable_progress_bar=False)
    pred = qvae.predict()
    pd.DataFrame({"predicted_labels": np.asarray(pred, dtype=object)},
                 index=pd.Index(query.obs_names, name="cell_id")).to_csv(a.out)
    json.dump({"tool": "scanvi", "version": scvi.__version__, "n_genes": int(len(genes)), "seed": a.seed,
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
              open(a.out.removesuffix(".csv") + ".json", "w"), indent=2)


if __name__ == "__main__":
    main()
