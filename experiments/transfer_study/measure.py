"""Collect Study 2 (part 1): per run its target metrics, baselines, forgetting on the sorted reference cells, and the
embedding drift and frozen-decoder reconstruction error on the unlabelled full-transcriptome PBMCs; a table per run
and the mean +- sd over seeds per method.

    python experiments/transfer_study/measure.py outputs/multiruns/transfer_study --real ../shared/data/real
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from scimilarity_lora.data.io import read_anndata
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.runs import base_folder, load_recorded_base
from scimilarity_lora.model.folder import load_decoder
from scimilarity_lora.model.sparse import SparseBatch

UNLABELLED = ["kang_ifnb_unlabelled", "mudan_pbmcA_unlabelled", "pbmc_3chem_unlabelled"]


@torch.no_grad()
def drift(run: Path, real: Path, max_cells: int = 1000) -> dict[str, float]:
    """Cosine(base, adapted) and frozen-decoder MSE (adapted / base) on unlabelled real cells."""
    predictor = CellTypePredictor.load(run / "model")
    folder = base_folder(run, predictor.spec.base)
    base = load_recorded_base(run, predictor.spec.base)
    decoder = load_decoder(folder, base.config).eval()
    base.eval()
    cos, ratio = [], []
    for name in UNLABELLED:
        adata = read_anndata(str(real / f"{name}.h5ad"))[:max_cells]
        x = predictor.featurize(adata.X, predictor.alignment(list(adata.var_names)), output="auto")
        zb, za = base(x), predictor.classifier.embed(x)
        dense = x.to_dense() if isinstance(x, SparseBatch) else x
        cos.append(float(torch.nn.functional.cosine_similarity(zb, za).mean()))
        ratio.append(float(((decoder(za) - dense) ** 2).mean() / ((decoder(zb) - dense) ** 2).mean()))
    return {"unlabelled_cosine": round(float(np.mean(cos)), 4), "unlabelled_decoder_mse_ratio": round(float(np.mean(ratio)), 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweep")
    p.add_argument("--real", default="../shared/data/real")
    p.add_argument("--out", default="experiments/transfer_study")
    args = p.parse_args()
    rows = []
    for run in sorted(Path(args.sweep).glob("*/[0-9]*")):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
        metrics = json.loads((run / "metrics.json").read_text())
        report = json.loads((run / "evaluation" / "report.json").read_text())
        ref = report["forgetting"]["reference"]
        mode = metrics["finetune"]["mode"]
        method = f"lora r=8 ({metrics['finetune']['unseen_genes']})" if mode == "lora" else mode
        rows.append({"method": method, "seed": int(overrides["seed"]),
                     "test_accuracy": report["model"]["accuracy"], "test_macro_f1": report["model"]["macro_f1"],
                     "frozen_emb_lr_macro_f1": report["baselines"]["frozen_embedding_lr"]["macro_f1"],
                     "genes_lr_macro_f1": report["baselines"]["genes_lr"]["macro_f1"],
                     "ref_knn_acc_base": ref["base"]["knn_accuracy"], "ref_knn_acc_adapted": ref["adapted"]["knn_accuracy"],
                     "ref_retained_acc": ref["retained_accuracy"], "ref_cosine": ref["mean_cosine"],
                     "ref_decoder_mse_ratio": round(ref["reconstruction_mse"]["adapted"] / ref["reconstruction_mse"]["base"], 4),
                     "trainable_params": metrics["trainable_params"], **drift(run, Path(args.real))})
    df = pd.DataFrame(rows).sort_values(["method", "seed"])
    df.to_csv(Path(args.out) / "runs.csv", index=False)
    numeric = df.drop(columns=["seed"]).groupby("method")
    summary = numeric.mean(numeric_only=True).round(4).add_suffix(" mean").join(
        numeric.std(numeric_only=True).round(4).add_suffix(" sd"))
    summary.to_csv(Path(args.out) / "summary.csv")
    cols = ["test_accuracy", "test_macro_f1", "ref_retained_acc", "ref_cosine", "ref_decoder_mse_ratio",
            "unlabelled_cosine", "unlabelled_decoder_mse_ratio"]
    lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for method, row in summary.iterrows():
        lines.append(f"| {method} | " + " | ".join(f"{row[c + ' mean']:.3f} +- {row[c + ' sd']:.3f}" for c in cols) + " |")
    base_row = df.iloc[0]
    lines += ["", f"Baselines on the same split (seed means): frozen embeddings + LR macro-F1 "
                  f"{df['frozen_emb_lr_macro_f1'].mean():.3f}, genes + LR macro-F1 {df['genes_lr_macro_f1'].mean():.3f}; "
                  f"reference kNN accuracy of the base itself {base_row['ref_knn_acc_base']:.3f}."]
    (Path(args.out) / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
