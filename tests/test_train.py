"""End-to-end training through the real Hydra config, Lightning Trainer and peft, on the bundled PBMC data."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_counts_adata
from helpers import REPO, FAST, compose_train, run_train_cli
from scimilarity_lora.training.checkpoint_io import classifier_from_checkpoint
from scimilarity_lora.data.anndata import DataError
from scimilarity_lora.labels import LabelError
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.training.run import run
from scimilarity_lora.model.folder import resolve_model_dir

REQUIRED = {"test/accuracy", "test/macro_f1", "test/per_class_f1", "val/macro_f1", "trainable_params",
            "total_params", "train_seconds", "cells_per_second", "gene_overlap"}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(FAST + ["trainer.max_epochs=4", "lora.r=4"], out)
    value = run(cfg)
    return out, value


def test_run_dir_contents(trained_run, pbmc):
    out, value = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert REQUIRED <= set(metrics)
    assert value == pytest.approx(metrics["val/macro_f1"])  # what a sweeper optimises
    assert 0 <= metrics["test/accuracy"] <= 1 and 0 <= metrics["test/macro_f1"] <= 1
    assert set(metrics["test/per_class_f1"]) == set(pbmc.obs["bulk_labels"].unique())
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["cells_per_second"] > 0 and metrics["train_seconds"] > 0
    # the loop's rate includes waiting for data, so it can only be slower than the steps' own
    assert 0 < metrics["stream_cells_per_second"] <= metrics["cells_per_second"]
    # measured from process start (imports included), so at least the time this test session has been running
    assert 0 < metrics["seconds_to_first_batch"] and metrics["global_step"] == 4 * 4
    assert metrics["gene_overlap"]["n_overlap"] == 765
    assert metrics["finetune"]["mode"] == "lora" and metrics["finetune"]["r"] == 4
    # adapter-sized: the best checkpoint's tensors are model/'s, so only last.ckpt (for training further) stays
    assert list((out / "checkpoints").glob("epoch*.ckpt")) == [] and metrics["best_checkpoint"] is None
    assert (out / "checkpoints" / "last.ckpt").is_file()
    for name in ("model_config.json", "head.safetensors",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / "model" / name).is_file(), name
    # adapter-only: the base's weights and gene list are stored once, elsewhere; the config names them by hash
    assert not (out / "model" / "encoder.safetensors").exists() and not (out / "model" / "gene_order.tsv").exists()
    config = json.loads((out / "model" / "model_config.json").read_text())
    assert config["base"]["sha256"] == metrics["base_model"]["sha256"] and len(config["gene_order_sha256"]) == 64
    for plot in ("confusion_matrix.png", "learning_curves.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000


def test_the_adapter_loads_with_peft_onto_the_base_and_equals_the_merged_model(trained_run, pbmc):
    """adapter/ is peft's own format: PeftModel.from_pretrained(base, adapter/) reproduces the served model."""
    from peft import PeftModel

    from scimilarity_lora.inference.runs import load_recorded_base

    out, _ = trained_run
    predictor = CellTypePredictor.load(out / "model")
    base = load_recorded_base(out, predictor.spec.base, predictor.spec.genes).eval()
    x = predictor.featurize(pbmc.raw.X[:64], predictor.alignment(list(pbmc.raw.var_names)), input_is_log1p=True)
    with torch.no_grad():
        z_base = base(x)
        peft_model = PeftModel.from_pretrained(base, str(out / "model" / "adapter")).eval()
        assert torch.allclose(peft_model(x), predictor.classifier.embed(x), atol=1e-5)
        assert not torch.allclose(z_base, predictor.classifier.embed(x), atol=1e-3)  # the adapter does something
    # a merged single-model directory (what export puts in the BentoML store) gives the same answers
    from scimilarity_lora.inference.artifact import read_model_dir, write_merged_encoder
    import shutil

    merged_dir = out / "merged_copy"
    shutil.copytree(out / "model", merged_dir)
    write_merged_encoder(predictor.classifier, predictor.spec.genes, merged_dir)
    _, merged, _ = read_model_dir(merged_dir)
    with torch.no_grad():
        assert torch.allclose(merged.embed(x), predictor.classifier.embed(x), atol=1e-5)
    shutil.rmtree(merged_dir)


def test_splits_are_disjoint_and_recorded(trained_run, pbmc):
    splits = pd.read_csv(trained_run[0] / "splits.csv")
    assert splits["cell_id"].is_unique
    assert set(splits["cell_id"]) == set(pbmc.obs_names)
    assert splits["split"].value_counts().to_dict() == {"train": 490, "val": 105, "test": 105}


