"""Label encoding: class names <-> integer ids. Built once from the training data, stored in every checkpoint."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np


class LabelError(ValueError):
    """Labels that cannot be used for training (missing column, too few classes or cells)."""


class LabelEncoder:
    """Sorted class names; ids are positions. Sorting makes the encoding independent of data order."""

    def __init__(self, classes: Sequence[str]) -> None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise LabelError(f"duplicate class names: {classes}")
        self.classes: list[str] = classes
        self._index = {c: i for i, c in enumerate(classes)}

    @classmethod
    def fit(cls, labels: Iterable[str]) -> "LabelEncoder":
        classes = sorted({str(x) for x in labels})
        if len(classes) < 2:
            raise LabelError(f"need at least 2 classes to train a classifier, found {classes}")
        return cls(classes)

    def __len__(self) -> int:
        return len(self.classes)

    def encode(self, labels: Iterable[str]) -> np.ndarray:
        labels = [str(x) for x in labels]
        unknown = sorted({x for x in labels if x not in self._index})
        if unknown:
            raise LabelError(f"labels not seen in training: {unknown[:10]}")
        return np.fromiter((self._index[x] for x in labels), dtype=np.int64, count=len(labels))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.classes[int(i)] for i in ids]


def drop_rare_classes(labels: Sequence[str], min_cells: int) -> tuple[np.ndarray, dict[str, int]]:
    """Boolean keep-mask for cells whose class has at least ``min_cells`` cells, and the dropped classes."""
    counts = Counter(str(x) for x in labels)
    dropped = {c: n for c, n in counts.items() if n < min_cells}
    keep = np.array([str(x) not in dropped for x in labels], dtype=bool)
    return keep, dropped
