"""Cell search and kNN answers in the service: ``SCIMILARITY_LORA_REFERENCE`` names one reference index per served
model (``<index dir>`` for the default model, or ``name=<dir>,name=<dir>``), each opened once per server process.

``POST /v1/search`` (one cell) and ``/v1/search_batch`` (many) answer the nearest reference cells with their
labels and kept obs columns; ``"method": "knn"`` on ``/predict`` and ``/predict_batch`` answers the distance-weighted
vote of the k nearest cells instead of the head. A query is embedded by the very adapter that built the index: an
index whose encoder identity is not the served model's is refused when the service starts (one warning line), and a
model replaced while serving by one that no longer matches its index answers 409 naming both encoders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from bentoml.exceptions import BentoMLException, NotFound

from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.reference.encoder import IndexMismatchError, describe, encoder_identity
from scimilarity_lora.inference.reference.index import ReferenceIndex, ReferenceIndexError

log = logging.getLogger(__name__)


class IndexConflict(BentoMLException):
    """HTTP 409: the served model is not the encoder that built its reference index."""

    from http import HTTPStatus

    error_code = HTTPStatus.CONFLICT


def parse_reference_setting(value: str, default_model: str) -> dict[str, str]:
    """``SCIMILARITY_LORA_REFERENCE``: ``<dir>`` (the default model's) or ``name=<dir>,name=<dir>``."""
    value = value.strip()
    if not value:
        return {}
    if "=" not in value:
        return {default_model: value}
    out = {}
    for part in (p for p in value.split(",") if p.strip()):
        name, _, path = part.partition("=")
        if not name.strip() or not path.strip():
            raise ValueError(f"SCIMILARITY_LORA_REFERENCE: {part!r} is not name=<index dir>")
        out[name.strip()] = path.strip()
    return out


class References:
    """The reference index of each served model that has one, checked against that model's encoder."""

    def __init__(self, setting: str, served: dict[str, CellTypePredictor], default_model: str) -> None:
        self.indices: dict[str, ReferenceIndex] = {}
        self._identities: dict[str, dict] = {}
        for name, path in parse_reference_setting(setting, default_model).items():
            try:
                if name not in served:
                    raise ReferenceIndexError(f"names model {name!r}, which is not served ({sorted(served)})")
                index = ReferenceIndex(path)
                index.check_encoder(self.identity(served[name]))
            except (ReferenceIndexError, ValueError, OSError) as e:
                log.warning("no reference index for %s: %s", name, str(e).splitlines()[0][:500])
                continue
            self.indices[name] = index
            log.info("reference index for %s: %s (%d cells, %s)", name, Path(path), index.n_cells,
                     describe(index.identity))

    def identity(self, predictor: CellTypePredictor) -> dict:
        """The predictor's encoder identity, computed once per model directory."""
        key = str(predictor.path)
        if key not in self._identities:
            self._identities[key] = encoder_identity(predictor.path)
        return self._identities[key]

    def for_model(self, name: str, predictor: CellTypePredictor) -> ReferenceIndex:
        index = self.indices.get(name)
        if index is None:
            raise NotFound(f"model {name!r} has no reference index (SCIMILARITY_LORA_REFERENCE names "
                           f"{sorted(self.indices) or 'none'})")
        try:
            index.check_encoder(self.identity(predictor))
        except IndexMismatchError as e:
            raise IndexConflict(str(e)) from None
        return index

    def summary(self) -> dict[str, Any]:
        return {name: {"path": str(i.path), "n_cells": i.n_cells, "classes": i.classes, "k_max": i.n_cells,
                       "novelty_threshold": i.novelty_threshold, "kept_obs": i.kept_columns,
                       "encoder": describe(i.identity)} for name, i in self.indices.items()}


def knn_predictions(index: ReferenceIndex, z: np.ndarray, k: int, top_k: int, force_label: bool) -> list[dict]:
    """The kNN answer per cell, in the /predict response shape (confidence: the winning class's share of the
    distance-weighted vote; top_k: classes by vote share)."""
    knn = index.annotate(z, k)
    labels = knn.labels(index.classes, force_label)
    out = []
    for i in range(len(z)):
        shares = knn.shares[i]
        order = np.argsort(-shares)[:top_k]
        out.append({"cell_type": labels[i], "status": str(knn.status[i]),
                    "best_guess": index.classes[int(knn.best[i])], "confidence": round(float(knn.fraction[i]), 6),
                    "top_k": [{"cell_type": index.classes[int(j)], "probability": round(float(shares[j]), 6)}
                              for j in order],
                    "nearest_distance": round(float(knn.nearest[i]), 6)})
    return out
