"""Write a local SOMA store laid out like the CELLxGENE Census, from any AnnData with counts.

The store is opened with ``cellxgene_census.open_soma(uri=...)`` through exactly the code path the real Census
uses (only the URI differs), for offline users, mirrors, tests and benchmarks::

    <root>/                                   SOMA Collection
      census_info/summary                     DataFrame (label, value)
      census_info/datasets                    DataFrame (dataset_id, dataset_title, ...)
      census_data/homo_sapiens                Experiment
        obs                                   soma_joinid, dataset_id, assay, cell_type, cell_type_ontology_term_id,
                                              donor_id, disease, tissue_general, is_primary_data, suspension_type, ...
        ms['RNA'].var                         soma_joinid, feature_id (Ensembl), feature_name (symbol), feature_length
        ms['RNA'].X['raw']                    float32 counts

CLI (a PBMC store from the bundled real data, resampled to any size)::

    python -m scimilarity_lora.data.soma_store outputs/pbmc_soma --n-cells 100000 [--h5ad outputs/pbmc_100k.h5ad]

``--h5ad`` also writes the same cells as an ``.h5ad`` (CSR counts, gene symbols as var names), so a benchmark can
read one set of cells from either.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

log = logging.getLogger(__name__)

#: Census obs columns this store provides (strings are written dictionary-encoded, as in the Census).
OBS_COLUMNS = ("dataset_id", "assay", "cell_type", "cell_type_ontology_term_id", "donor_id", "disease",
               "tissue_general", "is_primary_data", "suspension_type", "sex", "development_stage")

#: pbmc68k_reduced's bulk labels as Cell Ontology terms (what the Census calls them).
PBMC_CELL_TYPES = {
    "CD14+ Monocyte": ("CD14-positive monocyte", "CL:0001054"),
    "CD19+ B": ("B cell", "CL:0000236"),
    "CD34+": ("hematopoietic precursor cell", "CL:0008001"),
    "CD4+/CD25 T Reg": ("regulatory T cell", "CL:0000815"),
    "CD4+/CD45RA+/CD25- Naive T": ("naive thymus-derived CD4-positive, alpha-beta T cell", "CL:0000895"),
    "CD4+/CD45RO+ Memory": ("CD4-positive, alpha-beta memory T cell", "CL:0000897"),
    "CD56+ NK": ("natural killer cell", "CL:0000623"),
    "CD8+ Cytotoxic T": ("CD8-positive, alpha-beta cytotoxic T cell", "CL:0000794"),
    "CD8+/CD45RA+ Naive Cytotoxic": ("naive thymus-derived CD8-positive, alpha-beta T cell", "CL:0000900"),
    "Dendritic": ("dendritic cell", "CL:0000451"),
}


def write_census_store(adata: ad.AnnData, root: str | Path, *, census_version: str = "local") -> Path:
    """Write ``adata`` (X = counts; obs with the Census columns; var with feature_id/feature_name) as a
    Census-shaped SOMA collection at ``root``."""
    import tiledbsoma
    import tiledbsoma.io

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; remove it or choose another path")
    missing = [c for c in OBS_COLUMNS if c not in adata.obs.columns]
    if missing:
        raise ValueError(f"obs lacks Census columns {missing}")
    for c in ("feature_id", "feature_name"):
        if c not in adata.var.columns:
            raise ValueError(f"var lacks {c!r}")
    adata = adata.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    for c in adata.obs.columns:
        if adata.obs[c].dtype == object:
            adata.obs[c] = adata.obs[c].astype("category")
    var = adata.var.copy()
    var.index = var.pop("feature_id").astype(str).rename("feature_id")
    adata.var = var
    if "feature_length" not in adata.var:
        adata.var["feature_length"] = np.int64(1000)

    with tiledbsoma.Collection.create(str(root)) as census:
        info = census.add_new_collection("census_info")
        _write_dataframe(info, "summary", pd.DataFrame({
            "label": ["census_schema_version", "census_build_date", "total_cell_count"],
            "value": ["2.1.0", census_version, str(adata.n_obs)],
        }))
        datasets = adata.obs["dataset_id"].astype(str).unique()
        _write_dataframe(info, "datasets", pd.DataFrame({
            "collection_id": ["local"] * len(datasets),
            "dataset_id": datasets,
            "dataset_title": [f"local dataset {d}" for d in datasets],
            "dataset_total_cell_count": [int((adata.obs["dataset_id"] == d).sum()) for d in datasets],
        }))
        data = census.add_new_collection("census_data")
    exp_uri = str(root / "census_data" / "homo_sapiens")
    tiledbsoma.io.from_anndata(exp_uri, adata, measurement_name="RNA", X_layer_name="raw",
                               obs_id_name="obs_id", var_id_name="feature_id")
    with tiledbsoma.Collection.open(str(root / "census_data"), mode="w") as data, \
            tiledbsoma.Experiment.open(exp_uri) as exp:
        data.set("homo_sapiens", exp, use_relative_uri=True)
    log.info("wrote a Census-shaped SOMA store with %d cells x %d genes to %s", adata.n_obs, adata.n_vars, root)
    return root


def _write_dataframe(collection, key: str, df: pd.DataFrame) -> None:
    import tiledbsoma

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.append_column("soma_joinid", pa.array(np.arange(len(df), dtype=np.int64)))
    with collection.add_new_dataframe(key, schema=table.schema, domain=[(0, max(len(df) - 1, 0))]) as sdf:
        sdf.write(table)


def pbmc_counts(n_cells: int | None = None, n_donors: int = 8, seed: int = 0) -> ad.AnnData:
    """Real PBMC counts with Census metadata, from scanpy's bundled ``pbmc68k_reduced``.

    Its ``.raw`` is log1p(counts * s) per cell; ``expm1`` divided by each cell's smallest non-zero value recovers
    integer counts. ``n_cells`` larger than 700 resamples cells (with Poisson noise on their counts) to build a
    large store with the same cell-type mix. Donors are assigned at random (the source has none).
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    scaled = sp.csr_matrix(src.raw.X, dtype=np.float64)
    np.expm1(scaled.data, out=scaled.data)
    unit = np.array([row.data.min() if row.nnz else 1.0 for row in scaled])
    counts = sp.diags(1.0 / unit) @ scaled
    counts.data = np.round(counts.data)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    labels = src.obs["bulk_labels"].astype(str).to_numpy()

    rng = np.random.default_rng(seed)
    if n_cells is not None and n_cells != src.n_obs:
        pick = rng.integers(0, src.n_obs, n_cells)
        counts = counts[pick].tocsr()
        counts.data = rng.poisson(counts.data).astype(np.float32)
        counts.eliminate_zeros()
        labels = labels[pick]
    n = counts.shape[0]
    cell_type = [PBMC_CELL_TYPES[x][0] for x in labels]
    obs = pd.DataFrame({
        "dataset_id": "0e6c0a62-226e-47d3-933e-a753237189f7",
        "assay": "10x 3' v1",
        "cell_type": cell_type,
        "cell_type_ontology_term_id": [PBMC_CELL_TYPES[x][1] for x in labels],
        "donor_id": [f"donor_{i}" for i in rng.integers(0, n_donors, n)],
        "disease": "normal",
        "tissue_general": "blood",
        "is_primary_data": True,
        "suspension_type": "cell",
        "sex": "unknown",
        "development_stage": "adult stage",
    }, index=[f"cell_{i}" for i in range(n)])
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype("category")
    genes = list(src.raw.var_names)
    var = pd.DataFrame({"feature_id": [f"ENSG_LOCAL_{i:05d}" for i in range(len(genes))],
                        "feature_name": genes}, index=genes)
    return ad.AnnData(X=counts, obs=obs, var=var)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to create")
    parser.add_argument("--n-cells", type=int, default=None, help="resample the 700 bundled PBMCs to this many")
    parser.add_argument("--n-donors", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--h5ad", default=None, help="also write the same cells to this .h5ad")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cells = pbmc_counts(args.n_cells, args.n_donors, args.seed)
    if args.h5ad:
        Path(args.h5ad).parent.mkdir(parents=True, exist_ok=True)
        cells.write_h5ad(args.h5ad)
        log.info("wrote %d cells x %d genes to %s", cells.n_obs, cells.n_vars, args.h5ad)
    write_census_store(cells, args.out)


if __name__ == "__main__":
    main()
