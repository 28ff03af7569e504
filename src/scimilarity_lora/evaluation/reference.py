"""Forgetting measured on the user's own labelled reference cells (``python evaluate.py reference=cells.h5ad``):
how well the cell types of a reference set still separate in the adapted embedding compared with the base's (kNN
label transfer, leave-one-out, k neighbours by cosine), how far each cell moved, and, when the base folder has
SCimilarity's decoder, how well the frozen decoder still reconstructs the cells from the adapted embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scimilarity_lora.data.io import DataError, expression_matrix, gene_names, read_anndata, validate_matrix
from scimilarity_lora.evaluation.metrics import classification_report, knn_labels, mean_cosine
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.labels import LabelEncoder
from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.sparse import SparseBatch


@torch.no_grad()
def reference_forgetting(predictor: CellTypePredictor, base: Encoder, path: str | Path, label_key: str,
                         layer: str | None = "X", input_is_log1p: bool = False, k: int = 15,
                         decoder: torch.nn.Module | None = None, max_cells: int = 20_000, seed: int = 0,
                         batch_size: int = 1024) -> dict[str, Any]:
    adata = read_anndata(str(path))
    if label_key not in adata.obs.columns:
        raise DataError(f"reference {path}: label column {label_key!r} not in obs; available: {list(adata.obs.columns)}")
    labelled = adata.obs[label_key].notna().to_numpy()
    rows = np.flatnonzero(labelled)
    if len(rows) > max_cells:
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
    out: dict[str, Any] = {"path": str(path), "label_key": label_key, "n_cells": int(len(y)), "k": k,
                           "genes_used": alignment.n_overlap, "mean_cosine": round(mean_cosine(zb, za), 4)}
    for name, z in (("base", zb), ("adapted", za)):
        report = classification_report(y, knn_labels(z, y, k), encoder.classes)
        out[name] = {"knn_accuracy": round(report["accuracy"], 4), "knn_macro_f1": round(report["macro_f1"], 4)}
    out["retained_accuracy"] = round(out["adapted"]["knn_accuracy"] / max(out["base"]["knn_accuracy"], 1e-12), 4)
    out["retained_macro_f1"] = round(out["adapted"]["knn_macro_f1"] / max(out["base"]["knn_macro_f1"], 1e-12), 4)
    if decoder is not None:
        out["reconstruction_mse"] = {"base": round(float(np.concatenate(mse_base).mean()), 6),
                                     "adapted": round(float(np.concatenate(mse_adapted).mean()), 6)}
    return out
