"""Ablation (#22): adapting the trained model to the query's own cells at prediction time, without labels.

    python experiments/cross_study/ablations/test_time_adaptation.py [--work-method lora_panel_augment]

Two classic label-free adaptations, each scored beside the unchanged head on the same cells through
``evaluate_query`` (the same label matching and metrics as every row of Study 3; head only, no voting):
- ``adabn``: the encoder's BatchNorm statistics re-estimated on the query's cells (AdaBN, Li et al. 2016), layer by
  layer in one pass (each layer sees the layers before it already adapted; a cumulative average over batches);
- ``em_prior``: the query's class proportions re-estimated by EM on the head's probabilities and the
  probabilities re-weighted by them (Saerens et al. 2002); the head's own prior is taken as uniform, since it was
  trained with inverse-frequency class weights.
Reuses Study 3's runs (no training): ``outputs/cross_study/study3/work/<task>/<work-method>/seed*/run``; the
default's runs kept the name of their run time, ``lora_panel_augment`` (the README says so). Writes
``test_time_adaptation.json`` beside this file (``test_time_adaptation_<work-method>.json`` for another method).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study3_runs import arguments, rescore, runs, with_probs, write  # noqa: E402


def adabn(predictor, query: dict):
    """A copy of ``predictor`` whose BatchNorm running statistics are the query cells' (eval mode otherwise)."""
    from dataclasses import replace

    from scimilarity_lora.data.io import expression_matrix, gene_names, read_anndata

    adata = read_anndata(query["path"])
    X, var_names, var = expression_matrix(adata, query["layer"])
    alignment = predictor.alignment(gene_names(var_names, var, None), None, 1)
    prep = replace(predictor.preprocessing, input_is_log1p=query["log1p"])
    adapted = copy.copy(predictor)
    adapted.classifier = copy.deepcopy(predictor.classifier).eval()
    for norm in (m for m in adapted.classifier.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for s in range(0, X.shape[0], 1024):
            aligned = alignment.apply(X[s:s + 1024])
            aligned = aligned[prep.nonempty_rows(aligned)]
            if aligned.shape[0] > 1:
                adapted.classifier.encoder(prep(aligned))
    adapted.classifier.eval()
    return adapted


def em_prior(probs: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Probabilities re-weighted by the query's class proportions, estimated by EM from a uniform prior."""
    uniform = np.full(probs.shape[1], 1.0 / probs.shape[1])
    prior, q = uniform.copy(), probs
    for _ in range(iterations):
        q = probs * (prior / uniform)
        q = q / q.sum(axis=1, keepdims=True)
        if np.abs(q.mean(axis=0) - prior).max() < 1e-7:
            break
        prior = q.mean(axis=0)
    return q


def with_em_prior(predictor):
    return with_probs(predictor, lambda _, p: em_prior(p.astype(np.float64)))


def main() -> None:
    from scimilarity_lora.inference.predictor import CellTypePredictor

    a = arguments(__doc__)
    rows = []
    for task, seed, work, _, query in runs(a):
        predictor = CellTypePredictor.load(work / "run" / "model")
        row = {"task": task, "seed": seed, "work_method": a.work_method,
               **{name: rescore(variant, query) for name, variant in (
                   ("head", predictor), ("adabn", adabn(predictor, query)), ("em_prior", with_em_prior(predictor)))}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps(write("test_time_adaptation", a, rows, ("head", "adabn", "em_prior")), indent=1))


if __name__ == "__main__":
    main()
