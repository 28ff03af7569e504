"""When to answer "unknown": calibration fitted on validation cells, applied by the predictor and saved with the model."""

import numpy as np
import pytest

from scimilarity_lora.inference.calibration import Calibration, novelty_scores


def blobs(n, centres, rng, spread=0.15):
    y = rng.integers(0, len(centres), n)
    z = np.asarray(centres)[y] + spread * rng.standard_normal((n, len(centres[0])))
    return z / np.linalg.norm(z, axis=1, keepdims=True), y


def logits_for(z, centres, scale=8.0):
    return scale * z @ np.asarray(centres).T


CENTRES = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


def test_a_cell_unlike_every_class_is_novel_and_in_domain_cells_are_kept():
    rng = np.random.default_rng(0)
    train_z, train_y = blobs(600, CENTRES, rng)
    val_z, val_y = blobs(300, CENTRES, rng)
    cal = Calibration.fit(logits_for(val_z, CENTRES), val_y, val_z, train_z, train_y, 3)
    test_z, _ = blobs(300, CENTRES, rng)
    probs = np.exp(logits_for(test_z, CENTRES) / cal.temperature)
    probs /= probs.sum(1, keepdims=True)
    status = cal.status(probs, test_z)
    assert (status == "ok").mean() > 0.9  # in-domain cells keep their labels
    stranger = np.array([[0.0, 0.0, 0.0, 1.0]])  # the fourth axis: no class lives there
    assert cal.status(np.array([[0.98, 0.01, 0.01]]), stranger)[0] == "novel"  # however confident the head is
    assert novelty_scores(stranger, cal.centroids)[0] > 0.95 > cal.novelty_threshold


def test_the_confidence_threshold_reaches_the_target_accuracy_on_validation():
    rng = np.random.default_rng(1)
    train_z, train_y = blobs(600, CENTRES, rng, spread=0.6)  # overlapping classes: many uncertain cells
    val_z, val_y = blobs(600, CENTRES, rng, spread=0.6)
    logits = logits_for(val_z, CENTRES)
    cal = Calibration.fit(logits, val_y, val_z, train_z, train_y, 3, target_accuracy=0.9)
    probs = np.exp(logits / cal.temperature)
    probs /= probs.sum(1, keepdims=True)
    kept = probs.max(1) >= cal.confidence_threshold
    assert 0 < kept.mean() < 1 and (probs.argmax(1)[kept] == val_y[kept]).mean() >= 0.9


def test_calibration_round_trips_through_the_model_directory(tmp_path):
    rng = np.random.default_rng(2)
    z, y = blobs(200, CENTRES, rng)
    cal = Calibration.fit(logits_for(z, CENTRES), y, z, z, y, 3)
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert (back.temperature, back.confidence_threshold) == (cal.temperature, cal.confidence_threshold)
    assert back.novelty_threshold == pytest.approx(cal.novelty_threshold)
    np.testing.assert_allclose(back.centroids, cal.centroids)
    assert Calibration.load(tmp_path / "nothing_here") is None


def test_training_writes_the_calibration_and_can_leave_a_class_out(tmp_path):
    import json

    from helpers import FAST, compose_train
    from scimilarity_lora.inference.predictor import CellTypePredictor
    from scimilarity_lora.training.run import run

    run(compose_train(FAST + ["data.exclude_classes=[Dendritic]"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "Dendritic" not in metrics["classes"] and len(metrics["classes"]) == 9
    assert {"temperature", "confidence_threshold", "novelty_threshold"} <= set(metrics["unknown"])
    predictor = CellTypePredictor.load(tmp_path / "model")
    assert predictor.calibration is not None and predictor.calibration.centroids.shape == (9, 16)
    assert predictor.temperature == metrics["unknown"]["temperature"]


def test_calibration_centroids_come_from_a_uniform_sample_of_a_large_training_split(monkeypatch):
    """Beyond MAX_CENTROID_CELLS training cells, only a uniform sample of them is read and embedded for the
    centroids (a 1M-cell store spent minutes embedding every training cell); the centroids stay close to the full
    means."""
    import numpy as np
    import torch

    from scimilarity_lora.model.classifier import CellClassifier
    from scimilarity_lora.model.encoder import EncoderConfig
    from scimilarity_lora.training import calibrate

    torch.manual_seed(0)
    classifier = CellClassifier.build(EncoderConfig(n_genes=20, hidden_dim=[16], latent_dim=8), n_classes=2)
    rng = np.random.default_rng(0)
    train_x = torch.from_numpy(rng.random((4000, 20)).astype(np.float32))
    train_y = torch.from_numpy(rng.integers(0, 2, 4000))
    val_x, val_y = train_x[:200], train_y[:200]

    class Splits:  # the two calls fit_calibration makes of a datamodule
        def split_ids(self):
            return {"train": np.arange(4000), "val": np.arange(200)}

        def eval_dataloader(self, split, rows=None):
            x, y = (train_x, train_y) if split == "train" else (val_x, val_y)
            if rows is not None:
                asked.append((split, rows))
                x, y = x[rows], y[rows]
            return [(x[s:s + 500], y[s:s + 500]) for s in range(0, len(y), 500)]

    asked = []

    embedded = []
    original = classifier.embed
    monkeypatch.setattr(classifier, "embed", lambda x: embedded.append(len(x)) or original(x))
    monkeypatch.setattr(calibrate, "MAX_CENTROID_CELLS", 800)
    calibration = calibrate.fit_calibration(classifier, Splits(), 2)
    assert sum(embedded) == 800  # 800 of the 4,000 training cells, read as a sample: the rest never loaded
    (split, rows), = asked
    assert split == "train" and len(np.unique(rows)) == 800 and np.all(np.diff(rows) > 0)
    assert rows.min() < 400 and rows.max() > 3600  # spread over the split, not its first cells
    classifier.eval()
    with torch.no_grad():
        z = classifier.embed(train_x).numpy()
    full = np.stack([z[train_y.numpy() == c].mean(0) for c in (0, 1)])
    full /= np.linalg.norm(full, axis=1, keepdims=True)  # centroids are unit-norm class means
    sampled = np.asarray(calibration.centroids)
    assert sampled.shape == full.shape and (np.sum(sampled * full, axis=1) > 0.99).all()
