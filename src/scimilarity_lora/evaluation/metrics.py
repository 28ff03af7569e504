"""Evaluation metrics on arrays: classification, forgetting (base vs adapted embeddings) and calibration.

Pure NumPy/torch functions, so evaluation, the experiment reports and the tests share one implementation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# calibration lives with inference, which applies it; re-exported here for reports and tests
from scimilarity_lora.inference.calibration import (  # noqa: F401
    choose_threshold,
    coverage_accuracy,
    fit_temperature,
    softmax,
)


# -- classification ------------------------------------------------------------------------------------------
def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1, balanced accuracy and per-class precision/recall/F1/support.

    Classes absent from ``y_true`` (support 0) are left out of macro averages, as scikit-learn does when given
    ``labels=`` of the present classes.
    """
    n = len(classes)
    cm = confusion(np.asarray(y_true), np.asarray(y_pred), n)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    present = support > 0
    per_class = {
        c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def top_confusions(cm: np.ndarray, classes: Sequence[str], k: int = 5) -> list[dict]:
    """The k largest off-diagonal cells: (true, predicted, count, fraction of the true class)."""
    cm = np.asarray(cm)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:k]
    out = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] == 0:
            break
        out.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                    "fraction_of_true": round(float(off[i, j] / max(cm[i].sum(), 1)), 4)})
    return out


# -- forgetting: how much did adaptation move the embedding space? ----------------------------------------------
def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))


#: similarities held at once by the kNN votes (rows of a query block x all cells): 16 MB of float32. A block costs
#: about five times that at its peak (the similarities, the partition's int64 indices), so 32M entries made the
#: forgetting metric the peak of a whole evaluation (+550 MB on 20,000 cells)
KNN_BLOCK_ENTRIES = 4_000_000


def _vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's most frequent label (the smallest on ties, as ``np.bincount(...).argmax()``), without a Python
    call per row."""
    rows = len(neighbour_labels)
    flat = (np.arange(rows)[:, None] * n_classes + neighbour_labels).ravel()
    return np.bincount(flat, minlength=rows * n_classes).reshape(rows, n_classes).argmax(axis=1)


def knn_labels(emb: np.ndarray, labels: np.ndarray, k: int = 15) -> np.ndarray:
    """Majority label among each cell's k nearest neighbours (cosine), the cell itself excluded. Computed a block
    of rows at a time: never the cells x cells similarity matrix (62 GB for 125,000 test cells)."""
    z = (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32, copy=False)
    k = min(k, len(z) - 1)
    n_classes = int(labels.max()) + 1
    out = np.empty(len(z), dtype=np.int64)
    block = max(1, KNN_BLOCK_ENTRIES // max(1, len(z)))
    for s in range(0, len(z), block):
        sim = z[s:s + block] @ z.T
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        nn = np.argpartition(sim, len(z) - k, axis=1)[:, len(z) - k:]  # the k largest, no negated copy
        out[s:s + block] = _vote(labels[nn], n_classes)
    return out


def knn_transfer(reference: np.ndarray, reference_labels: np.ndarray, query: np.ndarray, k: int = 15) -> np.ndarray:
    """Majority label of each query cell's k nearest reference cells (cosine): label transfer to unseen cells."""
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    q = query / np.linalg.norm(query, axis=1, keepdims=True).clip(1e-12)
    k = min(k, len(r))
    nn = np.argpartition(-(q @ r.T), k - 1, axis=1)[:, :k]
    return _vote(reference_labels[nn], int(reference_labels.max()) + 1)


def knn_agreement(base: np.ndarray, adapted: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Fraction of cells whose kNN-vote label is the same in the base and the adapted embedding space."""
    return float(np.mean(knn_labels(base, labels, k) == knn_labels(adapted, labels, k)))


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019): 1 for identical spaces (up to rotation/scale)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    hsic = np.linalg.norm(a.T @ b, "fro") ** 2
    return float(hsic / (np.linalg.norm(a.T @ a, "fro") * np.linalg.norm(b.T @ b, "fro")))


def forgetting(base: np.ndarray, adapted: np.ndarray, labels: np.ndarray, k: int = 15) -> dict:
    return {"mean_cosine": mean_cosine(base, adapted), "knn_agreement": knn_agreement(base, adapted, labels, k),
            "linear_cka": linear_cka(base, adapted), "n_reference_cells": int(len(labels)), "k": k}


# -- calibration -------------------------------------------------------------------------------------------------
def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
