"""Deterministic train/val/test splits: by donor (no donor in two splits) when a donor column exists, else
stratified by label. Pure functions of (labels, groups, seed), so every DDP rank computes the same split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split


class SplitError(ValueError):
    """The data cannot be split as asked (too few donors, an empty split)."""


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def split_cells(
    labels: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Splits:
    """Return positional indices of each split (sorted)."""
    n = len(labels)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SplitError(f"invalid split fractions val={val_fraction}, test={test_fraction}")
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    if groups is not None:
        donors = np.unique(groups)
        if len(donors) < 3:
            raise SplitError(f"splitting by donor needs at least 3 donors, found {len(donors)}: {list(donors)}")
        donors = rng.permutation(donors)
        n_test = max(1, int(round(test_fraction * len(donors))))
        n_val = max(1, int(round(val_fraction * len(donors))))
        if n_test + n_val >= len(donors):
            n_test, n_val = 1, 1
        test_d, val_d = set(donors[:n_test]), set(donors[n_test:n_test + n_val])
        test = idx[np.isin(groups, list(test_d))]
        val = idx[np.isin(groups, list(val_d))]
        train = idx[~np.isin(groups, list(test_d | val_d))]
    else:
        class_sizes = np.unique(labels, return_counts=True)[1]
        stratify = labels if class_sizes.min() >= 3 else None
        if stratify is not None:
            _check_stratifiable(n, len(class_sizes), val_fraction, test_fraction)
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
        rel_val = val_fraction / (1 - test_fraction)
        strat_rest = labels[rest] if stratify is not None else None
        train, val = train_test_split(rest, test_size=rel_val, random_state=seed, stratify=strat_rest)
    splits = Splits(np.sort(train), np.sort(val), np.sort(test))
    for name, part in splits.as_dict().items():
        if len(part) == 0:
            raise SplitError(f"the {name} split is empty ({n} cells); use more data or other fractions")
    return splits


def _check_stratifiable(n: int, n_classes: int, val_fraction: float, test_fraction: float) -> None:
    """A split stratified by label holds every class at least once: refuse fractions too small for that, naming
    the smallest that works (scikit-learn's own error names neither the setting nor the fix)."""
    n_test = int(np.ceil(test_fraction * n))
    n_val = int(np.ceil(val_fraction / (1 - test_fraction) * (n - n_test)))
    for name, size, fraction in (("test", n_test, test_fraction), ("val", n_val, val_fraction)):
        if size < n_classes:
            raise SplitError(f"data.{name}_fraction={fraction:g} gives {size} {name} cells of {n} for {n_classes} "
                             f"classes, and a split stratified by label needs one cell of each: use "
                             f"data.{name}_fraction={np.ceil(1000 * n_classes / n) / 1000:g} or more")


def uniform_sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a uniform sample of at most ``limit`` of ``n`` rows (all of them when ``n <= limit`` or
    no limit): which cells a job that needs no million cells reads, chosen before reading."""
    if not limit or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