def test_checkpoint_is_self_contained_and_reproduces_predictions(trained_run, pbmc):
    """A checkpoint with model/'s trained weights, the exported model dir and the reported test accuracy all
    agree (model/ is the best checkpoint; last.ckpt brings the module, its hyperparameters and its base)."""
    out, _ = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    module = classifier_from_checkpoint(out / "checkpoints" / "last.ckpt")
    module.load_trained_weights(out / "model")
    hp = module.hparams
    assert hp["classes"] == sorted(pbmc.obs["bulk_labels"].unique()) and len(hp["gene_order"]) == 765
    assert hp["preprocessing"] == {"target_sum": 10000.0, "input_is_log1p": False, "gene_panel": None}
    tracked = [v for k, v in module.state_dict().items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 0 for v in tracked)  # the frozen base's BatchNorm never saw a batch

    predictor = CellTypePredictor.load(out / "model")
    test_ids = pd.read_csv(out / "splits.csv").query("split == 'test'")["cell_id"]
    adata = pbmc[pbmc.obs_names.isin(test_ids)]
    probs, emb = predictor.predict(adata.raw.X, list(adata.raw.var_names), input_is_log1p=True)
    x = predictor.featurize(adata.raw.X, predictor.alignment(list(adata.raw.var_names)), input_is_log1p=True)
    with torch.no_grad():
        from_ckpt = torch.softmax(module(x) / predictor.temperature, dim=1).numpy()  # calibrated probabilities
    np.testing.assert_allclose(probs, from_ckpt, atol=1e-5)  # merged export == adapter checkpoint
    assert emb.shape == (len(adata), 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    predicted = np.array(predictor.classes)[probs.argmax(1)]
    accuracy = float(np.mean(predicted == adata.obs["bulk_labels"].astype(str).to_numpy()))
    assert accuracy == pytest.approx(metrics["test/accuracy"], abs=1e-6)


def test_missing_label_column(tmp_path):
    with pytest.raises(LabelError, match=r"label column 'cell_typ' not in obs; available columns: \['bulk_labels'"):
        run(compose_train(FAST + ["data.label_key=cell_typ"], tmp_path))


def test_corrupt_h5ad(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(DataError, match="corrupt or truncated"):
        run(compose_train(FAST + ["data=h5ad", f"data.path={bad}"], tmp_path / "o"))


def test_h5ad_raw_counts_split_by_donor(tmp_path):
    adata = make_counts_adata(n_cells=360, n_genes=120, n_donors=6)
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "run"
    run(compose_train(FAST + ["data=h5ad", f"data.path={path}", "data.donor_key=donor_id", "data.layer=X"], out))
    splits = pd.read_csv(out / "splits.csv").merge(adata.obs[["donor_id"]], left_on="cell_id", right_index=True)
    donors = splits.groupby("split")["donor_id"].agg(set)
    assert not (donors["train"] & donors["val"]) and not (donors["train"] & donors["test"])
    assert not (donors["val"] & donors["test"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/accuracy"] > 0.5  # 3 types with distinct expression programs are learnable


def test_negative_values_are_refused_before_training(tmp_path, pbmc):
    path = tmp_path / "scaled.h5ad"
    pbmc.write_h5ad(path)  # .X of pbmc68k_reduced is scaled: negative values
    with pytest.raises(ValueError, match="negative values"):
        run(compose_train(FAST + ["data=h5ad", f"data.path={path}", "data.layer=X", "data.label_key=bulk_labels"],
                          tmp_path / "o"))


@pytest.mark.slow
def test_cli_overrides_the_issue_lists(tmp_path):
    res = run_train_cli(["lora.r=4", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["finetune"]["r"] == 4 and metrics["epochs_trained"] == 1
    # the default fine-tunes the pretrained base shipped in the package, recorded by name and weights
    provenance = json.loads((resolve_model_dir("packaged:pbmc_demo") / "provenance.json").read_text())
    assert metrics["base_model"] == {"is_pretrained": True, "source": "packaged:pbmc_demo",
                                     "path": "packaged:pbmc_demo", "sha256": provenance["weights_sha256"]}
    assert "BASE MODEL IS NOT SCIMILARITY" not in res.stderr + res.stdout
    assert not (tmp_path / "base").exists()  # nothing to copy: the package holds the base
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_the_random_stand_in_keeps_its_explicit_name_and_warning(tmp_path):
    res = run_train_cli(["model=random", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "BASE MODEL IS NOT SCIMILARITY" in res.stderr + res.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["base_model"]["is_pretrained"] is False and not (tmp_path / "base").exists()
    stored = Path(metrics["base_model"]["path"])  # kept once in paths.base_store, named by its weights' hash
    assert stored.parent == Path(os.environ["SCIMILARITY_LORA_BASE_STORE"]).resolve()
    assert stored.name == metrics["base_model"]["sha256"][:16] and (stored / "encoder.ckpt").is_file()


@pytest.mark.slow
def test_multirun_gives_one_run_dir_per_value(tmp_path):
    res = run_train_cli(["--multirun", "model=tiny", "trainer.max_epochs=1", "lora.r=2,4", "logger=wandb",
                         f"hydra.sweep.dir={tmp_path}"], env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(json.loads((tmp_path / str(i) / "metrics.json").read_text())["finetune"]["r"] for i in (0, 1))
    assert ranks == [2, 4]
    group = "train-multirun-" + "_".join(tmp_path.parts[-2:])  # readable: job name + the sweep dir's last parts
    for i in (0, 1):  # one W&B run per job, both in the sweep's group
        (record,) = (tmp_path / str(i) / "wandb").glob("offline-run-*/run-*.wandb")
        data = record.read_bytes()
        assert f'"{group}"'.encode() in data
        assert json.loads((tmp_path / str(i) / "metrics.json").read_text())["wandb_group"] == group
        assert f"lora.r={2 * (i + 1)}".encode() in data  # the run's name shows its swept key


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path):
    res = run_train_cli(["model=tiny", "trainer.max_epochs=1", "logger=wandb", f"hydra.run.dir={tmp_path}"],
                        env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    media = {part for p in runs[0].glob("files/media/**/*") if p.is_file() for part in p.parts}
    assert {"images", "table"} <= media  # confusion matrix image and per-class F1 table
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # offline: config and metrics live in this record file
    assert b"trainable_params" in record and b"test/macro_f1" in record
    group = "train-" + "_".join(tmp_path.parts[-2:])  # a single run is its own group, with a readable name
    assert f'"{group}"'.encode() in record


@pytest.mark.slow
def test_wandb_without_a_login_falls_back_to_offline_with_one_warning(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc: no key configured
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "model=tiny", "trainer.max_epochs=1",
                          "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no API key is configured" in res.stderr + res.stdout and "UsageError" not in res.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_a_user_error_is_one_line_not_a_traceback(tmp_path):
    res = run_train_cli(["model=tiny", "data.label_key=cell_typ", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 2
    assert "error: label column 'cell_typ' not in obs; available columns: ['bulk_labels'" in res.stderr
    assert "Traceback" not in res.stderr


def test_learning_curves_pair_both_splits_of_each_epoch(trained_run):
    """Epoch 0 has its training point, and epochs are whole numbers on the axis."""
    from scimilarity_lora.evaluation.plots import learning_curves_figure

    out, _ = trained_run
    rows = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in rows] == list(range(len(rows))) and len(rows) >= 2
    assert all("train/loss" in r and "val/loss" in r for r in rows)
    fig = learning_curves_figure(rows)
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())
    assert (out / "plots" / "learning_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_full_size_encoder_smoke(tmp_path, real_gene_order):
    cfg = compose_train(["model=scimilarity_full",
                         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                         "trainer.enable_progress_bar=false", "lora.r=8"], tmp_path)
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 716 by name, 32 more through old/alias symbols (TCEB2 -> ELOB, ...)
    assert metrics["gene_overlap"]["n_overlap"] == 748 and metrics["gene_overlap"]["n_model_genes"] == 28231
    assert metrics["gene_overlap"]["n_rescued_by_alias"] == 32
    lora_params = 8 * (28231 + 1024) + 2 * 8 * (1024 + 1024) + 8 * (1024 + 128)
    head = 129 * 10
    assert metrics["trainable_params"] == lora_params + head
    assert 31.0e6 < metrics["total_params"] - lora_params - head < 31.2e6


@pytest.mark.slow
def test_ddp_on_cpu_two_processes(tmp_path):
    res = run_train_cli(["model=tiny", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                         "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MEMBER: 2/2" in res.stderr + res.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and 0 <= metrics["test/accuracy"] <= 1


@pytest.mark.slow
def test_optuna_sweep_maximises_val_macro_f1(tmp_path):
    res = run_train_cli(["-m", "hparams_search=pbmc_optuna", "model=tiny", "trainer.max_epochs=1",
                         "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
                         f"hydra.sweep.dir={tmp_path}", "trainer.enable_progress_bar=false"])
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    scores = [json.loads((tmp_path / str(i) / "metrics.json").read_text())["val/macro_f1"] for i in (0, 1)]
    assert result["best_value"] == pytest.approx(max(scores))
    assert {"lora.r", "lora.alpha", "lora.target_modules"} <= set(result["best_params"])


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    res = run_train_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=tiny",
                         "trainer.max_epochs=1", "lora.r=2,4", f"hydra.sweep.dir={tmp_path}",
                         "trainer.enable_progress_bar=false"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr
    assert sorted(json.loads((tmp_path / str(i) / "metrics.json").read_text())["finetune"]["r"] for i in (0, 1)) == [2, 4]


def test_the_loop_rate_counts_the_wait_for_data_but_not_the_gap_across_epochs(monkeypatch):
    """stream_cells_per_second: steps plus the waits between them within an epoch; cells_per_second: steps only.
    A fake clock: two 1-s steps with a 2-s wait between them, then a new epoch 6 s later (validation) and a 1-s step."""
    from scimilarity_lora.training import callbacks

    clock = iter([0.0, 1.0, 3.0, 4.0, 10.0, 11.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    speed = callbacks.TrainingSpeed()
    speed.seconds_to_first_batch = 1.0  # skip the process-start probe
    batch = (None, [0] * 100)
    for idx in (0, 1, 0):
        speed.on_train_batch_start(None, None, batch, idx)
        speed.on_train_batch_end(None, None, None, batch, idx)
    assert speed.cells_per_second == pytest.approx(300 / 3.0)
    assert speed.stream_cells_per_second == pytest.approx(300 / 5.0)  # 3 s of steps + the 2-s wait
