"""Every way bad training data can enter gets a clear error or a documented, logged repair."""

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import make_counts_adata
from scimilarity_lora.data.anndata import AnnDataModule
from scimilarity_lora.data.splits import SplitError, split_cells
from scimilarity_lora.genes import GeneAlignmentError
from scimilarity_lora.labels import LabelError
from scimilarity_lora.preprocess import InvalidExpressionError


def setup_module_on(adata, tmp_path, genes=None, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    params = dict(path=str(path), label_key="cell_type", layer="X", input_is_log1p=False, min_gene_overlap=10)
    params.update(kw)
    dm = AnnDataModule(**params)
    dm.gene_order = genes or list(adata.var_names)
    dm.setup("fit")
    return dm


def test_a_label_with_one_cell_is_dropped_and_logged(tmp_path, caplog):
    adata = make_counts_adata(n_cells=200)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["singleton"])
    adata.obs.iloc[0, adata.obs.columns.get_loc("cell_type")] = "singleton"
    with caplog.at_level(logging.WARNING):
        dm = setup_module_on(adata, tmp_path, min_cells_per_class=2)
    assert "singleton" not in dm.labels.classes
    assert "dropping classes with fewer than 2 cells: {'singleton': 1}" in caplog.text
    assert sum(len(v) for v in dm.splits.as_dict().values()) == 199


def test_too_few_donors_for_a_donor_split(tmp_path):
    with pytest.raises(SplitError, match="at least 3 donors, found 2"):
        setup_module_on(make_counts_adata(n_donors=2), tmp_path, donor_key="donor_id")


def test_an_empty_split_is_refused():
    with pytest.raises(SplitError, match="invalid split fractions"):
        split_cells(np.zeros(10, dtype=int), val_fraction=0.5, test_fraction=0.5)


def test_a_split_too_small_for_every_class_names_the_setting_and_the_fraction_that_works():
    labels = np.repeat(np.arange(10), 70)  # 700 cells, 10 classes (pbmc68k_reduced's shape)
    with pytest.raises(SplitError, match=r"data.test_fraction=0.01 gives 7 test cells of 700 for 10 classes.*"
                                         r"data.test_fraction=0.015 or more"):
        split_cells(labels, test_fraction=0.01)
    splits = split_cells(labels, test_fraction=0.015)  # the fraction named works, every class in every split
    assert all(len(np.unique(labels[part])) == 10 for part in splits.as_dict().values())
    with pytest.raises(SplitError, match="data.val_fraction=0.005"):
        split_cells(labels, val_fraction=0.005)


def test_duplicated_gene_names(tmp_path):
    adata = make_counts_adata()
    adata.var_names = ["GENE0"] + list(adata.var_names[1:-1]) + ["GENE0"]
    with pytest.raises(GeneAlignmentError, match="occur more than once"):
        setup_module_on(adata, tmp_path, genes=[f"GENE{i}" for i in range(120)])


def test_ensembl_ids_when_symbols_expected_can_use_the_id_column(tmp_path):
    adata = make_counts_adata()
    ids = list(adata.var["gene_ids"])
    model = ids  # a model whose gene order is Ensembl ids
    with pytest.raises(GeneAlignmentError, match="only 0 of"):
        setup_module_on(adata, tmp_path, genes=model)
    dm = setup_module_on(adata, tmp_path / "ok", genes=model, gene_ids_key="gene_ids")
    assert dm.alignment.n_overlap == 120


def test_too_few_overlapping_genes(tmp_path):
    adata = make_counts_adata()
    with pytest.raises(GeneAlignmentError, match="at least 50 are required"):
        setup_module_on(adata, tmp_path, genes=[f"GENE{i}" for i in range(20)] + [f"OTHER{i}" for i in range(200)],
                        min_gene_overlap=50)


def test_log_normalised_layer_declared_as_counts(tmp_path, pbmc):
    adata = pbmc.raw.to_adata()
    adata.obs["cell_type"] = pbmc.obs["bulk_labels"].values
    with pytest.raises(InvalidExpressionError, match="looks log-normalised"):
        setup_module_on(adata, tmp_path, input_is_log1p=False)


def test_counts_declared_as_log_normalised(tmp_path):
    adata = make_counts_adata(n_cells=100)
    adata.X = adata.X * 20  # deep-sequenced counts: far above any log1p(normalize_total(1e4)) value
    with pytest.raises(InvalidExpressionError, match="look like raw counts"):
        setup_module_on(adata, tmp_path, input_is_log1p=True)


def test_nan_values(tmp_path):
    adata = make_counts_adata()
    X = adata.X.toarray()
    X[3, 4] = np.nan
    adata.X = sp.csr_matrix(X)
    with pytest.raises(InvalidExpressionError, match="NaN or infinite"):
        setup_module_on(adata, tmp_path)


def test_missing_label_values_are_dropped_and_logged(tmp_path, caplog):
    adata = make_counts_adata(n_cells=120)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:5, adata.obs.columns.get_loc("cell_type")] = None
    with caplog.at_level(logging.WARNING):
        dm = setup_module_on(adata, tmp_path)
    assert "dropping 5 cells with no 'cell_type' label" in caplog.text
    assert sum(len(v) for v in dm.splits.as_dict().values()) == 115


