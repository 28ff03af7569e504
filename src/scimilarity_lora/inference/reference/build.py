"""Build a reference index (see :mod:`.index` for the layout) by streaming the reference through an encoder.

Cells are read in row chunks (:mod:`scimilarity_lora.data.row_source`: an ``.h5ad`` sliced from HDF5, or a SOMA
store slice), validated, aligned, normalised and embedded per chunk; each chunk's embeddings are appended to disk
and to the hnsw graph, so memory holds one chunk, the graph and the kept obs columns, never the expression matrix.

The novelty threshold is calibrated on held-out reference cells: for a random sample of indexed cells, the distance
to their nearest *other* reference cell (their own entry left out), and the threshold keeps ``novelty_quantile`` of
them in, as the head's novelty threshold keeps 0.99 of validation cells. SCimilarity's fixed 0.03 is reported
beside it (the share of these cells it would call novel).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from scimilarity_lora.data.io import DataError, validate_matrix
from scimilarity_lora.data.row_source import open_rows
from scimilarity_lora.genes import gene_order_hash
from scimilarity_lora.inference.artifact import atomic_model_dir
from scimilarity_lora.inference.reference.encoder import ReferenceEncoder
from scimilarity_lora.inference.reference.index import (CELLS, EMBEDDINGS, FORMAT, HNSW, MANIFEST,
                                                        SCIMILARITY_MIN_DIST)

log = logging.getLogger(__name__)


def build_index(model: str | Path | ReferenceEncoder, reference: str, out: str | Path, *, label_key: str,
                keep_obs: Sequence[str] = (), base: bool = False, layer: str | None = "X",
                input_is_log1p: bool = False, gene_symbols_key: str | None = None, obs_filter: str | None = None,
                batch_size: int = 4096, min_overlap: int = 50, M: int = 16, ef_construction: int = 200,
                ef: int = 100, novelty_quantile: float = 0.99, n_calibration: int = 5000, seed: int = 0,
                progress: bool = True) -> Path:
    """Embed every labelled cell of ``reference`` with the model's encoder (or its base's) into an index at
    ``out`` (written beside, then moved into place: a failed build leaves the previous index or none)."""
    encoder = model if isinstance(model, ReferenceEncoder) else ReferenceEncoder.load(model, base=base)
    prep = replace(encoder.predictor.preprocessing, input_is_log1p=input_is_log1p)
    with open_rows(reference, layer=layer, gene_symbols_key=gene_symbols_key, obs_filter=obs_filter) as source:
        obs = source.obs
        missing = [c for c in (label_key, *keep_obs) if c not in obs.columns]
        if missing:
            raise DataError(f"reference {source.description}: obs has no column {missing}; available: "
                            f"{list(obs.columns)}")
        labels = obs[label_key].astype("string")
        labelled = labels.notna().to_numpy()
        if not labelled.any():
            raise DataError(f"reference {source.description}: no cell has a {label_key!r} label")
        alignment = encoder.alignment(source.genes, source.gene_ids, min_overlap)
        rng = np.random.default_rng(seed)
        calibration_rows = rng.choice(np.flatnonzero(labelled), min(n_calibration, int(labelled.sum())),
                                      replace=False)
        import hnswlib

        graph = hnswlib.Index(space="cosine", dim=encoder.dim)
        graph.init_index(max_elements=int(labelled.sum()), M=M, ef_construction=ef_construction, random_seed=seed)
        kept_rows: list[np.ndarray] = []
        calib_pos: list[int] = []
        calib_z: list[np.ndarray] = []
        final = Path(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        raw = final.with_name(f".{final.name}.embeddings-{uuid.uuid4().hex[:8]}.f32")
        n = 0
        chunks = source.chunks(batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, total=-(-source.n_obs // batch_size), desc="embedding reference", unit="chunk")
        try:
            with open(raw, "wb") as sink:
                for rows, X in chunks:
                    keep = labelled[rows]
                    if not keep.any():
                        continue
                    X = X[keep]
                    validate_matrix(X, prep, f"reference {source.description} (rows {rows.start}-{rows.stop})")
                    z, expressed = encoder.embed(X, alignment, input_is_log1p)
                    if not len(z):
                        continue
                    source_rows = np.arange(rows.start, rows.stop)[keep][expressed]
                    graph.add_items(z, np.arange(n, n + len(z)), num_threads=-1)
                    sink.write(np.ascontiguousarray(z, dtype=np.float32).tobytes())
                    held_out = np.flatnonzero(np.isin(source_rows, calibration_rows))
                    calib_pos.extend((n + held_out).tolist())
                    calib_z.extend(z[held_out])
                    kept_rows.append(source_rows)
                    n += len(z)
            if n == 0:
                raise DataError(f"reference {source.description}: no labelled cell has expression in the model's "
                                "genes; nothing to index")
            rows = np.concatenate(kept_rows)
            cells = pd.DataFrame({"cell_id": obs.index.astype(str).to_numpy()[rows],
                                  label_key: labels.to_numpy()[rows].astype(str)})
            for c in keep_obs:
                if c != label_key:
                    cells[c] = _parquet_safe(obs[c].iloc[rows].reset_index(drop=True))
            graph.set_ef(max(ef, 2))
            novelty = _calibrate(graph, np.asarray(calib_z, dtype=np.float32), np.asarray(calib_pos), novelty_quantile)
            classes = sorted(set(cells[label_key]))
            manifest = {
                "format": FORMAT, "encoder": encoder.identity, "model_dir": str(Path(encoder.model_dir).resolve()),
                "base": encoder.identity["kind"] == "base", "source": source.description, "obs_filter": obs_filter,
                "layer": layer, "input_is_log1p": bool(input_is_log1p), "label_key": label_key,
                "classes": classes, "class_counts": cells[label_key].value_counts().sort_index().to_dict(),
                "kept_obs": [label_key, *[c for c in keep_obs if c != label_key]], "n_cells": int(n),
                "n_cells_in_source": int(source.n_obs), "n_cells_unlabelled": int((~labelled).sum()),
                "n_cells_without_expression": int(labelled.sum() - n), "dim": int(encoder.dim),
                "space": "cosine", "hnsw": {"M": M, "ef_construction": ef_construction, "ef": ef},
                "genes": {**{k: v for k, v in alignment.summary().items() if k != "rescued_by_alias"},
                          "model_gene_order_sha256": gene_order_hash(list(encoder.predictor.genes))},
                "novelty": novelty,
            }
            with atomic_model_dir(final) as tmp:
                tmp.mkdir(parents=True)
                _write_npy(raw, tmp / EMBEDDINGS, n, encoder.dim)
                cells.to_parquet(tmp / CELLS, index=False)
                graph.save_index(str(tmp / HNSW))
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        finally:
            raw.unlink(missing_ok=True)
    log.info("indexed %d reference cells (%d classes) with %s -> %s", n, len(classes),
             encoder.identity["kind"], final)
    return final


def _calibrate(graph, z: np.ndarray, positions: np.ndarray, quantile: float) -> dict:
    """The nearest-other-cell distance of held-out reference cells (each cell's own entry left out)."""
    if len(z) == 0 or graph.get_current_count() < 2:
        return {"threshold": float("inf"), "quantile": quantile, "n_calibration": 0,
                "scimilarity_min_dist": SCIMILARITY_MIN_DIST, "fraction_beyond_scimilarity_min_dist": None}
    pos, dist = graph.knn_query(z, k=2)
    other = np.where(pos[:, 0] == positions, dist[:, 1], dist[:, 0]).clip(min=0)
    return {"threshold": float(np.quantile(other, quantile)), "quantile": quantile, "n_calibration": int(len(z)),
            "median_nearest_distance": float(np.median(other)),
            "scimilarity_min_dist": SCIMILARITY_MIN_DIST,
            "fraction_beyond_scimilarity_min_dist": round(float((other > SCIMILARITY_MIN_DIST).mean()), 4)}


def _write_npy(raw: Path, path: Path, n: int, dim: int, chunk: int = 64 * 2**20) -> None:
    """A standard .npy (float32, n x dim) from the raw rows streamed to disk, copied in chunks."""
    with open(path, "wb") as f, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (n, dim)})
        shutil.copyfileobj(src, f, chunk)


def _parquet_safe(col: pd.Series) -> pd.Series:
    """Categoricals and objects as strings (None kept): parquet holds them plainly, and search answers JSON."""
    if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object:
        return col.astype("string")
    return col
