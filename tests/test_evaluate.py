"""evaluate, annotate and summarize on a real 2-job multirun (LoRA and frozen linear probe)."""

import json
from pathlib import Path
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import wandb

from helpers import REPO, run_train_cli
from scimilarity_lora.training.checkpoint_io import classifier_from_checkpoint
from scimilarity_lora.evaluation.evaluate import EvaluationError, base_encoder, evaluate_run
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.evaluation.summarize import summarize


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    res = run_train_cli(["--multirun", "model=tiny", "trainer.max_epochs=3", "finetune=lora,frozen",
                         f"hydra.sweep.dir={root}", "trainer.enable_progress_bar=false"])
    assert res.returncode == 0, res.stderr[-3000:]
    reports = {job: evaluate_run(root / job) for job in ("0", "1")}
    return root, reports


def test_report_matches_training_metrics(sweep):
    root, reports = sweep
    for job, report in reports.items():
        metrics = json.loads((root / job / "metrics.json").read_text())
        assert report["model"]["accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)
        assert report["model"]["macro_f1"] == pytest.approx(metrics["test/macro_f1"], abs=1e-5)
        assert {"frozen_embedding_lr", "genes_lr"} == set(report["baselines"])
        for name in ("report.json", "report.md", "confusion_matrix.png"):
            assert (root / job / "evaluation" / name).is_file()
        assert (root / job / "evaluation" / "embeddings.png").stat().st_size > 20_000  # base vs adapted UMAPs
        assert "![embeddings: base vs adapted](embeddings.png)" in (root / job / "evaluation" / "report.md").read_text()
        assert "## Most confused pairs" in (root / job / "evaluation" / "report.md").read_text()
        c = report["calibration"]
        assert c["temperature"] > 0 and 0 <= c["ece_after"] <= 1
        assert 0 <= c["unknown_threshold"]["test_coverage"] <= 1


def test_baselines_on_a_uniform_sample_beyond_max_baseline_cells(sweep, tmp_path):
    """With max_baseline_cells below a split's size, only a sample's gene values are kept, both baselines are scored
    on the same sampled test cells (said in the report), and the model itself still on every test cell."""
    import shutil

    root, reports = sweep
    run = tmp_path / "run"
    shutil.copytree(root / "0", run)
    full = reports["0"]
    report = evaluate_run(run, max_baseline_cells=40)
    n_test = full["n_cells"]["test"]
    assert n_test > 60 and report["n_cells"]["test"] == n_test
    assert report["model"]["accuracy"] == pytest.approx(full["model"]["accuracy"])
    sampled = {b["n_test_cells"] for b in report["baselines"].values()}
    assert len(sampled) == 1 and 15 < sampled.pop() < 70  # about 40 of the test cells, the same for both
    assert {b["n_test_cells"] for b in full["baselines"].values()} == {n_test}


def test_the_frozen_probe_is_as_strong_as_logistic_regression(sweep):
    """finetune=frozen on the same embeddings and split as the frozen-embedding + LR baseline: within 0.02."""
    frozen = sweep[1]["1"]
    assert abs(frozen["model"]["accuracy"] - frozen["baselines"]["frozen_embedding_lr"]["accuracy"]) <= 0.02
    assert frozen["baselines"]["frozen_embedding_lr"]["C"] in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def test_frozen_probe_does_not_forget(sweep):
    """A frozen encoder is the base: its forgetting metrics must be exactly 'none'."""
    f = sweep[1]["1"]["forgetting"]
    assert f["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and f["knn_agreement"] == 1.0
    assert f["linear_cka"] == pytest.approx(1.0, abs=1e-6)
    lora = sweep[1]["0"]["forgetting"]
    assert lora["mean_cosine"] < 1.0 - 1e-4  # the adapter did move the embedding


def test_recorded_base_equals_the_lora_model_with_its_adapter_disabled(sweep):
    """Training saves the stand-in base (no RNG replay): reloaded, it is the LoRA model minus its adapter."""
    run = sweep[0] / "0"
    metrics = json.loads((run / "metrics.json").read_text())
    module = classifier_from_checkpoint(run / "checkpoints" / "last.ckpt")
    predictor = CellTypePredictor.load(run / "model")
    assert predictor.spec.base["sha256"] == metrics["base_model"]["sha256"]
    stored = Path(metrics["base_model"]["path"])  # stored once for both jobs (same seed and sizes), not per run
    assert (stored / "encoder.ckpt").is_file() and stored.name == metrics["base_model"]["sha256"][:16]
    assert json.loads((sweep[0] / "1" / "metrics.json").read_text())["base_model"]["path"] == str(stored)
    assert not (run / "base").exists()
    base = base_encoder(run, predictor.spec).eval()
    x = torch.rand(32, len(module.hparams["gene_order"])) * 3
    with torch.no_grad(), module.encoder.disable_adapter():
        np.testing.assert_allclose(base(x).numpy(), module.encoder.eval()(x).numpy(), atol=1e-6)


def test_evaluate_refuses_a_base_whose_weights_changed(sweep, tmp_path):
    import shutil

    from scimilarity_lora.model.folder import load_model_folder, save_model_folder

    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(sweep[0] / "0", run)
    metrics = json.loads((run / "metrics.json").read_text())
    shutil.copytree(metrics["base_model"]["path"], base)  # the sweep's stored base stays as it was
    for name in ("metrics.json", "model/model_config.json"):
        record = json.loads((run / name).read_text())
        record["base_model" if name == "metrics.json" else "base"]["path"] = str(base)
        (run / name).write_text(json.dumps(record))
    encoder, genes = load_model_folder(base)
    with torch.no_grad():
        encoder.network[0][1].weight[0, 0] += 1e-3
    save_model_folder(encoder, genes, base)
    from scimilarity_lora.model.folder import ModelFolderError

    with pytest.raises(ModelFolderError, match="sha256 .* not the same base"):
        evaluate_run(run, baselines=False)


def test_evaluate_refuses_a_changed_split(sweep, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sweep[0] / "0", run)
    splits = pd.read_csv(run / "splits.csv")
    splits.loc[0, "split"] = "test" if splits.loc[0, "split"] != "test" else "train"
    splits.to_csv(run / "splits.csv", index=False)
    with pytest.raises(EvaluationError, match="split differs"):
        evaluate_run(run, baselines=False)


def test_summarize_the_sweep(sweep):
    root, _ = sweep
    result = summarize(root)
    table = pd.read_csv(root / "summary.csv")
    assert result["n_runs"] == 2 and list(table["finetune"]) == ["lora", "frozen"]
    assert {"test/macro_f1", "val/macro_f1", "trainable_params", "forgetting/linear_cka",
            "genes_lr/macro_f1"} <= set(table.columns)
    best = table.loc[table["val/macro_f1"].idxmax(), "job"]
    assert result["best_run"] == str(root / str(best))
    assert (root / "summary.png").stat().st_size > 10_000
    assert f"Best run by val/macro_f1: `{root / str(best)}`" in (root / "summary.md").read_text()


def test_annotate_round_trips_an_h5ad(sweep, pbmc, tmp_path):
    src = tmp_path / "pbmc.h5ad"
    adata = pbmc.raw.to_adata()
    adata.write_h5ad(src)
    out = tmp_path / "annotated.h5ad"
    model = sweep[0] / "0"
    res = subprocess.run([sys.executable, "-m", "scimilarity_lora.inference.annotate", str(model), str(src), str(out),
                          "--log1p", "--batch-size", "128"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    annotated = ad.read_h5ad(out)
    predictor = CellTypePredictor.load(model / "model")
    probs, emb = predictor.predict(adata.X, list(adata.var_names), input_is_log1p=True)
    assert list(annotated.obs["scimilarity_lora_best_guess"]) == [predictor.classes[i] for i in probs.argmax(1)]
    status = annotated.obs["scimilarity_lora_status"].astype(str)
    labels = annotated.obs["scimilarity_lora_label"].astype(str)
    declined = status.isin(["low_confidence", "novel"])
    assert (labels[declined] == "unknown").all() and (labels[~declined] != "unknown").all()
    assert labels[status == "ok"].isin(predictor.classes).all()
    assert not labels[status == "coarse"].isin(predictor.classes).any()  # a CL ancestor's name, e.g. "T cell"
    assert set(status) <= {"ok", "coarse", "low_confidence", "novel"}
    threshold = predictor.calibration.confidence_threshold  # a weak 3-epoch model: most cells fall below it
    conf = annotated.obs["scimilarity_lora_confidence"]
    assert (conf[status.isin(["low_confidence", "coarse"])] < threshold).all() and (conf[status == "ok"] >= threshold).all()
    np.testing.assert_allclose(annotated.obs["scimilarity_lora_confidence"], probs.max(1), rtol=1e-5)
    np.testing.assert_allclose(annotated.obsm["X_scimilarity"], emb, atol=1e-6)
    assert annotated.obs["scimilarity_lora_top3"].iloc[0].count(":") == 3
    assert annotated.uns["scimilarity_lora"]["gene_overlap"]["n_overlap"] == 765
    assert (annotated.X != adata.X).nnz == 0  # the expression data is untouched


def test_evaluation_is_logged_to_wandb_offline(sweep, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = sweep[0] / "0"
    evaluate_run(run, baselines=False, wandb_project="scimilarity-lora-test")
    # run.finish() returns before wandb-core's writer has necessarily closed the .wandb file (seen under
    # CPU contention); teardown waits for the service, as the CLI's atexit hook does at process exit.
    wandb.teardown()
    (offline,) = (run / "evaluation" / "wandb").glob("offline-run-*")
    media = {part for p in offline.glob("files/media/**/*") if p.is_file() for part in p.parts}
    assert {"images", "table"} <= media
    assert list(offline.glob("files/media/images/evaluation/embeddings*.png"))
    record = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"evaluation/macro_f1" in record and str(sweep[0]).encode() in record  # the sweep's group


def test_summary_over_seeds_groups_by_the_swept_setting():
    from scimilarity_lora.evaluation.summarize import over_seeds

    df = pd.DataFrame({"job": ["0", "1", "2", "3"], "finetune": ["lora", "lora", "full", "full"],
                       "seed": ["0", "1", "0", "1"], "trainer.enable_progress_bar": ["False"] * 4,
                       "test/macro_f1": [0.6, 0.8, 0.4, 0.5]})
    df.attrs["override_keys"] = ["finetune", "seed", "trainer.enable_progress_bar"]
    out = over_seeds(df).set_index("finetune")
    assert out.loc["lora", "test/macro_f1 mean"] == pytest.approx(0.7)
    assert out.loc["full", "n_seeds"] == 2
