"""The adapters one service serves over one base (``SCIMILARITY_LORA_MODEL=scimilarity_base:<hash>``).

The base comes from the BentoML store once; each adapter model of that base (``export --adapter``) adds its LoRA
weights and head to one :class:`~scimilarity_lora.model.multi_adapter.MultiAdapterClassifier`, and gets a
:class:`CellTypePredictor` view (its classes, calibration, gene alignment and preprocessing) for everything around
the forward pass. Requests pick an adapter by name; the micro-batcher runs rows of different adapters in one pass.

The registry is one dict of name -> :class:`Served` (adapter + predictor + info), replaced as a whole: an adapter is
read and validated completely before it is registered (a failed add leaves nothing behind), a replacement swaps
all three at once, and the forward pass answers each request with the entry that computed it, so its classes and
calibration always belong to the head that ran. Changes happen on the inference thread, between forward passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from scimilarity_lora.inference.alignment_cache import AlignmentCache
from scimilarity_lora.inference.artifact import read_model_config
from scimilarity_lora.inference.calibration import Calibration
from scimilarity_lora.inference.multi import read_adapter
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.model.classifier import CellClassifier
from scimilarity_lora.model.folder import load_model_folder
from scimilarity_lora.model.multi_adapter import Adapter, AdapterError, MultiAdapterClassifier

log = logging.getLogger(__name__)


class AdapterGone(KeyError):
    """A request's adapter was removed while the request waited for its forward pass."""


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


@dataclass(frozen=True)
class Served:
    adapter: Adapter
    predictor: CellTypePredictor
    info: dict[str, Any]


class AdapterSet:
    def __init__(self, base_path: str, base_sha256: str) -> None:
        encoder, self.genes = load_model_folder(base_path)
        self.sha256 = base_sha256
        self.multi = MultiAdapterClassifier(encoder)
        self.served: dict[str, Served] = {}
        #: one byte-bounded alignment cache for every adapter: they share the base's gene order
        self.alignments = AlignmentCache()

    @property
    def predictors(self) -> dict[str, CellTypePredictor]:
        return {name: s.predictor for name, s in self.served.items()}

    @property
    def info(self) -> dict[str, dict[str, Any]]:
        return {name: s.info for name, s in self.served.items()}

    def build(self, name: str, path: str, tag: str = "") -> Served:
        """Read and check an adapter completely, registering nothing (safe off the inference thread)."""
        try:
            adapter, spec = read_adapter(path, name, base_sha256=self.sha256, base_genes=self.genes)
            if list(spec.genes) != self.genes:
                raise AdapterError(f"adapter {name!r} lists another gene order than its base")
            spec.genes = self.genes  # one copy of the base's gene list for every adapter
            self.multi.check(adapter)
            calibration = Calibration.load(path)
            predictor = CellTypePredictor(CellClassifier(self.multi.base, adapter.head), spec,
                                          read_model_config(path), calibration, alignments=self.alignments)
            predictor.path = Path(path)
        except Exception as e:  # noqa: BLE001 - malformed files raise anything (json, safetensors, torch): one line
            raise AdapterError(f"adapter {name!r} ({tag or path}) cannot be served: {type(e).__name__}: {e}") from e
        info = {"name": name, "tag": tag, "classes": list(spec.classes), "finetune": spec.finetune,
                "metrics": adapter.meta["metrics"], "base": {"sha256": self.sha256},
                "class_ontology_terms": predictor.class_terms}
        return Served(adapter, predictor, info)

    def register(self, served: Served) -> None:
        """Serve ``served`` under its name, replacing any adapter of that name in one step."""
        name = served.adapter.name
        self.multi.adapters[name] = served.adapter
        self.served = {**self.served, name: served}
        log.info("serving adapter %s (%s): %d classes", name, served.info["tag"], len(served.info["classes"]))

    def add(self, name: str, path: str, tag: str = "") -> None:
        self.register(self.build(name, path, tag))

    def remove(self, name: str) -> None:
        served = {k: v for k, v in self.served.items() if k != name}
        self.multi.adapters.pop(name, None)
        self.served = served

    def forward(self, xs: Sequence[torch.Tensor], names: Sequence[str]) -> list:
        """One forward pass for requests of (possibly) different adapters: per request (probabilities, embeddings,
        the predictor that interprets them), or :class:`AdapterGone` for a request whose adapter was removed while
        it waited (the other requests of the batch are answered)."""
        served = self.served  # one snapshot for the whole pass
        live = [i for i, n in enumerate(names) if n in served]
        out: list = [AdapterGone(f"unknown model {n!r}; served: {sorted(served)}") if n not in served else None
                     for n in names]
        if not live:
            return out
        xs_live = [xs[i] for i in live]
        row_names = [names[i] for i in live for _ in range(xs[i].shape[0])]
        z, groups = self.multi(torch.cat(xs_live) if len(xs_live) > 1 else xs_live[0], row_names,
                               {n: served[n].adapter for n in set(row_names)})
        probs_of = {}
        for name, (rows, logits) in groups.items():
            probs = torch.softmax(logits / served[name].predictor.temperature, dim=1).numpy()
            probs_of[name] = (rows.numpy(), probs)
        start = 0
        for i in live:
            rows, probs = probs_of[names[i]]
            n = xs[i].shape[0]
            pos = np.searchsorted(rows, np.arange(start, start + n))
            out[i] = (probs[pos], z[start:start + n].numpy(), served[names[i]].predictor)
            start += n
        return out
