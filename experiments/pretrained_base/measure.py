"""Retention figure of a pretrained base: kNN (k=15, cosine) label transfer from the sorted PBMCs used in pretraining
(reference) to the held-out sorted cells (query, never pretrained on), both embedded by the base; the same for a
random base of the same architecture as the control.

    python experiments/pretrained_base/measure.py outputs/pretrained_base_real --real ../shared/data/real
    python experiments/pretrained_base/measure.py outputs/pretrained_base_demo --out experiments/pretrained_base/demo_results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scimilarity_lora.data.io import read_anndata
from scimilarity_lora.evaluation.metrics import classification_report, knn_transfer
from scimilarity_lora.genes import align_genes, symbol_aliases
from scimilarity_lora.labels import LabelEncoder
from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.folder import load_model_folder
from scimilarity_lora.preprocess import Preprocessing


@torch.no_grad()
def embed(encoder: Encoder, genes: list[str], adata) -> np.ndarray:
    alignment = align_genes(list(adata.var_names), genes, aliases=symbol_aliases())
    x = Preprocessing()(alignment.apply(adata.X), output="auto")
    return encoder.eval()(x).numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--real", default="../shared/data/real")
    p.add_argument("--out", default="experiments/pretrained_base/results.json")
    args = p.parse_args()
    run = Path(args.run)
    sorted_cells = read_anndata(str(Path(args.real) / "mudan_sorted_pbmc.h5ad"))
    holdout = set(pd.read_csv(run / "holdout.csv")["cell_id"].astype(str))
    is_query = sorted_cells.obs_names.isin(holdout)
    labels = LabelEncoder.fit(sorted_cells.obs["cell_type"].astype(str))
    y = labels.encode(sorted_cells.obs["cell_type"].astype(str))
    pretrained, genes = load_model_folder(run / "model")
    torch.manual_seed(0)
    random = Encoder.from_config(pretrained.config)
    rows = {}
    for name, encoder in (("pretrained", pretrained), ("random (same architecture)", random)):
        z = embed(encoder, genes, sorted_cells)
        pred = knn_transfer(z[~is_query], y[~is_query], z[is_query])
        r = classification_report(y[is_query], pred, labels.classes)
        rows[name] = {"knn_accuracy": round(r["accuracy"], 4), "knn_macro_f1": round(r["macro_f1"], 4)}
    result = {"run": str(run), "n_reference": int((~is_query).sum()), "n_query": int(is_query.sum()), "k": 15,
              "retention": rows}
    if (run / "metrics.json").is_file():  # our pretraining's record (SCimilarity's own runs have none)
        metrics = json.loads((run / "metrics.json").read_text())
        result["pretraining"] = {
            "epochs": metrics["epochs_trained"], "train_seconds": metrics["train_seconds"],
            "losses": [{k: round(v, 5) for k, v in r.items() if k.startswith(("train/loss", "val/loss",
                                                                             "train/triplet", "train/mse"))}
                       for r in metrics["history"]],
            "inputs": metrics["inputs"], "n_cells": metrics["n_cells"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["retention"], indent=2))


if __name__ == "__main__":
    main()
