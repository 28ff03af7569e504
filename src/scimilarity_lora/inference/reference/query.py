"""Query cells against a reference index with a trained model: the embedding the index was built with (the model's
own, or its base's), then the kNN vote. Shared by ``annotate --reference`` and ``evaluate query.reference=``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.reference.encoder import ReferenceEncoder, encoder_identity, require_same_encoder
from scimilarity_lora.inference.reference.index import UNKNOWN, KnnResult, ReferenceIndex
from scimilarity_lora.model.folder import ModelFolderError


def open_reference(reference: "str | Path | ReferenceIndex") -> ReferenceIndex:
    return reference if isinstance(reference, ReferenceIndex) else ReferenceIndex(reference)


def index_encoder(index: ReferenceIndex, predictor: CellTypePredictor) -> ReferenceEncoder | None:
    """The encoder whose embedding the index holds, checked against the index: None for the model's own (the head
    pass's embeddings serve), its base's ``ReferenceEncoder`` for an index built with ``--base``; anything else is
    refused naming both encoders. Resolved once per predictor and index: the identity check hashes weights and the
    base is loaded from disk, which a chunked annotate (one call per chunk) must not repeat."""
    if predictor.path is None:
        raise ModelFolderError("this predictor was built in memory; a reference index needs a model directory "
                               "(CellTypePredictor.load(path)) to check which encoder it was built with")
    memo = predictor.__dict__.setdefault("_index_encoders", {})
    key = tuple(sorted(index.identity.items()))
    if key not in memo:
        own = encoder_identity(predictor.path)
        if index.identity == own:
            memo[key] = None
        elif index.identity.get("kind") == "base":
            require_same_encoder(index.identity, encoder_identity(predictor.path, base=True), str(index.path))
            memo[key] = ReferenceEncoder.load(predictor.path, base=True, predictor=predictor)
        else:
            require_same_encoder(index.identity, own, str(index.path))
    return memo[key]


def index_embeddings(index: ReferenceIndex, predictor: CellTypePredictor, head_embeddings: np.ndarray,
                     X: "sp.spmatrix | np.ndarray", genes: Sequence[str], gene_ids: Sequence[str] | None,
                     input_is_log1p: bool, min_overlap: int, batch_size: int = 4096) -> np.ndarray:
    """Embeddings of every cell in the index's space (see :func:`index_encoder`): the head pass's own, or the
    base's from a second pass."""
    encoder = index_encoder(index, predictor)
    if encoder is None:
        return head_embeddings
    alignment = encoder.alignment(genes, gene_ids, min_overlap)
    out = np.zeros((X.shape[0], encoder.dim), dtype=np.float32)
    for s in range(0, X.shape[0], batch_size):
        z, expressed = encoder.embed(X[s:s + batch_size], alignment, input_is_log1p)
        out[np.arange(s, min(s + batch_size, X.shape[0]))[expressed]] = z
    return out


def write_knn_columns(adata, index: ReferenceIndex, knn: KnnResult, expressed: np.ndarray, key_added: str,
                      k: int, force_label: bool = False) -> None:
    """``obs[<key>_knn_label | _knn_best_guess | _knn_fraction | _knn_distance | _knn_status]`` and
    ``obsm[<key>_knn_neighbors]`` (the neighbours' cell ids, nearest first) and ``obsm[<key>_knn_distances]``."""
    n = adata.n_obs
    classes = list(index.classes)
    answers = np.full(n, None, dtype=object)
    best = np.full(n, None, dtype=object)
    answers[expressed] = knn.labels(classes, force_label)
    best[expressed] = np.asarray(classes, dtype=object)[knn.best]
    adata.obs[f"{key_added}_knn_label"] = pd.Categorical(answers, categories=list(dict.fromkeys([*classes, UNKNOWN])))
    adata.obs[f"{key_added}_knn_best_guess"] = pd.Categorical(best, categories=classes)
    for name, values in (("fraction", knn.fraction), ("distance", knn.nearest)):
        column = np.full(n, np.nan, dtype=np.float32)
        column[expressed] = values
        adata.obs[f"{key_added}_knn_{name}"] = column
    status = np.full(n, "no_expression", dtype=object)
    status[expressed] = knn.status
    adata.obs[f"{key_added}_knn_status"] = pd.Categorical(status, categories=["ok", "novel", "no_expression"])
    width = knn.neighbors.shape[1]
    ids = np.full((n, width), "", dtype=object)
    ids[expressed] = index.cell_ids[knn.neighbors]
    adata.obsm[f"{key_added}_knn_neighbors"] = pd.DataFrame(ids, index=adata.obs_names,
                                                            columns=[f"n{i}" for i in range(width)])
    dist = np.full((n, width), np.nan, dtype=np.float32)
    dist[expressed] = knn.distances
    adata.obsm[f"{key_added}_knn_distances"] = dist
    adata.uns.setdefault(key_added, {})["reference"] = {
        "path": str(index.path), "n_cells": index.n_cells, "k": int(k), "label_key": index.manifest["label_key"],
        "classes": classes, "novelty_threshold": index.novelty_threshold,
        "scimilarity_min_dist": index.manifest["novelty"]["scimilarity_min_dist"],
        "encoder_kind": index.identity["kind"],
        "status_counts": {s: int((status == s).sum()) for s in ("ok", "novel", "no_expression")},
    }
