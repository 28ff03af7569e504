"""The adapters one service serves over one base (``SCIMILARITY_LORA_MODEL=scimilarity_base:<hash>``).

The base comes from the BentoML store once; each adapter model of that base (``export --adapter``) adds its LoRA
weights and head to one :class:`~scimilarity_lora.model.multi_adapter.MultiAdapterClassifier`, and gets a
:class:`CellTypePredictor` view (its classes, calibration, gene alignment and preprocessing) for everything around
the forward pass. Requests pick an adapter by name; the micro-batcher runs rows of different adapters in one pass.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from scimilarity_lora.inference.artifact import read_model_config
from scimilarity_lora.inference.calibration import Calibration
from scimilarity_lora.inference.multi import read_adapter
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.model.classifier import CellClassifier
from scimilarity_lora.model.folder import load_model_folder
from scimilarity_lora.model.multi_adapter import AdapterError, MultiAdapterClassifier

log = logging.getLogger(__name__)


def adapter_tags(base_sha256: str, names: Sequence[str] = ()) -> list[str]:
    """The adapters to serve: ``names`` (store tags or names), or every adapter of the base in the store (the newest
    version of each name)."""
    if names:
        return list(names)
    import bentoml

    newest: dict[str, Any] = {}
    for model in bentoml.models.list():
        labels = model.info.labels
        if labels.get("kind") == "adapter" and model.info.metadata.get("base_sha256") == base_sha256:
            name = model.tag.name
            if name not in newest or model.info.creation_time > newest[name].info.creation_time:
                newest[name] = model
    return [str(m.tag) for _, m in sorted(newest.items())]


class AdapterSet:
    def __init__(self, base_path: str, base_sha256: str) -> None:
        encoder, self.genes = load_model_folder(base_path)
        self.sha256 = base_sha256
        self.multi = MultiAdapterClassifier(encoder)
        self.predictors: dict[str, CellTypePredictor] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def add(self, name: str, path: str, tag: str = "") -> None:
        adapter, spec = read_adapter(path, name, base_sha256=self.sha256, base_genes=self.genes)
        if list(spec.genes) != self.genes:
            raise AdapterError(f"adapter {name!r} lists another gene order than its base")
        spec.genes = self.genes  # one copy of the base's gene list for every adapter
        classifier = CellClassifier(self.multi.base, adapter.head)
        self.predictors[name] = CellTypePredictor(classifier, spec, read_model_config(path), Calibration.load(path))
        self.multi.add(adapter)
        self.info[name] = {"name": name, "tag": tag, "classes": list(spec.classes), "finetune": spec.finetune,
                           "metrics": adapter.meta["metrics"], "base": {"sha256": self.sha256}}
        log.info("serving adapter %s (%s): %d classes", name, tag, len(spec.classes))

    def remove(self, name: str) -> None:
        self.multi.remove(name)
        self.predictors.pop(name)
        self.info.pop(name)

    def forward(self, xs: Sequence[torch.Tensor], names: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One forward pass for requests of (possibly) different adapters: per request (probabilities, embeddings)."""
        row_names = [n for x, n in zip(xs, names) for _ in range(x.shape[0])]
        z, groups = self.multi(torch.cat(list(xs)) if len(xs) > 1 else xs[0], row_names)
        probs_of = {}
        for name, (rows, logits) in groups.items():
            probs = torch.softmax(logits / self.predictors[name].temperature, dim=1).numpy()
            probs_of[name] = (rows.numpy(), probs)
        out, start = [], 0
        for x, name in zip(xs, names):
            rows, probs = probs_of[name]
            pos = np.searchsorted(rows, np.arange(start, start + x.shape[0]))
            out.append((probs[pos], z[start:start + x.shape[0]].numpy()))
            start += x.shape[0]
        return out
