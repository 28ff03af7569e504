"""Evaluation metrics against scikit-learn on fixed inputs, and forgetting metrics on known cases."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support

from scimilarity_lora.evaluation.metrics import (
    choose_threshold,
    classification_report,
    coverage_accuracy,
    expected_calibration_error,
    fit_temperature,
    forgetting,
    linear_cka,
    softmax,
    top_confusions,
)

CLASSES = ["B", "T", "NK", "mono"]


def fixed_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)  # class 3 ("mono") never occurs in y_true
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    return y, pred


def test_classification_metrics_match_sklearn():
    y, pred = fixed_predictions()
    report = classification_report(y, pred, CLASSES)
    present = sorted(set(y))
    assert report["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y, pred, labels=present, average="macro"))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for i, c in enumerate(CLASSES):
        assert report["per_class"][c] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})


def test_top_confusions():
    cm = np.array([[5, 3, 0], [1, 7, 4], [0, 0, 9]])
    assert top_confusions(cm, ["a", "b", "c"], k=5) == [
        {"true": "b", "predicted": "c", "count": 4, "fraction_of_true": 0.3333},
        {"true": "a", "predicted": "b", "count": 3, "fraction_of_true": 0.375},
        {"true": "b", "predicted": "a", "count": 1, "fraction_of_true": 0.0833},
    ]


def test_identical_models_have_no_forgetting():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(120, 16))
    labels = rng.integers(0, 4, 120)
    f = forgetting(emb, emb.copy(), labels)
    assert f["mean_cosine"] == pytest.approx(1.0) and f["knn_agreement"] == 1.0
    assert f["linear_cka"] == pytest.approx(1.0)


def test_forgetting_metrics_see_change():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(200, 16))
    labels = (base[:, 0] > 0).astype(int)  # labels live in the base space's first axis
    unrelated = rng.normal(size=(200, 16))
    f = forgetting(base, unrelated, labels)
    assert abs(f["mean_cosine"]) < 0.2 and f["linear_cka"] < 0.3 and f["knn_agreement"] < 0.8
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    assert linear_cka(base, base @ rotation * 3.0) == pytest.approx(1.0)  # invariant to rotation and scale


def test_temperature_scaling_reduces_calibration_error():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 2000)
    logits = rng.normal(size=(2000, 5))
    logits[np.arange(2000), y] += 1.5
    overconfident = logits * 4  # same ranking, far too confident
    t = fit_temperature(overconfident, y)
    assert t > 1.5  # over-confident logits need softening
    assert expected_calibration_error(softmax(overconfident, t), y) < 0.5 * expected_calibration_error(
        softmax(overconfident), y)


def test_the_fitted_temperature_is_the_nll_minimum():
    from scimilarity_lora.inference.calibration import _nll

    rng = np.random.default_rng(4)
    y = rng.integers(0, 8, 5000)
    logits = rng.normal(size=(5000, 8))
    logits[np.arange(5000), y] += 2.0
    for scale in (0.3, 1.0, 6.0):  # under-, roughly and over-confident
        t = fit_temperature((logits * scale).astype(np.float32), y)
        grid = np.exp(np.linspace(np.log(t) - 0.5, np.log(t) + 0.5, 2001))
        best = grid[np.argmin([_nll(logits * scale, y, g) for g in grid])]
        assert t == pytest.approx(best, rel=1e-3)
        assert _nll(logits * scale, y, t) <= min(_nll(logits * scale, y, t * f) for f in (0.99, 1.01))


def test_coverage_accuracy_and_threshold():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.95, 0.05]])
    y = np.array([0, 1, 0, 0])
    rows = coverage_accuracy(probs, y, [0.0, 0.7])
    assert rows[0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.75}
    assert rows[1] == {"threshold": 0.7, "coverage": 0.5, "accuracy": 1.0}
    assert choose_threshold(probs, y, 1.0) == pytest.approx(0.61)


def test_knn_labels_in_blocks_equal_the_whole_similarity_matrix(monkeypatch):
    """Blocks of 7 rows (uneven against 200 cells) give the votes of the full cells x cells matrix."""
    from scimilarity_lora.evaluation import metrics

    rng = np.random.default_rng(3)
    z = rng.normal(size=(200, 16)).astype(np.float32)
    y = rng.integers(0, 4, 200)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :5]
    expected = np.array([np.bincount(y[row], minlength=4).argmax() for row in nn])
    monkeypatch.setattr(metrics, "KNN_BLOCK_ENTRIES", 7 * 200)
    np.testing.assert_array_equal(metrics.knn_labels(z, y, k=5), expected)


def test_the_embedding_plot_and_over_clustering_work_above_4096_cells(tmp_path):
    """scanpy 1.11 + SciPy 1.17: its pynndescent path (the default above 4,096 cells) fails on csr_array.getnnz;
    both of this project's neighbour graphs must work at that size, on duplicated cells as resampled data has."""
    from scimilarity_lora.evaluation.plots import plot_embeddings
    from scimilarity_lora.inference.majority import over_cluster

    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    z = base[rng.integers(0, 300, 5000)]
    y = rng.integers(0, 3, 5000)
    out = plot_embeddings(z, z, y, y, ["a", "b", "c"], tmp_path / "e.png")
    assert out.stat().st_size > 10_000
    clusters = over_cluster(z)
    assert len(clusters) == 5000 and len(set(clusters)) > 1