def test_cells_without_expression_are_dropped_from_training_and_reported(tmp_path, caplog):
    adata = make_counts_adata(n_cells=200)
    X = adata.X.tolil()
    X[[3, 7], :] = 0
    adata.X = X.tocsr()
    with caplog.at_level(logging.WARNING):
        dm = setup_module_on(adata, tmp_path)
    assert "dropping 2 cells with no expression in the model's genes" in caplog.text
    assert sum(len(v) for v in dm.splits.as_dict().values()) == 198
    assert dm.summary()["n_cells_without_expression"] == 2
    assert not {"cell_3", "cell_7"} & set(np.concatenate(list(dm.split_ids().values())))


def test_annotate_leaves_cells_without_expression_unlabelled(pbmc):
    from helpers import make_predictor
    from scimilarity_lora.inference.annotate import annotate

    adata = pbmc.raw.to_adata()[:20].copy()
    X = adata.X.tolil()
    X[5, :] = 0
    adata.X = X.tocsr()
    annotate(adata, make_predictor(list(adata.var_names)), input_is_log1p=True, progress=False)
    status = adata.obs["scimilarity_lora_status"]
    assert status.iloc[5] == "no_expression" and (status.drop(status.index[5]) == "ok").all()
    assert adata.obs["scimilarity_lora_label"].isna().iloc[5] and adata.obs["scimilarity_lora_label"].notna().sum() == 19
    assert np.isnan(adata.obs["scimilarity_lora_confidence"].iloc[5]) and np.isnan(adata.obsm["X_scimilarity"][5]).all()
    assert adata.uns["scimilarity_lora"]["n_cells_without_expression"] == 1


# -- files handed to `annotate` (issue #23.10): one line each, checked before anything large is allocated ------------
def _annotate_cli(tmp_path, src, *extra):
    import subprocess
    import sys

    from helpers import REPO, make_predictor

    model = tmp_path / "model"
    if not model.is_dir():
        from scimilarity_lora.inference.artifact import save_model_dir

        p = make_predictor([f"G{i}" for i in range(60)], classes=list("ab"))
        save_model_dir(p.classifier, p.spec, model)
    return subprocess.run([sys.executable, "-m", "scimilarity_lora.inference.annotate", str(model), str(src),
                           str(tmp_path / "out.h5ad")], cwd=REPO, capture_output=True, text=True, timeout=300)


def _counts_file(tmp_path, name="cells.h5ad", n_cells=40):
    import anndata as ad

    from conftest import synthetic_counts

    a = ad.AnnData(synthetic_counts(n_cells, 60))
    a.var_names = [f"G{i}" for i in range(60)]
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    path = tmp_path / name
    a.write_h5ad(path)
    return path


def _one_line_error(res, says):
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and says in res.stderr


def test_annotate_refuses_a_file_whose_matrix_does_not_match_obs_and_var(tmp_path):
    import h5py

    path = _counts_file(tmp_path)
    with h5py.File(path, "r+") as f:
        index = f["obs"].attrs["_index"]
        keep = f["obs"][index][:-3]
        del f["obs"][index]
        f["obs"].create_dataset(index, data=keep)
    _one_line_error(_annotate_cli(tmp_path, path), "X is 40 x 60 but obs has 37 cells and var 60 genes")


def test_annotate_refuses_duplicated_gene_names_with_one_line(tmp_path):
    import anndata as ad

    path = _counts_file(tmp_path)
    a = ad.read_h5ad(path)
    a.var_names = ["G0"] + [f"G{i}" for i in range(59)]
    a.write_h5ad(path)
    _one_line_error(_annotate_cli(tmp_path, path), "gene names occur more than once")


def test_a_dense_matrix_larger_than_memory_is_refused_before_it_is_read(tmp_path):
    """A 1.5 MB file declaring a dense 10^7 x 765 X asked for 28.5 GiB before any check."""
    import h5py
    import numpy as np

    path = _counts_file(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["X"]
        f.create_dataset("X", shape=(10**7, 765), dtype="f4", chunks=(10_000, 765), compression="gzip")
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        index = f["obs"].attrs["_index"]
        del f["obs"][index]
        f["obs"].create_dataset(index, shape=(10**7,), dtype="S9", compression="gzip")
        del f["var"][f["var"].attrs["_index"]]
        f["var"].create_dataset(f["var"].attrs["_index"], data=np.array([f"G{i}" for i in range(765)], dtype="S5"))
    assert path.stat().st_size < 3_000_000
    res = _annotate_cli(tmp_path, path)
    _one_line_error(res, "X is stored dense, 10,000,000 x 765 (28.5 GiB when read)")


def test_annotate_refuses_a_string_typed_matrix(pbmc):
    import anndata as ad

    from helpers import make_predictor
    from scimilarity_lora.inference.annotate import annotate

    a = ad.AnnData(np.full((4, 60), "1.5", dtype="<U3"))
    a.var_names = [f"G{i}" for i in range(60)]
    with pytest.raises(InvalidExpressionError, match="must be numbers, but the matrix holds <U3 values"):
        annotate(a, make_predictor([f"G{i}" for i in range(60)]), progress=False)


def test_gene_names_that_are_not_text_are_one_line(tmp_path):
    import h5py

    from scimilarity_lora.data.io import DataError, read_anndata

    path = _counts_file(tmp_path)
    with h5py.File(path, "r+") as f:
        index = f["var"].attrs["_index"]
        del f["var"][index]
        f["var"].create_dataset(index, data=np.array([b"\xff\xfe"] + [f"G{i}".encode() for i in range(1, 60)],
                                                     dtype="S3"))
    with pytest.raises(DataError, match="cannot read .* UnicodeDecodeError"):
        read_anndata(str(path))
    _one_line_error(_annotate_cli(tmp_path, path), "UnicodeDecodeError")
