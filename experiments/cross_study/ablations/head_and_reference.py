"""Ablation (#22): combining the head with the reference index, and nearest class centroids in the embedding.

    python experiments/cross_study/ablations/head_and_reference.py [--work-method lora_panel_augment]

The issue lists "combining head and kNN" among the causes to test. Reusing Study 3's runs and their reference
indexes (every reference cell embedded by the run's own adapter; no training), each cell is scored six ways
through ``evaluate_query``, the path of every Study 3 row (label matching, metrics; head only, no voting):
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study3_runs import arguments, rescore, runs, with_probs, write  # noqa: E402
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
    """Each way's accuracy and macro-F1 on the query, through ``evaluate_query``."""
    if list(index.classes) != list(predictor.classes):
        raise SystemExit(f"index classes {index.classes} differ from the model's {predictor.classes}")
    n, codes = len(index.classes), index.label_codes
    ref_bn, expressed = embed(adabn(predictor, reference), reference)
    if expressed.sum() != index.n_cells:
        raise SystemExit(f"{reference['path']}: {expressed.sum()} expressed cells, the index holds {index.n_cells}")
    query_bn = adabn(predictor, query)
    ways = {
        "head": predictor,
        "knn": with_probs(predictor, lambda z, _: index.annotate(z, 15).shares),
        "head+knn": with_probs(predictor, lambda z, p: (p + index.annotate(z, 15).shares) / 2),
        "centroid": with_probs(predictor, lambda z, _: centroid_probs(index.embeddings, codes, n, z)),
        "knn_per_study_bn": with_probs(query_bn, lambda z, _: knn_shares(ref_bn, codes, n, z)),
        "centroid_per_study_bn": with_probs(query_bn, lambda z, _: centroid_probs(ref_bn, codes, n, z)),
    }
    return {name: rescore(variant, query) for name, variant in ways.items()}


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
