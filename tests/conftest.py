"""Shared fixtures. Tests use tiny encoders where size does not matter and real data throughout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
SHARED_GENE_ORDER = REPO.parent / "shared" / "data" / "gene_order.tsv"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="session")
def real_gene_order() -> list[str]:
    if not SHARED_GENE_ORDER.is_file():
        pytest.skip(f"SCimilarity's gene order is not at {SHARED_GENE_ORDER}")
    from scimilarity_lora.genes import read_gene_order

    return read_gene_order(SHARED_GENE_ORDER)


def synthetic_counts(n_cells: int, n_genes: int, density: float = 0.1, seed: int = 0) -> sp.csr_matrix:
    """Sparse integer counts with a realistic spread of library sizes."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = rng.poisson(lam=3.0, size=X.data.size).astype(np.float32) + 1
    return X


def make_counts_adata(n_cells: int = 300, n_genes: int = 120, n_donors: int = 6, n_types: int = 3, seed: int = 0):
    """An AnnData with raw counts, donors and cell types whose expression differs by type (learnable)."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    base = rng.gamma(1.0, 1.0, size=(n_types, n_genes))
    lam = base[types] * 2
    X = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in types]),
            "donor_id": pd.Categorical([f"donor_{i % n_donors}" for i in range(n_cells)]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(n_genes)]}, index=[f"GENE{i}" for i in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)
