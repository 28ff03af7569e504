"""Reference and query files restricted to the genes the other side measures (the gene-panel ablations of Study 3).

    python experiments/cross_study/ablations/restrict_genes.py [--real ../shared/data/real] \\
        [--out outputs/cross_study/ablations]

Writes sorted_on_pbmc68k.h5ad and pbmc3k_on_pbmc68k.h5ad (keeping only the genes pbmc68k_reduced measures: as
references, "train on the query's panel"; pbmc3k_on_pbmc68k also as the query of a pbmc68k-trained run, "predict on
the training panel"), and pbmc3k_on_sorted.h5ad (the query keeping only the sorted reference's genes). Counts are
unchanged; only columns are dropped.
"""

import argparse
from pathlib import Path

import anndata as ad
import scanpy as sc

p = argparse.ArgumentParser()
p.add_argument("--real", default="../shared/data/real")
p.add_argument("--out", default="outputs/cross_study/ablations")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
real = Path(a.real)
sorted_ = ad.read_h5ad(real / "mudan_sorted_pbmc.h5ad")
pbmc3k = ad.read_h5ad(real / "pbmc3k_seurat.h5ad")
genes68k = list(sc.datasets.pbmc68k_reduced().raw.var_names)
for name, data, genes in [("sorted_on_pbmc68k", sorted_, genes68k), ("pbmc3k_on_pbmc68k", pbmc3k, genes68k),
                          ("pbmc3k_on_sorted", pbmc3k, list(sorted_.var_names))]:
    keep = data.var_names.isin(genes)
    data[:, keep].copy().write_h5ad(out / f"{name}.h5ad")
    print(f"{name}: {int(keep.sum())} of {data.n_vars} genes")
