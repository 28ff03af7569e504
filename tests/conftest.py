"""Shared fixtures. Tests use tiny encoders where size does not matter and real data throughout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
#: real data beside the project (never inside it); tests needing it skip with a message where it is absent
SHARED_REAL_DATA = REPO.parent / "shared" / "data" / "real"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# random stand-in bases go to one store per test session (paths.base_store), not the repository's outputs/bases;
# tests that alter a stored base copy it first, since runs with the same seed and sizes share it
os.environ.setdefault("SCIMILARITY_LORA_BASE_STORE", tempfile.mkdtemp(prefix="scimilarity_lora_bases_"))


@pytest.fixture(scope="session")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="session")
def real_gene_order() -> list[str]:
    """SCimilarity's 28,231-gene order, as the package ships it."""
    from scimilarity_lora.genes import scimilarity_gene_order

    return scimilarity_gene_order()


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
