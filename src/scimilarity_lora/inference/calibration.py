"""When to answer "unknown": what training fits on held-out validation cells, and the predictor applies.

- a **temperature** T (softmax(logits / T) minimises validation NLL), so confidences mean what they say;
- a **confidence threshold**: the lowest calibrated confidence at which validation cells reach a target accuracy
  (0.9 by default); below it the answer is "unknown" (reason ``low_confidence``);
- a **novelty detector** on the embedding: the cosine distance to the nearest class centroid of the training cells,
  with the threshold that keeps ``novelty_quantile`` (0.99) of validation cells in; above it the answer is
  "unknown" (reason ``novel``): a cell unlike anything the model was trained on, whatever the head says.

Pure NumPy/torch, saved as JSON + safetensors in the model directory (``calibration.json``, ``centroids.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CALIBRATION_FILE = "calibration.json"
CENTROIDS_FILE = "centroids.safetensors"
#: the answer for a cell the model declines to label
UNKNOWN = "unknown"
#: ok: a class; coarse: a Cell Ontology ancestor of the hesitant classes (see :mod:`.coarse`); low_confidence and
#: novel: "unknown"; no_expression: nothing to classify
STATUSES = ("ok", "coarse", "low_confidence", "novel", "no_expression")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


#: the temperatures :func:`fit_temperature` searches (a trained classifier's optimum lies far inside; logits that
#: carry no information at all reach the upper end, where the probabilities are uniform to 1e-3 anyway)
TEMPERATURE_BOUNDS = (1e-2, 1e3)


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits * (1.0 / temperature)
    z -= z.max(axis=1, keepdims=True)
    picked = z[np.arange(len(z)), y]
    np.exp(z, out=z)
    return float(np.mean(np.log(z.sum(axis=1)) - picked))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) on held-out (validation) data.

    A bounded 1-D search over log T (the NLL is unimodal in it), in NumPy float64: each step holds one copy of the
    logits. torch's LBFGS reached the same answer with an autograd graph per step, and left hundreds of MB of freed
    heap behind it at 125,000 validation cells (the peak of a million-cell evaluation)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    res = minimize_scalar(lambda log_t: _nll(logits, y, float(np.exp(log_t))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def coverage_accuracy(probs: np.ndarray, y: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """For each confidence threshold: the fraction of cells kept (others -> 'unknown') and accuracy on them."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    rows = []
    for th in thresholds:
        keep = conf >= th
        rows.append({"threshold": float(th), "coverage": float(keep.mean()),
                     "accuracy": float(correct[keep].mean()) if keep.any() else float("nan")})
    return rows


def choose_threshold(probs: np.ndarray, y: np.ndarray, target_accuracy: float) -> float:
    """Lowest confidence threshold whose kept cells reach ``target_accuracy`` (0 if all cells already do)."""
    for row in coverage_accuracy(probs, y, np.linspace(0, 1, 101)):
        if row["coverage"] > 0 and row["accuracy"] >= target_accuracy:
            return row["threshold"]
    return 1.0


def class_centroids(z: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Unit-norm mean embedding per class (zeros for a class without cells)."""
    out = np.zeros((n_classes, z.shape[1]), dtype=np.float32)
    for c in range(n_classes):
        if (y == c).any():
            m = z[y == c].mean(axis=0)
            out[c] = m / max(float(np.linalg.norm(m)), 1e-12)
    return out


def novelty_scores(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """1 - the cosine similarity to the nearest class centroid (0: at a centroid; up to 2)."""
    zn = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
    present = np.linalg.norm(centroids, axis=1) > 0
    return 1.0 - (zn @ centroids[present].T).max(axis=1)


@dataclass
class Calibration:
    temperature: float
    confidence_threshold: float
    novelty_threshold: float
    centroids: np.ndarray  # classes x latent, unit norm
    target_accuracy: float = 0.9
    novelty_quantile: float = 0.99
    #: answer a Cell Ontology ancestor when the classes under it pass the threshold together (``unknown.coarse``)
    coarse: bool = True
    #: ... only for cells at least this typical: novelty score within ``coarse_novelty_quantile`` (0.9) of validation
    #: cells. A hesitant cell at the edge of the known classes (a cell of another tissue looks like that) stays
    #: "unknown" rather than becoming a blood ancestor
    coarse_novelty_threshold: float = float("inf")
    coarse_novelty_quantile: float = 0.9

    @classmethod
    def fit(cls, val_logits: np.ndarray, val_y: np.ndarray, val_z: np.ndarray, train_z: np.ndarray,
            train_y: np.ndarray, n_classes: int, target_accuracy: float = 0.9,
            novelty_quantile: float = 0.99, coarse: bool = True, coarse_novelty_quantile: float = 0.9
            ) -> "Calibration":
        temperature = fit_temperature(val_logits, val_y)
        threshold = choose_threshold(softmax(val_logits, temperature), val_y, target_accuracy)
        centroids = class_centroids(train_z, train_y, n_classes)
        val_novelty = novelty_scores(val_z, centroids)
        novelty = float(np.quantile(val_novelty, novelty_quantile))
        return cls(round(temperature, 6), float(threshold), novelty, centroids, target_accuracy, novelty_quantile,
                   coarse, float(np.quantile(val_novelty, coarse_novelty_quantile)), coarse_novelty_quantile)

    def status(self, probs: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Per cell: "ok", "novel" (far from every class) or "low_confidence" (calibrated ``probs`` below the
        threshold); novelty wins when both apply."""
        out = np.full(len(probs), "ok", dtype=object)
        out[probs.max(axis=1) < self.confidence_threshold] = "low_confidence"
        out[novelty_scores(z, self.centroids) > self.novelty_threshold] = "novel"
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        (folder / CALIBRATION_FILE).write_text(json.dumps({
            "temperature": self.temperature, "confidence_threshold": self.confidence_threshold,
            "novelty_threshold": self.novelty_threshold, "target_accuracy": self.target_accuracy,
            "novelty_quantile": self.novelty_quantile, "novelty_score": "1 - max cosine to a class centroid",
            "coarse": self.coarse, "coarse_novelty_threshold": self.coarse_novelty_threshold,
            "coarse_novelty_quantile": self.coarse_novelty_quantile},
            indent=2))
        save_file({"centroids": torch.from_numpy(np.ascontiguousarray(self.centroids, dtype=np.float32))},
                  folder / CENTROIDS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> "Calibration | None":
        folder = Path(folder)
        if not (folder / CALIBRATION_FILE).is_file():
            return None
        d = json.loads((folder / CALIBRATION_FILE).read_text())
        centroids = load_file(folder / CENTROIDS_FILE)["centroids"].numpy()
        return cls(float(d["temperature"]), float(d["confidence_threshold"]), float(d["novelty_threshold"]),
                   centroids, float(d["target_accuracy"]), float(d["novelty_quantile"]), bool(d.get("coarse", True)),
                   float(d.get("coarse_novelty_threshold", float("inf"))), float(d.get("coarse_novelty_quantile", 0.9)))

    def coarse_allowed(self, z: np.ndarray) -> np.ndarray:
        """Cells typical enough (in the embedding) to be answered with a coarser class."""
        return novelty_scores(z, self.centroids) <= self.coarse_novelty_threshold
