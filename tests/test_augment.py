"""Depth downsampling and gene dropout (data/augment.py): what they do to counts, and that only training sees them."""

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import make_counts_adata, synthetic_counts
from scimilarity_lora.data.anndata import AnnDataModule
from scimilarity_lora.data.augment import AugmentError, CountAugment


def test_thinning_keeps_the_expected_share_of_counts_as_integers():
    X = synthetic_counts(400, 300, density=0.2, seed=1)
    Y = CountAugment(downsample_fraction=1.0, downsample_min=0.5, seed=3)(X, np.arange(400))
    assert Y.sum() / X.sum() == pytest.approx(0.75, abs=0.02)  # E[p] for p ~ U(0.5, 1)
    assert (Y.data == np.rint(Y.data)).all() and (Y.data > 0).all()  # counts stay counts, zeros are dropped
    assert (Y.toarray() <= X.toarray()).all()  # thinning never adds a count
    assert X.sum() == synthetic_counts(400, 300, density=0.2, seed=1).sum()  # the input is untouched


def test_only_a_share_of_cells_is_thinned_and_dropout_zeroes_entries():
    X = synthetic_counts(1000, 200, density=0.2, seed=2)
    Y = CountAugment(downsample_fraction=0.3, downsample_min=0.3, seed=0)(X, np.arange(1000))
    changed = np.asarray((abs(Y - X)).sum(axis=1)).ravel() > 0
    assert changed.mean() == pytest.approx(0.3, abs=0.05)
    D = CountAugment(gene_dropout=0.2, seed=0)(X, np.arange(1000))
    assert D.nnz / X.nnz == pytest.approx(0.8, abs=0.01)
    kept = D.multiply(X > 0)
    np.testing.assert_array_equal(kept.toarray()[D.toarray() > 0], X.toarray()[D.toarray() > 0])  # values unchanged


def test_the_draw_is_a_function_of_the_batch_and_no_cell_is_emptied():
    X = sp.csr_matrix(np.array([[1, 0, 0], [3, 4, 0], [0, 0, 2]], dtype=np.float32))
    augment = CountAugment(downsample_fraction=1.0, downsample_min=0.01, gene_dropout=0.9, seed=5)
    a, b = augment(X, np.array([7, 8, 9])), augment(X, np.array([7, 8, 9]))
    assert (a != b).nnz == 0  # same batch, same draw (exact resume)
    assert (np.asarray(a.sum(axis=1)).ravel() > 0).all()  # a cell left without counts keeps its row
    other = [augment(synthetic_counts(50, 40, seed=0), np.arange(i, i + 50)) for i in (0, 1)]
    assert (other[0] != other[1]).nnz > 0  # another batch, another draw


@pytest.mark.parametrize("kwargs, message", [
    ({"downsample_fraction": 1.5}, "downsample_fraction must be in"),
    ({"downsample_min": 0.0}, "downsample_min must be in"),
    ({"gene_dropout": 1.0}, "remove every count"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(AugmentError, match=message):
        CountAugment(**kwargs)


def test_only_the_training_split_is_augmented(tmp_path):
    path = tmp_path / "counts.h5ad"
    make_counts_adata(300, 120).write_h5ad(path)
    dm = AnnDataModule(path=str(path), label_key="cell_type", layer="X", input_is_log1p=False, input_format="dense",
                       augment={"downsample_fraction": 1.0, "downsample_min": 0.3})
    dm.gene_order = [f"GENE{i}" for i in range(120)]
    dm.setup()
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert train.augment is not None and val.augment is None
    idx = list(range(16))
    x_aug, _ = train.__getitems__(idx)
    plain = CountAugment()
    train.augment, saved = None, train.augment
    x_plain, _ = train.__getitems__(idx)
    train.augment = saved
    assert not np.allclose(x_aug.numpy(), x_plain.numpy()) and not plain.active


def test_thinning_log1p_input_keeps_only_gene_dropout_and_says_so(caplog):
    both = CountAugment(downsample_fraction=0.5, gene_dropout=0.1)
    with caplog.at_level("WARNING"):
        on_log1p = both.for_input(input_is_log1p=True)
    assert on_log1p == CountAugment(downsample_fraction=0.0, gene_dropout=0.1) and on_log1p.active
    assert "thins raw counts" in caplog.text and "only gene dropout applies" in caplog.text
    assert both.for_input(input_is_log1p=False) == both  # counts: both apply


def test_a_log1p_file_asked_to_thin_trains_with_gene_dropout_only(caplog, pbmc):
    """data=h5ad asks for thinning by default: a log-normalised file must still train, the thinning dropped."""
    dm = AnnDataModule(path="pbmc68k_reduced", label_key="bulk_labels", layer="raw", input_is_log1p=True,
                       augment={"downsample_fraction": 0.5, "gene_dropout": 0.1})
    dm.gene_order = list(pbmc.raw.var_names)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.datasets["train"].augment == CountAugment(downsample_fraction=0.0, gene_dropout=0.1, seed=dm.seed)
    assert "only gene dropout applies" in caplog.text
