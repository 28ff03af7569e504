"""Evaluate a finished training run: metrics, baselines, forgetting and calibration, as a report in the run dir.

    python evaluate.py run_dir=outputs/runs/<date>/<time>

The run's own resolved config rebuilds its data (same seed, so the same split, checked against ``splits.csv``);
the model is the run's exported ``model/`` directory, i.e. exactly what serving loads. Writes
``<run_dir>/evaluation/{report.json, report.md, confusion_matrix.png}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from scimilarity_lora.artifact import classifier_from_checkpoint
from scimilarity_lora.metrics import (
    choose_threshold,
    classification_report,
    coverage_accuracy,
    expected_calibration_error,
    fit_temperature,
    forgetting,
    softmax,
    top_confusions,
)
from scimilarity_lora.plots import plot_confusion_matrix
from scimilarity_lora.predictor import CellTypePredictor

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    pass


def _features(datamodule, split: str) -> tuple[torch.Tensor, np.ndarray]:
    loader = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
              "test": datamodule.test_dataloader}[split]()
    xs, ys = zip(*[(x.to_dense() if hasattr(x, "to_dense") else x, y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys).numpy()


@torch.inference_mode()
def _embed_and_logits(encoder: torch.nn.Module, head: torch.nn.Module | None, x: torch.Tensor,
                      batch: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
    encoder.eval()
    zs, ls = [], []
    for s in range(0, len(x), batch):
        z = encoder(x[s:s + batch])
        zs.append(z)
        if head is not None:
            ls.append(head(z))
    return torch.cat(zs).numpy(), (torch.cat(ls).numpy() if head is not None else None)


def base_encoder(run_dir: Path, cfg, genes: list[str]) -> torch.nn.Module:
    """The encoder before fine-tuning: SCimilarity's weights, or the stand-in re-created from the run's seed.

    Training seeds everything and then builds the stand-in before any other use of torch's RNG, so the same seed
    rebuilds identical weights (a test checks this against the LoRA model with its adapter disabled).
    """
    if cfg.model.pretrained_dir:
        from scimilarity_lora.encoder import load_model_folder

        return load_model_folder(cfg.model.pretrained_dir)[0]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    base = instantiate(cfg.model.base, _partial_=True, _convert_="all")(data_genes=list(genes))
    if list(base.genes) != list(genes):
        raise EvaluationError("the re-created base encoder has a different gene order than the trained model")
    return base.encoder


def _logistic_regression(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(scaler.transform(train_x), train_y)
    return clf.predict(scaler.transform(test_x))


def evaluate_run(run_dir: str | Path, knn_k: int = 15, target_accuracy: float = 0.9, baselines: bool = True,
                 max_baseline_cells: int = 50_000, wandb_project: str | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / ".hydra" / "config.yaml").is_file() or not (run_dir / "model").is_dir():
        raise EvaluationError(f"{run_dir} is not a finished training run (needs .hydra/config.yaml and model/)")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    predictor = CellTypePredictor.load(run_dir / "model")
    classes = predictor.classes

    datamodule = instantiate(cfg.data)
    datamodule.gene_order = list(predictor.genes)
    datamodule.setup("fit")
    if list(datamodule.labels.classes) != classes:
        raise EvaluationError("the rebuilt data has other classes than the model was trained on")
    _check_splits(run_dir, datamodule)

    x_test, y_test = _features(datamodule, "test")
    x_val, y_val = _features(datamodule, "val")
    z_test, logits_test = _embed_and_logits(predictor.encoder, predictor.head, x_test)
    _, logits_val = _embed_and_logits(predictor.encoder, predictor.head, x_val)
    report: dict[str, Any] = {"run_dir": str(run_dir), "classes": classes,
                              "n_cells": {"val": int(len(y_val)), "test": int(len(y_test))}}
    model_report = classification_report(y_test, logits_test.argmax(1), classes)
    report["model"] = model_report
    report["top_confusions"] = top_confusions(np.array(model_report["confusion_matrix"]), classes)

    # forgetting: base vs adapted embeddings on held-out reference cells (the adapter never trained on them)
    base = base_encoder(run_dir, cfg, list(predictor.genes))
    z_base_test, _ = _embed_and_logits(base, None, x_test)
    report["forgetting"] = forgetting(z_base_test, z_test, y_test, k=knn_k)

    # calibration: temperature fitted on validation, judged on test; an 'unknown' threshold chosen on validation
    temperature = fit_temperature(logits_val, y_val)
    probs_test, probs_test_cal = softmax(logits_test), softmax(logits_test, temperature)
    threshold = choose_threshold(softmax(logits_val, temperature), y_val, target_accuracy)
    kept = coverage_accuracy(probs_test_cal, y_test, [threshold])[0]
    report["calibration"] = {
        "temperature": round(temperature, 4),
        "ece_before": round(expected_calibration_error(probs_test, y_test), 4),
        "ece_after": round(expected_calibration_error(probs_test_cal, y_test), 4),
        "unknown_threshold": {"target_val_accuracy": target_accuracy, "threshold": threshold,
                              "test_coverage": round(kept["coverage"], 4), "test_accuracy": round(kept["accuracy"], 4)},
        "coverage_accuracy": coverage_accuracy(probs_test_cal, y_test, [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]),
    }

    if baselines:
        x_train, y_train = _features(datamodule, "train")
        if len(y_train) > max_baseline_cells:
            pick = np.random.default_rng(cfg.seed).choice(len(y_train), max_baseline_cells, replace=False)
            x_train, y_train = x_train[pick], y_train[pick]
        z_base_train, _ = _embed_and_logits(base, None, x_train)
        report["baselines"] = {
            "frozen_embedding_lr": classification_report(
                y_test, _logistic_regression(z_base_train, y_train, z_base_test, cfg.seed), classes),
            "genes_lr": classification_report(
                y_test, _logistic_regression(x_train.numpy(), y_train, x_test.numpy(), cfg.seed), classes),
        }
    out = run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report, json.loads((run_dir / "metrics.json").read_text())))
    plot_confusion_matrix(model_report["confusion_matrix"], classes, out / "confusion_matrix.png")
    if wandb_project:
        log_to_wandb(report, run_dir, out, wandb_project)
    log.info("evaluation written to %s", out)
    return report


def log_to_wandb(report: dict, run_dir: Path, out: Path, project: str) -> None:
    """One W&B run (job_type 'evaluate') in the training run's group: scalars, confusion matrix, tables.

    Respects WANDB_MODE (offline writes under <run_dir>/evaluation/wandb)."""
    import wandb

    # the same group the training job used: the sweep dir for multirun jobs, the run dir for a single run
    group = str(run_dir.parent) if run_dir.name.isdigit() else str(run_dir)
    run = wandb.init(project=project, group=group, job_type="evaluate", name=f"evaluate-{run_dir.name}",
                     dir=str(out), config={"run_dir": str(run_dir)}, reinit="finish_previous")
    m = report["model"]
    scalars = {f"evaluation/{k}": m[k] for k in ("accuracy", "macro_f1", "balanced_accuracy")}
    scalars.update({f"evaluation/forgetting/{k}": v for k, v in report["forgetting"].items() if isinstance(v, float)})
    scalars.update({f"evaluation/baselines/{name}/macro_f1": b["macro_f1"] for name, b in report.get("baselines", {}).items()})
    run.log({
        **scalars,
        "evaluation/confusion_matrix": wandb.Image(str(out / "confusion_matrix.png")),
        "evaluation/per_class": wandb.Table(
            columns=["cell_type", "precision", "recall", "f1", "support"],
            data=[[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in m["per_class"].items()]),
        "evaluation/top_confusions": wandb.Table(
            columns=["true", "predicted", "count", "fraction_of_true"],
            data=[[t["true"], t["predicted"], t["count"], t["fraction_of_true"]] for t in report["top_confusions"]]),
    })
    run.finish()


def _check_splits(run_dir: Path, datamodule) -> None:
    """Refuse to evaluate on a split that differs from the one the run trained with (would leak cells)."""
    recorded = pd.read_csv(run_dir / "splits.csv")
    id_col = "cell_id" if "cell_id" in recorded.columns else "soma_joinid"
    rebuilt = pd.read_csv(datamodule.save_splits(run_dir / "evaluation_splits.tmp.csv"))
    (run_dir / "evaluation_splits.tmp.csv").unlink()
    for split in ("train", "val", "test"):
        a = set(recorded.loc[recorded["split"] == split, id_col].astype(str))
        b = set(rebuilt.loc[rebuilt["split"] == split, id_col].astype(str))
        if a != b:
            raise EvaluationError(f"the rebuilt {split} split differs from {run_dir}/splits.csv; "
                                  "the data or its config changed since training")


def render_markdown(report: dict, train_metrics: dict) -> str:
    m = report["model"]
    lines = [f"# Evaluation of `{report['run_dir']}`", "",
             f"Fine-tuning: `{json.dumps(train_metrics.get('finetune'))}`; base: "
             f"`{train_metrics.get('base_model', {}).get('source')}`; test cells: {report['n_cells']['test']}.", "",
             "| model | accuracy | macro-F1 | balanced accuracy |", "|---|---|---|---|",
             f"| this model | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['balanced_accuracy']:.3f} |"]
    for name, b in report.get("baselines", {}).items():
        lines.append(f"| {name} | {b['accuracy']:.3f} | {b['macro_f1']:.3f} | {b['balanced_accuracy']:.3f} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for c, v in m["per_class"].items()]
    lines += ["", "## Most confused pairs", "", "| true | predicted | cells | share of true class |", "|---|---|---|---|"]
    lines += [f"| {t['true']} | {t['predicted']} | {t['count']} | {t['fraction_of_true']:.2f} |"
              for t in report["top_confusions"]]
    f = report["forgetting"]
    c = report["calibration"]
    u = c["unknown_threshold"]
    lines += ["", "## Forgetting (base vs adapted embeddings, held-out test cells)", "",
              f"mean cosine {f['mean_cosine']:.3f}; kNN label agreement (k={f['k']}) {f['knn_agreement']:.3f}; "
              f"linear CKA {f['linear_cka']:.3f}", "",
              "## Calibration", "",
              f"temperature {c['temperature']} (fitted on validation); ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}; "
              f"'unknown' below confidence {u['threshold']:.2f} (validation accuracy >= {u['target_val_accuracy']}): "
              f"test coverage {u['test_coverage']:.2f} at accuracy {u['test_accuracy']:.3f}", "",
              "![confusion matrix](confusion_matrix.png)", ""]
    return "\n".join(lines)
