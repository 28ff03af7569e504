"""scimilarity-lora: fine-tune SCimilarity with LoRA, evaluate it on other studies, annotate and serve.

The notebook API (see :mod:`scimilarity_lora.api`)::

    import scimilarity_lora as sl
    run = sl.fit(adata, "cell_type")
    run.annotate(other)

Attributes are imported on first use, so ``import scimilarity_lora`` stays light (the service imports it too).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["fit", "pretrain", "Run", "annotate", "build_index", "ReferenceIndex", "CellTypePredictor", "evaluate_query"]

_WHERE = {
    "fit": "scimilarity_lora.api", "pretrain": "scimilarity_lora.api", "Run": "scimilarity_lora.api",
    "annotate": "scimilarity_lora.inference.annotate", "build_index": "scimilarity_lora.inference.reference",
    "ReferenceIndex": "scimilarity_lora.inference.reference", "CellTypePredictor": "scimilarity_lora.inference.predictor",
    "evaluate_query": "scimilarity_lora.evaluation.query",
}

_SUBMODULES = {"api", "data", "evaluation", "inference", "model", "serving", "training"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    if name in _SUBMODULES:  # ``sl.api``, ``sl.inference``: submodules on first use, as after an explicit import
        return import_module(f"scimilarity_lora.{name}")
    raise AttributeError(f"module 'scimilarity_lora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
