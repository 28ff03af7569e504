"""The notebook API (#26): ``sl.fit`` runs the very config and code of ``python train.py``, ``Run`` reads a run."""

import anndata as ad
import numpy as np
import pytest

import scimilarity_lora as sl
from helpers import run_train_cli

FAST = ["model=tiny", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "data.input_is_log1p=true"]


@pytest.fixture(scope="module")
def cells(pbmc, tmp_path_factory):
    """The bundled PBMCs as a user's AnnData (log1p in X), and the same cells in a file for the CLI."""
    adata = ad.AnnData(X=pbmc.raw.X.copy(), obs=pbmc.obs.copy(), var=pbmc.raw.var.copy())
    path = tmp_path_factory.mktemp("api") / "cells.h5ad"
    adata.write_h5ad(path)
    return adata, path


@pytest.fixture(scope="module")
def fitted(cells, tmp_path_factory):
    return sl.fit(cells[0].copy(), "bulk_labels", overrides=FAST, run_dir=tmp_path_factory.mktemp("fit") / "run")


@pytest.mark.slow
def test_fit_equals_the_command_line_on_the_same_cells(fitted, cells, tmp_path):
    r = run_train_cli(["data=h5ad", f"data.path={cells[1]}", "data.label_key=bulk_labels", *FAST,
                       f"hydra.run.dir={tmp_path / 'cli'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    cli = sl.Run.load(tmp_path / "cli")
    for key in ("test/accuracy", "test/macro_f1", "val/macro_f1", "test/loss"):
        assert fitted.metrics[key] == pytest.approx(cli.metrics[key], abs=1e-6), key
    assert [h["train/loss"] for h in fitted.metrics["history"] if "train/loss" in h] == pytest.approx(
        [h["train/loss"] for h in cli.metrics["history"] if "train/loss" in h], abs=1e-6)
    assert fitted.config.data.path.startswith("in-memory AnnData (700 cells")
    assert cli.config.data.path == str(cells[1]) and fitted.config.lora.r == cli.config.lora.r


def test_a_run_reads_back_and_annotates(fitted, cells):
    run = sl.Run.load(fitted.path)
    assert sum(run.metrics["n_cells"].values()) == 700 and set(run.predictor.classes) == set(cells[0].obs["bulk_labels"])
    other = cells[0][:50].copy()
    out = run.annotate(other, input_is_log1p=True, progress=False)
    assert out is other and other.obs["scimilarity_lora_label"].notna().all()
    assert other.obsm["X_scimilarity"].shape == (50, run.predictor.latent_dim)
    fig = run.plot_learning_curves()
    assert fig.axes and any(ax.lines for ax in fig.axes)


def test_evaluate_takes_an_anndata_and_writes_the_report(fitted, cells):
    report = fitted.evaluate(cells[0], "bulk_labels", input_is_log1p=True, majority_voting=False, name="self")
    assert report["n_cells_scored"] > 0 and 0 <= report["macro_f1"] <= 1
    assert report["query"].startswith("in-memory AnnData")
    assert (fitted.path / "evaluation" / "query" / "self" / "report.json").is_file()


def test_errors_are_exceptions_with_the_cli_message(cells, tmp_path):
    with pytest.raises(ValueError, match="label column 'no_such' not in obs"):
        sl.fit(cells[0].copy(), "no_such", overrides=FAST, run_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="not a finished training run"):
        sl.Run.load(tmp_path)
    with pytest.raises(Exception, match="Could not override 'lora.nonsense'|lora.nonsense"):
        sl.fit(cells[0].copy(), "bulk_labels", overrides=["+lora=nonsense", "lora.nonsense=1"], run_dir=tmp_path / "x")


def test_the_public_names_are_listed_and_import_lazily():
    import subprocess
    import sys

    assert {"fit", "pretrain", "Run", "annotate", "build_index"} <= set(sl.__all__)
    code = "import sys, scimilarity_lora as sl; print('lightning' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # importing the package costs nothing until a name is used
    assert callable(sl.fit) and sl.Run.__name__ == "Run"
    assert sl.api.config_dir().name == "conf"  # submodules too, as after `import scimilarity_lora.api`
    with pytest.raises(AttributeError):
        sl.no_such_thing
