"""Forgetting measured on the user's own labelled reference cells (``python evaluate.py reference=cells.h5ad``):
how well the cell types of a reference set still separate in the adapted embedding compared with the base's (kNN
label transfer, k neighbours by cosine), how far each cell moved, and, when the base folder has SCimilarity's
decoder, how well the frozen decoder still reconstructs the cells from the adapted embedding.

kNN transfer is leave-one-out over all labelled cells, or, with ``query_cells`` (e.g. a pretraining run's
``holdout.csv``), from the other cells to those held-out cells only: the retention figure of a pretrained base,
measured on cells the base never trained on. Cosine and decoder error are then reported on the query cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scimilarity_lora.data.io import DataError, expression_matrix, gene_names, read_anndata, validate_matrix
from scimilarity_lora.evaluation.metrics import classification_report, knn_labels, knn_transfer, mean_cosine
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.labels import LabelEncoder
from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.sparse import SparseBatch


@torch.no_grad()
def reference_forgetting(predictor: CellTypePredictor, base: Encoder, path: str | Path, label_key: str,
                         layer: str | None = "X", input_is_log1p: bool = False, k: int = 15,
                         decoder: torch.nn.Module | None = None, max_cells: int = 20_000, seed: int = 0,
                         batch_size: int = 1024, query_cells: str | Path | None = None) -> dict[str, Any]:
    adata = read_anndata(str(path))
    if label_key not in adata.obs.columns:
        raise DataError(f"reference {path}: label column {label_key!r} not in obs; available: {list(adata.obs.columns)}")
    labelled = adata.obs[label_key].notna().to_numpy()
    rows = np.flatnonzero(labelled)
    is_query = _query_mask(adata.obs_names, query_cells) if query_cells else None
    if len(rows) > max_cells and is_query is None:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    X, var_names, var = expression_matrix(adata, layer)
    X = X[rows]
    from dataclasses import replace

    validate_matrix(X, replace(predictor.preprocessing, input_is_log1p=input_is_log1p), f"reference {path}")
    alignment = predictor.alignment(gene_names(var_names, var, None), min_overlap=1)
    prep = replace(predictor.preprocessing, input_is_log1p=input_is_log1p)
    base.eval()
    z_base, z_adapted, mse_base, mse_adapted, kept = [], [], [], [], []
    for s in range(0, X.shape[0], batch_size):
        aligned = alignment.apply(X[s:s + batch_size])
        ok = prep.nonempty_rows(aligned)
        if not ok.any():
            continue
        x = prep(aligned[ok], output="auto")
        zb, za = base(x), predictor.classifier.embed(x)
        z_base.append(zb.numpy())
        z_adapted.append(za.numpy())
        kept.append(np.arange(s, s + len(ok))[ok])
        if decoder is not None:
            dense = x.to_dense() if isinstance(x, SparseBatch) else x
            mse_base.append(((decoder(zb) - dense) ** 2).mean(dim=1).numpy())
            mse_adapted.append(((decoder(za) - dense) ** 2).mean(dim=1).numpy())
    kept_rows = rows[np.concatenate(kept)]
    labels = adata.obs[label_key].astype(str).to_numpy()[kept_rows]
    encoder = LabelEncoder.fit(labels)
    y = encoder.encode(labels)
    zb, za = np.concatenate(z_base), np.concatenate(z_adapted)
    q = np.ones(len(y), dtype=bool) if is_query is None else is_query[kept_rows]
    out: dict[str, Any] = {"path": str(path), "label_key": label_key, "n_cells": int(len(y)), "k": k,
                           "genes_used": alignment.n_overlap, "mean_cosine": round(mean_cosine(zb[q], za[q]), 4)}
    if is_query is not None:
        out.update(query_cells=str(query_cells), n_query=int(q.sum()))
    for name, z in (("base", zb), ("adapted", za)):
        pred = knn_labels(z, y, k) if is_query is None else knn_transfer(z[~q], y[~q], z[q], k)
        report = classification_report(y[q], pred, encoder.classes)
        out[name] = {"knn_accuracy": round(report["accuracy"], 4), "knn_macro_f1": round(report["macro_f1"], 4)}
    out["retained_accuracy"] = round(out["adapted"]["knn_accuracy"] / max(out["base"]["knn_accuracy"], 1e-12), 4)
    out["retained_macro_f1"] = round(out["adapted"]["knn_macro_f1"] / max(out["base"]["knn_macro_f1"], 1e-12), 4)
    if decoder is not None:
        out["reconstruction_mse"] = {"base": round(float(np.concatenate(mse_base)[q].mean()), 6),
                                     "adapted": round(float(np.concatenate(mse_adapted)[q].mean()), 6)}
    return out


def _query_mask(obs_names, query_cells: str | Path) -> np.ndarray:
    """Which cells are queries: the ``cell_id`` column of a CSV (a pretraining run's ``holdout.csv``)."""
    import pandas as pd

    path = Path(query_cells)
    if not path.is_file():
        raise DataError(f"reference.query_cells: {path} not found")
    table = pd.read_csv(path)
    if "cell_id" not in table.columns:
        raise DataError(f"reference.query_cells: {path} has no cell_id column (columns: {list(table.columns)})")
    mask = np.asarray(obs_names.isin(table["cell_id"].astype(str)))
    if not mask.any() or mask.all():
        raise DataError(f"reference.query_cells: {path} names {int(mask.sum())} of the reference's "
                        f"{len(mask)} cells; need some query cells and some reference cells")
    return mask
