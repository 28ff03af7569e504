"""Ablation (#22): combining the head with the reference index, and nearest class centroids in the embedding.

    python experiments/cross_study/ablations/head_and_reference.py [--work-method lora_panel_augment]

The issue lists "combining head and kNN" among the causes to test. Reusing Study 3's runs and their reference
indexes (every reference cell embedded by the run's own adapter; no training), each cell is scored six ways
through the same ``score`` path as every Study 3 row (label matching, metrics; head only, no voting):
- ``head``: the classifier's probabilities (the default);
- ``knn``: the index's distance-weighted vote of 15 neighbours (SCimilarity's way);
- ``head+knn``: the mean of the two distributions;
- ``centroid``: the class whose mean reference embedding is nearest in cosine (a pseudo-bulk profile per label,
  SingleR's idea, in the adapted embedding instead of marker genes; nothing fitted beyond the adapter);
- ``knn_per_study_bn``, ``centroid_per_study_bn``: the same two with each study embedded under its own BatchNorm
  statistics (the reference's cells under the reference's, the query's under the query's: AdaBN done on both sides,
  so the within-study query sees nearly the reference's statistics; ``test_time_adaptation.py`` changed only the
  query's, under a head trained on the stand-in's).
Writes ``head_and_reference.json`` beside this file (``_study3_runs.py``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study3_runs import arguments, runs, write  # noqa: E402
from test_time_adaptation import adabn  # noqa: E402

WAYS = ("head", "knn", "head+knn", "centroid", "knn_per_study_bn", "centroid_per_study_bn")


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroid_probs(emb: np.ndarray, codes: np.ndarray, n_classes: int, z: np.ndarray) -> np.ndarray:
    """One-hot of the nearest class centroid (cosine) of the reference embeddings ``emb`` (labels ``codes``)."""
    emb = unit(emb)
    centroids = unit(np.stack([emb[codes == c].mean(axis=0) for c in range(n_classes)]))
    out = np.zeros((len(z), n_classes), dtype=np.float32)
    out[np.arange(len(z)), (unit(z) @ centroids.T).argmax(axis=1)] = 1.0
    return out


def knn_shares(emb: np.ndarray, codes: np.ndarray, n_classes: int, z: np.ndarray, k: int = 15) -> np.ndarray:
    """The index's distance-weighted vote, by exact cosine search over ``emb``."""
    from scimilarity_lora.inference.reference.index import exact_search, knn_vote

    pos, dist = exact_search(unit(emb).astype(np.float32), unit(z).astype(np.float32), k)
    return knn_vote(codes[pos], dist, n_classes)


def embed(predictor, dataset: dict) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings of the expressed cells, their mask) of a dataset's file."""
    from scimilarity_lora.data.io import expression_matrix, gene_names, read_anndata

    adata = read_anndata(dataset["path"])
    X, var_names, var = expression_matrix(adata, dataset["layer"])
    r = predictor.predict_cells(X, gene_names(var_names, var, None), input_is_log1p=dataset["log1p"], progress=False)
    return r.embeddings[r.expressed], r.expressed


def scores(predictor, index, reference: dict, query: dict) -> dict:
    from scimilarity_lora.data.io import expression_matrix, gene_names, read_anndata
    from scimilarity_lora.data.ontology import read_label_map
    from scimilarity_lora.evaluation.query import MAP_COLUMNS, match_labels, read_query_labels, score

    adata = read_anndata(query["path"])
    labels, terms = read_query_labels(adata, query["label"], None)
    X, var_names, var = expression_matrix(adata, query["layer"])
    result = predictor.predict_cells(X, gene_names(var_names, var, None), input_is_log1p=query["log1p"],
                                     progress=False)
    e = result.expressed
    has = np.array([x is not None for x in labels]) & e
    matches = match_labels(Counter(labels[has]), predictor.classes, predictor.class_terms,
                           read_label_map(query["map"], columns=MAP_COLUMNS), terms)
    if list(index.classes) != list(predictor.classes):
        raise SystemExit(f"index classes {index.classes} differ from the model's {predictor.classes}")
    z = result.embeddings[e]
    knn = index.annotate(z, 15).shares
    n = len(index.classes)
    ways = {"head": result.probs[e], "knn": knn, "head+knn": (result.probs[e] + knn) / 2,
            "centroid": centroid_probs(index.embeddings, index.label_codes, n, z)}
    ref_emb, ref_expressed = embed(adabn(predictor, reference), reference)
    if ref_expressed.sum() != index.n_cells:
        raise SystemExit(f"{reference['path']}: {ref_expressed.sum()} expressed cells, the index holds {index.n_cells}")
    query_emb, query_expressed = embed(adabn(predictor, query), query)
    assert (query_expressed == e).all()
    ways["knn_per_study_bn"] = knn_shares(ref_emb, index.label_codes, n, query_emb)
    ways["centroid_per_study_bn"] = centroid_probs(ref_emb, index.label_codes, n, query_emb)
    out = {}
    for name, p in ways.items():
        probs = result.probs.copy()
        probs[e] = p
        r = score(predictor, labels, replace(result, probs=probs), matches, majority_voting=False)
        out[name] = {"accuracy": round(r["accuracy"], 4), "macro_f1": round(r["macro_f1"], 4)}
    return out


def main() -> None:
    from scimilarity_lora.inference.predictor import CellTypePredictor
    from scimilarity_lora.inference.reference.query import open_reference

    a = arguments(__doc__)
    rows = []
    for task, seed, work, reference, query in runs(a):
        if not (work / "index").is_dir():
            continue
        row = {"task": task, "seed": seed, "work_method": a.work_method,
               **scores(CellTypePredictor.load(work / "run" / "model"), open_reference(work / "index"), reference,
                        query)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps(write("head_and_reference", a, rows, WAYS), indent=1))


if __name__ == "__main__":
    main()
