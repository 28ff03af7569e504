"""Census streaming through the real code path (cellxgene_census.open_soma + tiledbsoma-ml), on a local store."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from conftest import make_counts_adata
from helpers import FAST, compose_train
from scimilarity_lora.data.anndata import DataError
from scimilarity_lora.data.census import CensusBatch, CensusDataModule
from scimilarity_lora.data.soma_store import OBS_COLUMNS, pbmc_counts, write_census_store
from scimilarity_lora.labels import LabelError
from scimilarity_lora.preprocess import Preprocessing
from scimilarity_lora.training.run import run


@pytest.fixture(scope="session")
def store_adata():
    return pbmc_counts(n_cells=3000, n_donors=8, seed=0)


@pytest.fixture(scope="session")
def store(tmp_path_factory, store_adata):
    return write_census_store(store_adata, tmp_path_factory.mktemp("census") / "soma")


def datamodule(store, genes, **kw):
    dm = CensusDataModule(uri=str(store), batch_size=64, io_batch_size=512, seed=0, **kw)
    dm.gene_order = genes
    dm.setup("fit")
    return dm


def joinids_of(dataset, epoch):
    dataset.set_epoch(epoch)
    return np.concatenate([obs["soma_joinid"].to_numpy() for _, obs in dataset])


def test_bundled_pbmc_counts_are_real_integer_counts(pbmc):
    counts = pbmc_counts()
    assert np.all(counts.X.data == np.round(counts.X.data)) and counts.X.data.min() >= 1
    # re-normalising the recovered counts reproduces the shipped log-normalised values (up to their float16-ish precision)
    ref = Preprocessing(input_is_log1p=True)(sp.csr_matrix(pbmc.raw.X)).numpy()
    ours = Preprocessing()(counts.X).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_store_is_census_shaped(store):
    import cellxgene_census

    with cellxgene_census.open_soma(uri=str(store)) as census:
        assert set(census.keys()) == {"census_info", "census_data"}
        assert {"summary", "datasets"} <= set(census["census_info"].keys())
        exp = census["census_data"]["homo_sapiens"]
        schema = exp.obs.schema
        assert set(OBS_COLUMNS) | {"soma_joinid"} <= set(schema.names)
        assert str(schema.field("cell_type").type).startswith("dictionary")
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        assert {"feature_id", "feature_name", "feature_length"} <= set(var.columns)
        X = exp.ms["RNA"].X["raw"]
        assert X.schema.field("soma_data").type == "float" and X.shape[0] >= 3000


def test_splits_are_by_donor_and_identical_for_every_rank(store, store_adata):
    genes = list(store_adata.var["feature_name"])
    a, b = datamodule(store, genes), datamodule(store, genes)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_joinids[split], b.split_joinids[split])
    donors = {k: set(store_adata.obs["donor_id"].iloc[v].astype(str)) for k, v in a.split_joinids.items()}
    assert not donors["train"] & donors["val"] and not donors["train"] & donors["test"]
    assert not donors["val"] & donors["test"]
    assert sum(len(v) for v in a.split_joinids.values()) == 3000 - _rare_cells(store_adata, 10)


def _rare_cells(adata, min_cells):
    counts = adata.obs["cell_type"].value_counts()
    return int(counts[counts < min_cells].sum())


def test_epochs_shuffle_differently_but_cover_the_same_cells(store, store_adata):
    dm = datamodule(store, list(store_adata.var["feature_name"]))
    train = dm.datasets["train"]
    e0, e0_again, e1 = joinids_of(train, 0), joinids_of(train, 0), joinids_of(train, 1)
    np.testing.assert_array_equal(e0, e0_again)  # deterministic for (seed, epoch)
    assert not np.array_equal(e0, e1)
    assert sorted(e0) == sorted(e1) == sorted(dm.split_joinids["train"])


def test_ranks_get_disjoint_shards(store, store_adata, monkeypatch):
    genes = list(store_adata.var["feature_name"])
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(joinids_of(datamodule(store, genes).datasets["train"], 0)))
    n_train = len(datamodule(store, genes).split_joinids["train"])
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) and n_train - 1 <= len(seen[0] | seen[1]) <= n_train


def test_streamed_batches_equal_the_in_memory_path(store, store_adata, real_gene_order):
    """Same alignment + preprocessing code: a Census batch equals the AnnData path on the same cells."""
    dm = datamodule(store, real_gene_order)
    collate = CensusBatch(dm.alignment, dm.preprocessing, dm.label_key, dm.labels.classes, input_format="dense")
    X, obs = next(iter(dm.datasets["val"]))
    x, y = collate((X, obs))
    auto, _ = CensusBatch(dm.alignment, dm.preprocessing, dm.label_key, dm.labels.classes)((X, obs))
    assert type(auto).__name__ == "SparseBatch" and torch.equal(auto.to_dense(), x)  # 716 of 28,231 genes: sparse
    rows = obs["soma_joinid"].to_numpy()
    from scimilarity_lora.genes import align_genes, symbol_aliases

    al = align_genes(list(store_adata.var["feature_name"]), real_gene_order, aliases=symbol_aliases())
    expected = Preprocessing()(al.apply(store_adata.X[rows])).numpy()
    assert x.shape == (len(rows), 28231)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    assert dm.labels.decode(y.tolist()) == list(store_adata.obs["cell_type"].iloc[rows].astype(str))
    assert dm.alignment.n_overlap == 748 and len(dm.alignment.rescued) == 32  # 32 through old/alias symbols


def test_bad_inputs(store, store_adata, tmp_path):
    genes = list(store_adata.var["feature_name"])
    with pytest.raises(DataError, match="no SOMA store"):
        datamodule(tmp_path / "nope", genes)
    with pytest.raises(DataError, match="no cells match"):
        datamodule(store, genes, obs_value_filter="tissue_general == 'lung'")
    with pytest.raises(DataError, match="invalid data.obs_value_filter"):
        datamodule(store, genes, obs_value_filter="tissue_general === 'blood'")
    with pytest.raises(LabelError, match="cell_typo"):
        datamodule(store, genes, label_key="cell_typo")


def test_train_on_census_store(store, tmp_path):
    out = tmp_path / "run"
    run(compose_train(FAST + ["data=census", f"data.uri={store}", "data.io_batch_size=1024"], out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["census"]["uri"] == str(store) and metrics["census"]["census_version"] is None
    assert sum(metrics["n_cells"].values()) > 2900 and metrics["epochs_trained"] == 2
    splits = pd.read_csv(out / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"} and splits["soma_joinid"].is_unique


@pytest.mark.slow
def test_ddp_two_processes_shard_the_census_stream(store, tmp_path):
    """trainer=ddp on CPU (gloo, 2 processes): each rank streams its own half of the training cells."""
    import os

    from helpers import REPO, run_train_cli

    env = {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    seen = tmp_path / "seen"
    res = run_train_cli(["model=tiny", "data=census", f"data.uri={store}", "data.io_batch_size=1024",
                         "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
                         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}",
                         "+callbacks.rank._target_=rank_recorder.CellsPerRank", f"+callbacks.rank.out={seen}"],
                        env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    cells = {p.name: json.loads(p.read_text())["cells"] for p in seen.glob("*.json")}
    assert set(cells) == {"rank0_of2_epoch0.json", "rank1_of2_epoch0.json"}
    n_train = len(pd.read_csv(tmp_path / "run" / "splits.csv").query("split == 'train'"))
    assert abs(cells["rank0_of2_epoch0.json"] - cells["rank1_of2_epoch0.json"]) <= 64  # within one batch
    assert n_train - 128 <= sum(cells.values()) <= n_train  # together they cover the slice once, not twice


def test_unreachable_census_servers_say_what_to_do(monkeypatch):
    """The Census servers are a true boundary here: their failure is simulated, our handling is real."""
    import cellxgene_census
    import requests

    def offline(**kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded (NameResolutionError)")

    monkeypatch.setattr(cellxgene_census, "open_soma", offline)
    with pytest.raises(DataError, match="Census servers could not be reached .* data.uri=/path/to/soma"):
        CensusDataModule().open()


def test_pretraining_reads_a_census_slice_through_open_soma(store, store_adata, tmp_path):
    """pretrain.py's data.files takes a Census slice (here the local SOMA store, the same code path as the servers):
    cells by obs_value_filter, symbols from feature_name, CL ids from cell_type_ontology_term_id."""
    from helpers import compose_pretrain
    from scimilarity_lora.training.pretrain_run import run_pretraining

    files = (f"data.files=[{{uri: '{store}', obs_value_filter: \"donor_id in ['donor_0', 'donor_1', 'donor_2']\", "
             "label_key: cell_type, ontology_key: cell_type_ontology_term_id}]")
    run_pretraining(compose_pretrain(["model.hidden_dim=[32]", "model.latent_dim=8", "trainer.max_epochs=1",
                                      "trainer.enable_progress_bar=false", "data.label_to_ontology={}", files,
                                      "model.gene_order=scimilarity"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (source,) = metrics["inputs"]
    expected = int(store_adata.obs["donor_id"].isin(["donor_0", "donor_1", "donor_2"]).sum())
    assert source["census"] == str(store) and source["n_cells"] == expected
    assert source["n_overlap"] >= 0.9 * store_adata.n_vars  # symbols came from var.feature_name
    terms = store_adata.obs.drop_duplicates("cell_type").set_index("cell_type")["cell_type_ontology_term_id"]
    assert metrics["class_terms"] == {c: terms[c] for c in metrics["classes"]}
    assert metrics["n_cells"]["train"] + metrics["n_cells"]["val"] == expected
    assert np.isfinite(metrics["train/loss"]) and (tmp_path / "model" / "encoder.ckpt").is_file()


def test_pretraining_streams_a_census_slice(store, store_adata, tmp_path):
    """data=pretrain_census_stream: the training stream (open_soma + tiledbsoma-ml) feeds pretraining, with each
    label's CL id read from the store for ontology-aware mining."""
    from helpers import compose_pretrain
    from scimilarity_lora.training.pretrain_run import run_pretraining

    run_pretraining(compose_pretrain(["data=pretrain_census_stream", f"data.uri={store}", "data.io_batch_size=1024",
                                      "data.batch_size=128", "model.gene_order=scimilarity", "model.hidden_dim=[32]",
                                      "model.latent_dim=8", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"],
                                     tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    terms = store_adata.obs.drop_duplicates("cell_type").set_index("cell_type")["cell_type_ontology_term_id"]
    assert metrics["class_terms"] == {c: terms[c] for c in metrics["classes"]} and len(metrics["classes"]) >= 5
    assert metrics["census"]["uri"] == str(store)
    history = metrics["history"]
    assert [r["epoch"] for r in history] == [0, 1] and history[1]["train/loss"] < history[0]["train/loss"]
    assert all(r["train/n_triplets"] > 0 for r in history)  # streamed batches hold positives
    assert (tmp_path / "model" / "encoder.ckpt").is_file() and not (tmp_path / "holdout.csv").exists()


def _dense_pass(loader):
    xs, ys = zip(*loader)
    return (torch.cat([x.to_dense() if hasattr(x, "to_dense") else x for x in xs]).numpy(), torch.cat(ys).numpy())


def test_evaluation_reads_a_sample_of_a_split_as_exactly_those_cells(store, real_gene_order, tmp_path):
    """``eval_dataloader(split, rows)`` (how evaluation's baselines and calibration's centroids take a sample of a
    million-cell split) yields the split's rows at those positions, in order, and nothing else; the same for
    both data modules."""
    from scimilarity_lora.data.anndata import AnnDataModule
    from scimilarity_lora.data.splits import uniform_sample

    dm = datamodule(store, real_gene_order)
    n = len(dm.split_ids()["train"])
    rows = uniform_sample(n, 150, seed=3)
    assert len(rows) == 150 < n
    x_all, y_all = _dense_pass(dm.eval_dataloader("train"))
    x_some, y_some = _dense_pass(dm.eval_dataloader("train", rows=rows))
    assert len(y_all) == n and x_some.shape == (150, 28231)
    np.testing.assert_array_equal(y_some, y_all[rows])
    np.testing.assert_allclose(x_some, x_all[rows], atol=1e-6)

    path = tmp_path / "cells.h5ad"
    make_counts_adata(300, 120).write_h5ad(path)
    adm = AnnDataModule(path=str(path), label_key="cell_type", layer="X", input_is_log1p=False)
    adm.gene_order = [f"GENE{i}" for i in range(120)]
    adm.setup()
    n = len(adm.split_ids()["train"])
    rows = uniform_sample(n, 50, seed=3)
    x_all, y_all = _dense_pass(adm.eval_dataloader("train"))
    x_some, y_some = _dense_pass(adm.eval_dataloader("train", rows=rows))
    np.testing.assert_array_equal(y_some, y_all[rows])
    np.testing.assert_allclose(x_some, x_all[rows], atol=1e-6)
