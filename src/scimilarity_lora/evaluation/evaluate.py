"""Evaluate a finished training run: metrics, baselines, forgetting and calibration, as a report in the run dir.

    python evaluate.py run_dir=outputs/runs/<date>/<time>

The run's own resolved config rebuilds its data (same seed, so the same split, checked against ``splits.csv``);
the model is the run's exported ``model/`` directory, i.e. exactly what serving loads, run through the
:class:`~scimilarity_lora.inference.predictor.CellTypePredictor` batch by batch (sparse batches stay sparse, so a
Census-sized test split at 28,231 genes never becomes one dense matrix). The base encoder is the one training
recorded (a pretrained folder, or the stand-in saved in the run's ``base/``), checked by the hash of its weights.
Writes ``<run_dir>/evaluation/{report.json, report.md, confusion_matrix.png, embeddings.png}``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from scimilarity_lora.evaluation.metrics import (
    choose_threshold,
    classification_report,
    coverage_accuracy,
    expected_calibration_error,
    fit_temperature,
    forgetting,
    softmax,
    top_confusions,
)
from scimilarity_lora.evaluation.plots import plot_confusion_matrix, plot_embeddings
from scimilarity_lora.evaluation.report import render_markdown
from scimilarity_lora.inference.artifact import ModelSpec
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.runs import METRICS_FILE, MODEL_DIR, base_folder, load_recorded_base
from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.evaluation.reference import reference_forgetting
from scimilarity_lora.model.folder import DECODER_FILE, load_decoder
from scimilarity_lora.model.probe import C_GRID
from scimilarity_lora.data.splits import uniform_sample
from scimilarity_lora.model.sparse import SparseBatch

log = logging.getLogger(__name__)

class EvaluationError(ValueError):
    pass


#: the forgetting metrics' kNN votes and the UMAP plot use a uniform sample of the test cells beyond these sizes
#: (their cost grows with the square of the cells, or like UMAP's); every other metric uses every test cell
MAX_FORGETTING_CELLS = 20_000
MAX_PLOT_CELLS = 10_000


@dataclass
class SplitOutputs:
    """One split run through the adapted model and the base, batch by batch."""

    y: np.ndarray
    logits: np.ndarray
    z: np.ndarray
    z_base: np.ndarray
    genes: sp.csr_matrix | None  # the normalised gene values (for the genes + LR baseline), when asked for
    gene_rows: np.ndarray | None = None  # which rows of the split ``genes`` holds (a uniform sample, or all)


def _as_csr(x: "torch.Tensor | SparseBatch") -> sp.csr_matrix:
    X = x.to_csr() if isinstance(x, SparseBatch) else sp.csr_matrix(x.numpy())
    if X.nnz < 2**31:  # int32 indices: half the memory of the int64 the encoder's sparse input uses
        X.indices, X.indptr = X.indices.astype(np.int32), X.indptr.astype(np.int32)
    return X


@torch.inference_mode()
def run_split(datamodule: Any, split: str, predictor: CellTypePredictor, base: Encoder, *,
              max_cells: int | None = None, keep_genes: bool = False, max_gene_cells: int | None = None,
              seed: int = 0) -> SplitOutputs:
    """Logits and embeddings of the adapted model, and the base's embeddings, for one split.

    ``max_cells``: a uniform sample of the split, chosen before reading, is all that is read (the baselines need
    50,000 of a million-cell store's 700,000 training cells). ``max_gene_cells`` subsamples the gene values alone
    (the largest thing kept: cells x 28,231 sparse), which the baselines use; ``gene_rows`` says which rows they
    are."""
    n = len(datamodule.split_ids()[split])
    sample = uniform_sample(n, max_cells, seed)
    gene_share = 1.0 if not max_gene_cells or len(sample) <= max_gene_cells else max_gene_cells / len(sample)
    gene_rng = np.random.default_rng(seed + 1)
    base.eval()
    ys, logits, zs, z_bases, genes, gene_rows = [], [], [], [], [], []
    seen = 0
    for x, y in datamodule.eval_dataloader(split, rows=None if len(sample) == n else sample):
        batch_logits, z = predictor.logits(x)
        ys.append(y.numpy())
        logits.append(batch_logits.numpy())
        zs.append(z.numpy())
        z_bases.append(base(x).numpy())
        if keep_genes:
            X = _as_csr(x)
            if gene_share < 1.0:  # index only when sampling: a full-row index would copy every batch again
                rows = np.flatnonzero(gene_rng.random(len(y)) < gene_share)
                X = X[rows]
            else:
                rows = np.arange(len(y))
            genes.append(X)
            gene_rows.append(seen + rows)
        seen += len(y)
    if not ys:
        raise EvaluationError(f"the {split} split yielded no cells")
    outputs = SplitOutputs(np.concatenate(ys), np.concatenate(logits), np.concatenate(zs), np.concatenate(z_bases),
                           sp.vstack(genes).tocsr() if keep_genes else None,
                           np.concatenate(gene_rows) if keep_genes else None)
    del ys, logits, zs, z_bases, genes, x, y
    release_freed_memory()  # the reads' buffers and the batches' pieces
    return outputs


def base_encoder(run_dir: Path, spec: ModelSpec) -> Encoder:
    """The encoder fine-tuning started from, as training recorded it (see :func:`~.inference.runs.load_recorded_base`)."""
    return load_recorded_base(run_dir, spec.base, spec.genes).gene_major_first_layer()


def _base_decoder(run_dir: Path, spec: ModelSpec, base: Encoder) -> torch.nn.Module | None:
    """SCimilarity's decoder from the base's folder, if it has one (pretrained bases do; stand-ins do not)."""
    folder = base_folder(run_dir, spec.base)
    if not (folder / DECODER_FILE).is_file():
        return None
    return load_decoder(folder, base.config).eval()


def _standardised(train_x: np.ndarray | sp.csr_matrix, val_x: np.ndarray | sp.csr_matrix,
                  test_x: np.ndarray | sp.csr_matrix) -> tuple[Any, Any, Any]:
    """The three splits scaled with the training split's statistics (sparse: without centring).

    Sparse matrices are scaled **in place** (they are this evaluation's own, used once): StandardScaler's
    ``transform`` would copy each, and lbfgs its float64 copy of the training split on every C. Here the training
    split becomes float64 once, sharing its index arrays; validation and test stay float32 (prediction takes
    them as they are). The values are those StandardScaler computes, bit for bit."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_mean=not sp.issparse(train_x)).fit(train_x)
    if not sp.issparse(train_x):
        return scaler.transform(train_x), scaler.transform(val_x), scaler.transform(test_x)
    inverse = 1.0 / scaler.scale_
    for X in (train_x, val_x, test_x):
        X.data *= inverse.take(X.indices, mode="clip")  # sklearn's inplace_csr_column_scale
    as_float64 = sp.csr_matrix((train_x.data.astype(np.float64), train_x.indices, train_x.indptr), shape=train_x.shape)
    return as_float64, val_x, test_x


def _logistic_regression(train_x: np.ndarray | sp.csr_matrix, train_y: np.ndarray, val_x: np.ndarray | sp.csr_matrix,
                         val_y: np.ndarray, test_x: np.ndarray | sp.csr_matrix, seed: int) -> tuple[np.ndarray, float]:
    """Standardised features + class-balanced logistic regression, C chosen on validation by balanced
    cross-entropy (the rule the ``finetune=frozen`` probe uses). Sparse input is scaled without centring, in
    place (see :func:`_standardised`). Returns the test predictions and the chosen C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.utils.class_weight import compute_sample_weight

    xs, xv, xt = _standardised(train_x, val_x, test_x)
    known = np.isin(val_y, np.unique(train_y))  # validation cells of classes the training split lacks can't count
    xv_known = xv if known.all() else xv[known]
    best: tuple[float, float, Any] | None = None
    for C in C_GRID:
        clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=seed).fit(xs, train_y)
        loss = log_loss(val_y[known], _in_row_chunks(clf.predict_proba, xv_known), labels=clf.classes_,
                        sample_weight=compute_sample_weight("balanced", val_y[known]))
        if best is None or loss < best[0]:
            best = (loss, C, clf)
    return _in_row_chunks(best[2].predict, xt), best[1]


def _in_row_chunks(predict: Any, X: np.ndarray | sp.csr_matrix, rows: int = 8192) -> np.ndarray:
    """``predict(X)`` a block of rows at a time: SciPy multiplies a float32 matrix by float64 weights through a
    float64 copy of it, which stays one block's size."""
    return np.concatenate([predict(X[i:i + rows]) for i in range(0, X.shape[0], rows)])


def release_freed_memory() -> None:
    """Hand the heap pages Python and NumPy freed back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed memory for reuse, so the peak of each phase (a SOMA read, a forward pass) stays resident under
    the next one; trimming between phases keeps a million-cell evaluation's peak to its largest phase."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def baseline_reports(train: SplitOutputs, held_out: list[tuple[np.ndarray, sp.csr_matrix, np.ndarray]],
                     classes: list[str], seed: int) -> dict[str, dict]:
    """Logistic regression on the base's frozen embedding and on the normalised genes, trained on (a sample of)
    the training split, C chosen on validation, scored on test. ``held_out``: (base embeddings, genes, labels) of
    validation and test, already restricted to the same cells (all of them, or the sample the genes kept)."""
    (z_val, genes_val, y_val), (z_test, genes_test, y_test) = held_out
    features = {"z_base": (train.z_base[train.gene_rows], z_val, z_test),
                "genes": (train.genes, genes_val, genes_test)}
    y_train = train.y[train.gene_rows]
    reports = {}
    for name, kind in (("frozen_embedding_lr", "z_base"), ("genes_lr", "genes")):
        tr, va, te = features.pop(kind)
        pred, C = _logistic_regression(tr, y_train, va, y_val, te, seed)  # scales sparse genes in place
        reports[name] = {**classification_report(y_test, pred, classes), "C": C, "n_test_cells": int(len(y_test))}
    return reports


def evaluate_run(run_dir: str | Path, knn_k: int = 15, target_accuracy: float = 0.9, baselines: bool = True,
                 max_baseline_cells: int = 50_000, wandb_project: str | None = None,
                 reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """``reference``: ``{"path", "label_key", "layer", "input_is_log1p"}`` of a labelled .h5ad on which to measure
    forgetting (see :mod:`.reference`)."""
    run_dir = Path(run_dir)
    if not (run_dir / ".hydra" / "config.yaml").is_file() or not (run_dir / MODEL_DIR).is_dir():
        raise EvaluationError(f"{run_dir} is not a finished training run (needs .hydra/config.yaml and model/)")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    predictor = CellTypePredictor.load(run_dir / MODEL_DIR)
    classes = predictor.classes
    base = base_encoder(run_dir, predictor.spec)

    datamodule = instantiate(cfg.data)
    datamodule.gene_order = list(predictor.genes)
    datamodule.setup("fit")
    if list(datamodule.labels.classes) != classes:
        raise EvaluationError("the rebuilt data has other classes than the model was trained on")
    check_splits(run_dir, datamodule)

    test = run_split(datamodule, "test", predictor, base, keep_genes=baselines, max_gene_cells=max_baseline_cells)
    val = run_split(datamodule, "val", predictor, base, keep_genes=baselines, max_gene_cells=max_baseline_cells)
    report: dict[str, Any] = {"run_dir": str(run_dir), "classes": classes,
                              "n_cells": {"val": int(len(val.y)), "test": int(len(test.y))}}
    model_report = classification_report(test.y, test.logits.argmax(1), classes)
    report["model"] = model_report
    report["top_confusions"] = top_confusions(np.array(model_report["confusion_matrix"]), classes)
    # forgetting: base vs adapted embeddings on held-out reference cells (the adapter never trained on them)
    some = uniform_sample(len(test.y), MAX_FORGETTING_CELLS, int(cfg.seed))
    report["forgetting"] = forgetting(test.z_base[some], test.z[some], test.y[some], k=knn_k)

    # calibration: temperature fitted on validation, judged on test; an 'unknown' threshold chosen on validation
    temperature = fit_temperature(val.logits, val.y)
    probs_test, probs_test_cal = softmax(test.logits), softmax(test.logits, temperature)
    threshold = choose_threshold(softmax(val.logits, temperature), val.y, target_accuracy)
    kept = coverage_accuracy(probs_test_cal, test.y, [threshold])[0]
    report["calibration"] = {
        "temperature": round(temperature, 4),
        "ece_before": round(expected_calibration_error(probs_test, test.y), 4),
        "ece_after": round(expected_calibration_error(probs_test_cal, test.y), 4),
        "unknown_threshold": {"target_val_accuracy": target_accuracy, "threshold": threshold,
                              "test_coverage": round(kept["coverage"], 4), "test_accuracy": round(kept["accuracy"], 4)},
        "coverage_accuracy": coverage_accuracy(probs_test_cal, test.y, [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]),
    }

    if reference and reference.get("path"):
        decoder = _base_decoder(run_dir, predictor.spec, base)
        report["forgetting"]["reference"] = reference_forgetting(
            predictor, base, reference["path"], reference.get("label_key") or "cell_type",
            layer=reference.get("layer", "X"), input_is_log1p=bool(reference.get("input_is_log1p", False)),
            k=knn_k, decoder=decoder, seed=int(cfg.seed), query_cells=reference.get("query_cells"))
    # only the baselines' cells of validation stay (and of test, once plotted): the rest (266 MB at 250,000 cells)
    # goes before the phases that add to it
    held_out = [(s.z_base[s.gene_rows], s.genes, s.y[s.gene_rows]) for s in (val, test)] if baselines else []
    del val
    release_freed_memory()

    out = run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    plot_confusion_matrix(model_report["confusion_matrix"], classes, out / "confusion_matrix.png")
    shown = uniform_sample(len(test.y), MAX_PLOT_CELLS, int(cfg.seed))
    plot_embeddings(test.z_base[shown], test.z[shown], test.y[shown], test.logits.argmax(1)[shown], classes,
                    out / "embeddings.png", seed=int(cfg.seed))
    del test
    if baselines:
        train = run_split(datamodule, "train", predictor, base, max_cells=max_baseline_cells, keep_genes=True,
                          seed=int(cfg.seed))
        # the rest is NumPy and scikit-learn: the two encoders and the SOMA handles go too
        del predictor, base, datamodule
        release_freed_memory()
        report["baselines"] = baseline_reports(train, held_out, classes, int(cfg.seed))
    train_metrics = json.loads((run_dir / METRICS_FILE).read_text())
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report, train_metrics))
    if wandb_project:
        log_to_wandb(report, run_dir, out, wandb_project, group=train_metrics.get("wandb_group"))
    log.info("evaluation written to %s", out)
    return report


def log_to_wandb(report: dict, run_dir: Path, out: Path, project: str, group: str | None = None) -> None:
    """One W&B run (job_type 'evaluate') in the group training used (recorded in metrics.json): scalars,
    confusion matrix, tables. Respects WANDB_MODE (offline writes under <run_dir>/evaluation/wandb)."""
    import wandb

    run = wandb.init(project=project, group=group or str(run_dir), job_type="evaluate",
                     name=f"evaluate-{run_dir.name}", dir=str(out), config={"run_dir": str(run_dir)},
                     reinit="finish_previous")
    m = report["model"]
    scalars = {f"evaluation/{k}": m[k] for k in ("accuracy", "macro_f1", "balanced_accuracy")}
    scalars.update({f"evaluation/forgetting/{k}": v for k, v in report["forgetting"].items() if isinstance(v, float)})
    scalars.update({f"evaluation/baselines/{name}/macro_f1": b["macro_f1"] for name, b in report.get("baselines", {}).items()})
    run.log({
        **scalars,
        "evaluation/confusion_matrix": wandb.Image(str(out / "confusion_matrix.png")),
        "evaluation/embeddings": wandb.Image(str(out / "embeddings.png")),
        "evaluation/per_class": wandb.Table(
            columns=["cell_type", "precision", "recall", "f1", "support"],
            data=[[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in m["per_class"].items()]),
        "evaluation/top_confusions": wandb.Table(
            columns=["true", "predicted", "count", "fraction_of_true"],
            data=[[t["true"], t["predicted"], t["count"], t["fraction_of_true"]] for t in report["top_confusions"]]),
    })
    run.finish()


def check_splits(run_dir: Path, datamodule: Any) -> None:
    """Refuse to evaluate on a split that differs from the one the run trained with (would leak cells)."""
    recorded = pd.read_csv(run_dir / "splits.csv", dtype=str)
    id_col = datamodule.id_column
    for split, ids in datamodule.split_ids().items():
        if set(recorded.loc[recorded["split"] == split, id_col]) != {str(i) for i in ids}:
            raise EvaluationError(f"the rebuilt {split} split differs from {run_dir}/splits.csv; "
                                  "the data or its config changed since training")
