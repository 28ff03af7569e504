"""Training-time augmentation of raw counts, so a model never relies on how deeply a study sequenced its cells.

Another study's cells are often shallower than the reference's (median UMIs 1,250 against 2,200 between the real
PBMC studies here). Two augmentations, on the training split only, before normalisation:

- **depth downsampling** (binomial thinning): a share ``downsample_fraction`` of the cells in each batch keep each
  count with probability p ~ U(``downsample_min``, 1): the cell a shallower run of the same library would give;
- **gene dropout**: each non-zero entry is zeroed with probability ``gene_dropout`` (a gene the query did not
  detect).

A cell left without any count keeps its original row. The randomness is a pure function of (seed, the batch's cell
indices), so a resumed run draws exactly what the uninterrupted one drew. Thinning needs counts: with
``input_is_log1p`` only gene dropout applies (a warning says so; ``data=h5ad`` turns both on by default, and a
log-normalised file must still train).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp


log = logging.getLogger(__name__)


class AugmentError(ValueError):
    pass


@dataclass(frozen=True)
class CountAugment:
    downsample_fraction: float = 0.0
    downsample_min: float = 0.3
    gene_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("downsample_fraction", "gene_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise AugmentError(f"data.augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.downsample_min <= 1.0:
            raise AugmentError(f"data.augment.downsample_min must be in (0, 1], got {self.downsample_min}")
        if self.gene_dropout >= 1.0:
            raise AugmentError("data.augment.gene_dropout=1 would remove every count")

    @property
    def active(self) -> bool:
        return self.downsample_fraction > 0 or self.gene_dropout > 0

    def for_input(self, input_is_log1p: bool) -> "CountAugment":
        """What applies to this input: on log1p values thinning is dropped (it needs counts), with a warning."""
        if input_is_log1p and self.downsample_fraction > 0:
            log.warning("data.augment.downsample_fraction thins raw counts, but this data is log1p "
                        "(data.input_is_log1p=true): only gene dropout applies; point data.layer at the counts "
                        "to thin them, or set data.augment.downsample_fraction=0 to silence this")
            return replace(self, downsample_fraction=0.0)
        return self

    def __call__(self, X: sp.csr_matrix, indices: np.ndarray) -> sp.csr_matrix:
        """An augmented copy of the batch ``X`` (rows = the cells at ``indices`` of the training split)."""
        if not self.active or X.nnz == 0:
            return X
        rng = np.random.default_rng([self.seed, zlib.crc32(np.ascontiguousarray(indices, dtype=np.int64).tobytes())])
        X = sp.csr_matrix(X, copy=True)
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        original = X.data.copy()
        data = X.data
        if self.downsample_fraction > 0:
            thinned = rng.random(X.shape[0]) < self.downsample_fraction
            keep = np.where(thinned, rng.uniform(self.downsample_min, 1.0, X.shape[0]), 1.0)
            hit = thinned[rows]
            data[hit] = rng.binomial(np.rint(data[hit]).astype(np.int64), keep[rows][hit]).astype(data.dtype)
        if self.gene_dropout > 0:
            data[rng.random(len(data)) < self.gene_dropout] = 0
        emptied = np.bincount(rows, weights=data, minlength=X.shape[0]) <= 0
        if emptied.any():  # a cell left without counts keeps its original row
            restore = emptied[rows]
            data[restore] = original[restore]
        X.eliminate_zeros()
        return X
