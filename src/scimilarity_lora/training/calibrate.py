"""At the end of training: fit when the model should answer "unknown" (see :mod:`~.inference.calibration`) on the
validation split, with class centroids of the training split's embeddings. Streams the splits batch by batch (class
sums, not stored embeddings). Centroids need no million cells: beyond ``MAX_CENTROID_CELLS`` training cells a uniform sample of them is read and
embedded (a 1M-cell store spent 3 of its 4 minutes here embedding all 750,534 training cells), so the cost stops
growing with the store."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scimilarity_lora.inference.calibration import Calibration
from scimilarity_lora.model.classifier import CellClassifier
from scimilarity_lora.data.splits import uniform_sample


#: training cells embedded for the class centroids, at most (a uniform sample beyond it)
MAX_CENTROID_CELLS = 100_000


@torch.no_grad()
def fit_calibration(classifier: CellClassifier, datamodule: Any, n_classes: int, target_accuracy: float = 0.9,
                    novelty_quantile: float = 0.99, coarse: bool = True,
                    coarse_novelty_quantile: float = 0.9) -> Calibration:
    was_training = classifier.training
    classifier.eval()
    sums = np.zeros((n_classes, classifier.latent_dim), dtype=np.float64)
    counts = np.zeros(n_classes, dtype=np.int64)
    n_train = len(datamodule.split_ids()["train"])
    rows = uniform_sample(n_train, MAX_CENTROID_CELLS, seed=0)
    for x, y in datamodule.eval_dataloader("train", rows=None if len(rows) == n_train else rows):
        z = classifier.embed(x).cpu().numpy().astype(np.float64)
        np.add.at(sums, y.numpy(), z)
        counts += np.bincount(y.numpy(), minlength=n_classes)
    logits, zs, ys = [], [], []
    for x, y in datamodule.eval_dataloader("val"):
        batch_logits, z = classifier.logits_and_embedding(x)
        logits.append(batch_logits.cpu().numpy())
        zs.append(z.cpu().numpy())
        ys.append(y.numpy())
    classifier.train(was_training)
    # centroids from class sums: pass each class's mean as one "cell" with that class
    present = counts > 0
    means = (sums[present] / counts[present, None]).astype(np.float32)
    return Calibration.fit(np.concatenate(logits), np.concatenate(ys), np.concatenate(zs), means,
                           np.flatnonzero(present), n_classes, target_accuracy, novelty_quantile, coarse,
                           coarse_novelty_quantile)
