"""A reference index on disk, opened for search: SCimilarity's way of annotating and of cell search.

::

    <index dir>/
      manifest.json     format, the encoder's identity (see .encoder), the model dir, the source cells, the gene
                        alignment, the label column and its classes, the kept obs columns, hnsw parameters, the
                        novelty threshold and how it was calibrated
      embeddings.npy    float32 cells x latent, L2-normalised, in index order (memory-mappable: np.load(mmap_mode="r"))
      cells.parquet     per indexed cell: cell_id, the label, the kept obs columns
      index.hnsw        hnswlib's own file (space "cosine": distance = 1 - cosine similarity, as SCimilarity uses)

hnswlib rather than faiss: both were measured on the same 200,000 clustered 128-d embeddings (build 17.5 s vs 18.0
s, recall@15 0.955 vs 0.955 at ef=200, queries 5,000/s vs 6,700/s on 2 cores; ``benchmarks/reference_index.py``
has this project's own figures): equal within noise, and hnswlib is SCimilarity's own choice (its
``CellSearchKNN`` reads ``hnswlib.Index(space="cosine")`` files), so a SCimilarity user finds the same knobs
(``M``, ``ef_construction``, ``ef``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scimilarity_lora.inference.reference.encoder import require_same_encoder
from scimilarity_lora.model.folder import ModelFolderError

FORMAT = "scimilarity-lora-reference/1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
CELLS = "cells.parquet"
HNSW = "index.hnsw"
#: SCimilarity's fixed "is this cell like anything I know" cut-off on the nearest-neighbour distance (its paper)
SCIMILARITY_MIN_DIST = 0.03
UNKNOWN = "unknown"


class ReferenceIndexError(ModelFolderError):
    pass


@dataclass
class KnnResult:
    """Per query cell: the voted label (index into ``classes``), its weighted vote fraction, the nearest distance,
    status ok | novel, and the k neighbours (row positions in the index) with their distances."""

    best: np.ndarray
    fraction: np.ndarray
    nearest: np.ndarray
    status: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    shares: np.ndarray  # cells x classes: each class's share of the weighted vote

    def labels(self, classes: list[str], force_label: bool = False) -> list[str]:
        names = np.asarray(classes, dtype=object)[self.best] if len(self.best) else np.array([], dtype=object)
        return [n if force_label or s == "ok" else UNKNOWN for n, s in zip(names, self.status)]


def knn_vote(neighbor_labels: np.ndarray, distances: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's share of the vote (cells x classes) from the neighbours' labels, each vote weighted by
    1 / max(distance, 1e-6), SCimilarity's distance weighting (``get_predictions_knn(weighting=True)``)."""
    weights = 1.0 / np.maximum(distances.astype(np.float64), 1e-6)
    votes = np.zeros((len(neighbor_labels), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(neighbor_labels)), neighbor_labels.shape[1]), neighbor_labels.ravel()),
              weights.ravel())
    total = votes.sum(axis=1, keepdims=True)
    return (votes / np.where(total > 0, total, 1)).astype(np.float32)


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536, query_block: int = 512
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine neighbours (positions, distances), nearest first, over ``embeddings`` read in chunks of
    rows (a memory-mapped million-cell matrix is never loaded whole; one block of similarities is at most
    ``query_block`` x ``chunk`` floats): the ground truth the index is measured by."""
    q_all = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(embeddings))
    positions = np.zeros((len(q_all), k), dtype=np.int64)
    similarities = np.zeros((len(q_all), k), dtype=np.float32)
    for b in range(0, len(q_all), query_block):
        q = q_all[b:b + query_block]
        best_sim = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_pos = np.zeros((len(q), 0), dtype=np.int64)
        for s in range(0, len(embeddings), chunk):
            sims = q @ np.asarray(embeddings[s:s + chunk], dtype=np.float32).T
            take = min(k, sims.shape[1])
            part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            cand_sim = np.concatenate([best_sim, np.take_along_axis(sims, part, 1)], axis=1)
            cand_pos = np.concatenate([best_pos, part + s], axis=1)
            keep = np.argsort(-cand_sim, axis=1, kind="stable")[:, :k]
            best_sim, best_pos = np.take_along_axis(cand_sim, keep, 1), np.take_along_axis(cand_pos, keep, 1)
        positions[b:b + len(q)], similarities[b:b + len(q)] = best_pos, best_sim
    return positions, (1.0 - similarities).astype(np.float32)


class ReferenceIndex:
    """An index directory opened once (per process): the hnsw graph in memory, the embeddings memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise ReferenceIndexError(f"{self.path} is not a reference index (no {MANIFEST}; build one with "
                                      "python -m scimilarity_lora.inference.reference build ...)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ReferenceIndexError(f"{manifest} is not valid JSON: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise ReferenceIndexError(f"{self.path} has format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        for name in (EMBEDDINGS, CELLS, HNSW):
            if not (self.path / name).is_file():
                raise ReferenceIndexError(f"reference index {self.path} is missing {name}")
        try:
            self.embeddings = np.load(self.path / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
            self.cells = pd.read_parquet(self.path / CELLS)
        except (ValueError, OSError) as e:
            raise ReferenceIndexError(f"reference index {self.path} is corrupt: {type(e).__name__}: {e}") from e
        n, dim = int(self.manifest["n_cells"]), int(self.manifest["dim"])
        if self.embeddings.shape != (n, dim) or len(self.cells) != n:
            raise ReferenceIndexError(f"reference index {self.path} is inconsistent: manifest {n} x {dim}, "
                                      f"embeddings {self.embeddings.shape}, {len(self.cells)} cells")
        self.classes: list[str] = list(self.manifest["classes"])
        label_key = self.manifest["label_key"]
        self.label_codes = pd.Categorical(self.cells[label_key].astype(str), categories=self.classes).codes
        self.cell_ids = self.cells["cell_id"].astype(str).to_numpy()
        import hnswlib

        self.hnsw = hnswlib.Index(space="cosine", dim=dim)
        try:
            self.hnsw.load_index(str(self.path / HNSW), max_elements=n)
        except (RuntimeError, ValueError) as e:
            raise ReferenceIndexError(f"{self.path / HNSW} is corrupt: {e}") from e
        if self.hnsw.get_current_count() != n:
            raise ReferenceIndexError(f"{self.path / HNSW} holds {self.hnsw.get_current_count()} cells, the manifest "
                                      f"{n}")
        self.hnsw.set_ef(int(self.manifest["hnsw"]["ef"]))
        self._lock = threading.Lock()  # set_ef/knn_query from several request threads
        self._columns: dict[str, np.ndarray] | None = None

    @property
    def identity(self) -> dict[str, str]:
        return dict(self.manifest["encoder"])

    @property
    def n_cells(self) -> int:
        return int(self.manifest["n_cells"])

    @property
    def novelty_threshold(self) -> float:
        return float(self.manifest["novelty"]["threshold"])

    @property
    def kept_columns(self) -> list[str]:
        return list(self.manifest["kept_obs"])

    def check_encoder(self, identity: dict[str, str]) -> None:
        require_same_encoder(self.identity, identity, str(self.path))

    def search(self, z: np.ndarray, k: int, num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(positions, cosine distances), nearest first, k capped at the index size."""
        k = min(int(k), self.n_cells)
        if len(z) == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        with self._lock:
            if k > self.hnsw.ef:  # hnswlib needs ef >= k
                self.hnsw.set_ef(k)
            labels, distances = self.hnsw.knn_query(np.ascontiguousarray(z, dtype=np.float32), k=k,
                                                    num_threads=num_threads)
        return labels.astype(np.int64), np.maximum(distances, 0).astype(np.float32)

    def annotate(self, z: np.ndarray, k: int = 15, threshold: float | None = None) -> KnnResult:
        """Distance-weighted kNN labels; "novel" beyond the calibrated distance threshold (or ``threshold``)."""
        pos, dist = self.search(z, k)
        shares = knn_vote(self.label_codes[pos], dist, len(self.classes))
        best = shares.argmax(axis=1)
        fraction = shares[np.arange(len(best)), best]
        nearest = dist[:, 0] if dist.shape[1] else np.zeros(len(z), dtype=np.float32)
        cut = self.novelty_threshold if threshold is None else threshold
        status = np.where(nearest > cut, "novel", "ok").astype(object)
        return KnnResult(best, fraction, nearest, status, pos, dist, shares)

    def neighbors(self, pos: np.ndarray, dist: np.ndarray) -> list[list[dict[str, Any]]]:
        """Per query cell, its neighbours as records: cell_id, distance, label and the kept obs columns."""
        if self._columns is None:  # JSON-ready columns, built once
            label_key = self.manifest["label_key"]
            self._columns = {"label": self.cells[label_key].astype(str).to_numpy(dtype=object),
                             **{c: np.array([_json_value(v) for v in self.cells[c]], dtype=object)
                                for c in self.kept_columns if c != label_key}}
        columns = self._columns
        return [[{"cell_id": str(self.cell_ids[p]), "distance": round(float(d), 6),
                  **{c: values[p] for c, values in columns.items()}} for p, d in zip(row_pos, row_dist)]
                for row_pos, row_dist in zip(pos, dist)]


def _json_value(v: Any) -> Any:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    return v if isinstance(v, (int, float, str)) else str(v)
