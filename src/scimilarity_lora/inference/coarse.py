"""Coarser answers instead of "unknown": a cell the model hesitates on between two T-cell subtypes is a T cell.

When the calibrated confidence of the best class is under the model's threshold, but the classes under one Cell
Ontology term together pass it, the answer is that term (status ``coarse``, its CL id beside it): the most specific
such term that contains the best class (fewest classes under it; ties go to the larger probability mass). The terms
a model may answer were chosen at training time from its classes' CL ids (:func:`~.data.ontology.coarse_terms`:
ancestors of at least two classes and not of all of them, uninformative roots excluded) and are read here from
``model_config.json``, so inference needs no ontology file. A cell far from every class ("novel") is never answered
coarsely: a cell of another tissue must stay "unknown", not become a blood ancestor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CoarseTerms:
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    #: terms x classes: which classes each term contains
    membership: np.ndarray

    @classmethod
    def from_ontology(cls, ontology: dict | None, n_classes: int) -> "CoarseTerms | None":
        terms = (ontology or {}).get("coarse_terms") or []
        if not terms:
            return None
        membership = np.zeros((len(terms), n_classes), dtype=bool)
        for i, t in enumerate(terms):
            membership[i, t["classes"]] = True
        return cls(tuple(t["id"] for t in terms), tuple(t["label"] for t in terms), membership)

    def choose(self, probs: np.ndarray, threshold: float) -> np.ndarray:
        """Per cell, the index of the coarse term to answer, or -1 when no term containing the best class reaches
        ``threshold``."""
        if len(probs) == 0:
            return np.zeros(0, dtype=np.int64)
        mass = probs @ self.membership.T.astype(probs.dtype)              # cells x terms
        contains_best = self.membership[:, probs.argmax(axis=1)].T         # cells x terms
        ok = contains_best & (mass >= threshold)
        # fewest classes first; mass <= 1 only breaks ties between terms with as many classes
        cost = np.where(ok, self.membership.sum(axis=1)[None, :] - mass, np.inf)
        best = cost.argmin(axis=1)
        return np.where(np.isfinite(cost[np.arange(len(probs)), best]), best, -1)
