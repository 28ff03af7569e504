"""At the end of training: fit when the model should answer "unknown" (see :mod:`~.inference.calibration`) on the
validation split, with class centroids of the training split's embeddings. Streams the splits batch by batch (class
sums, not stored embeddings), so it costs one pass over the training data, at Census scale too."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scimilarity_lora.inference.calibration import Calibration
from scimilarity_lora.model.classifier import CellClassifier


@torch.no_grad()
def fit_calibration(classifier: CellClassifier, datamodule: Any, n_classes: int, target_accuracy: float = 0.9,
                    novelty_quantile: float = 0.99, coarse: bool = True,
                    coarse_novelty_quantile: float = 0.9) -> Calibration:
    was_training = classifier.training
    classifier.eval()
    sums = np.zeros((n_classes, classifier.latent_dim), dtype=np.float64)
    counts = np.zeros(n_classes, dtype=np.int64)
    for x, y in datamodule.eval_dataloader("train"):
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
