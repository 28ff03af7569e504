import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from conftest import synthetic_counts
from scimilarity_lora.genes import align_genes
from scimilarity_lora.preprocess import InvalidExpressionError, Preprocessing


def scanpy_reference(counts: sp.csr_matrix) -> np.ndarray:
    """SCimilarity's lognorm_counts: normalize_total(1e4) then log1p, via scanpy."""
    a = ad.AnnData(counts.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a.X.toarray()


def test_matches_scanpy_normalize_total_log1p_after_alignment():
    counts = synthetic_counts(50, 40, density=0.3)
    data_genes = [f"G{i}" for i in range(40)]
    model_genes = [f"G{i}" for i in range(10, 60)]  # 30 shared genes, 20 missing in the data
    al = align_genes(data_genes, model_genes)
    ours = Preprocessing()(al.apply(counts)).numpy()
    # SCimilarity aligns first, then normalises over the model's genes only
    expected = scanpy_reference(al.apply(counts))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert ours.shape == (50, 50)


def test_log1p_input_is_renormalised_to_the_same_result():
    counts = synthetic_counts(30, 25, density=0.4, seed=1)
    a = ad.AnnData(counts.copy())
    sc.pp.normalize_total(a, target_sum=3.3e3)  # any target: normalisation is scale-invariant per cell
    sc.pp.log1p(a)
    from_counts = Preprocessing()(counts).numpy()
    from_log = Preprocessing(input_is_log1p=True)(sp.csr_matrix(a.X)).numpy()
    np.testing.assert_allclose(from_log, from_counts, rtol=1e-4, atol=1e-4)


def test_a_cell_with_no_counts_is_refused_by_name():
    """Nothing to normalise: it must never reach the model (it used to get a confident label)."""
    from scimilarity_lora.preprocess import EmptyCellError

    X = sp.csr_matrix(np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 0.0]], dtype=np.float32))
    with pytest.raises(EmptyCellError, match="cell 1: no expression in the model's genes") as e:
        Preprocessing()(X)
    assert list(e.value.rows) == [1]
    assert list(Preprocessing().nonempty_rows(X)) == [True, False, True]


@pytest.mark.parametrize("scale", [1e-40, 1e-45, 2e38])
def test_extreme_totals_normalise_like_ordinary_ones(scale):
    """float32 totals underflowed (1e-40 -> NaN) or overflowed (2 x 2e38 -> inf -> all zero); float64 does not."""
    ref = Preprocessing()(sp.csr_matrix(np.array([[1.0, 1.0, 0.0]], dtype=np.float32))).numpy()
    X = sp.csr_matrix(np.array([[1.0, 1.0, 0.0]], dtype=np.float32) * np.float32(scale))
    assert X.data.min() > 0  # still representable in float32
    out = Preprocessing()(X).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-5)


@pytest.mark.parametrize(
    "value, message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1.0, "negative")]
)
def test_invalid_values_are_refused(value, message):
    X = sp.csr_matrix(np.array([[1.0, value]], dtype=np.float32))
    with pytest.raises(InvalidExpressionError, match=message):
        Preprocessing()(X)


def test_counts_declared_log1p_are_refused():
    X = sp.csr_matrix(np.array([[100.0, 3.0]], dtype=np.float32))
    with pytest.raises(InvalidExpressionError, match="look like raw counts"):
        Preprocessing(input_is_log1p=True)(X)


def test_log1p_data_declared_counts_is_detected():
    counts = synthetic_counts(100, 50, density=0.3)
    logged = np.log1p(counts.data * 1.37)
    with pytest.raises(InvalidExpressionError, match="looks log-normalised"):
        Preprocessing().check_kind(logged)
    Preprocessing().check_kind(counts.data)  # real counts pass
