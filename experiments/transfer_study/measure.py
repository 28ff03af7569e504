"""Collect Study 2: per run its target metrics, the two logistic-regression baselines, retention on the held-out
sorted PBMCs (kNN transfer from the sorted cells used in pretraining, base vs adapted; cosine and frozen-decoder
error on those cells) and drift on unlabelled full-transcriptome PBMCs; a table per run (runs.csv) and the mean +- sd
over seeds per base and method (summary.csv, summary.md).

    python experiments/transfer_study/measure.py outputs/multiruns/transfer_study2 --real ../shared/data/real
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
from scimilarity_lora.model.folder import DECODER_FILE, load_decoder
from scimilarity_lora.model.sparse import SparseBatch

UNLABELLED = ["kang_ifnb_unlabelled", "mudan_pbmcA_unlabelled", "pbmc_3chem_unlabelled"]
BASES = {"full": "pretrained, 28,231 genes", "demo": "pretrained, 748 genes", "random": "random, 748 genes"}


@torch.no_grad()
def drift(run: Path, real: Path, max_cells: int = 1000) -> dict[str, float]:
    """Cosine(base, adapted) and, when the base has SCimilarity's decoder, frozen-decoder MSE (adapted / base) on
    unlabelled real cells."""
    predictor = CellTypePredictor.load(run / "model")
    folder = base_folder(run, predictor.spec.base)
    base = load_recorded_base(run, predictor.spec.base).eval()
    decoder = load_decoder(folder, base.config).eval() if (folder / DECODER_FILE).is_file() else None
    cos, ratio = [], []
    for name in UNLABELLED:
        adata = read_anndata(str(real / f"{name}.h5ad"))[:max_cells]
        x = predictor.featurize(adata.X, predictor.alignment(list(adata.var_names)), output="auto")
        zb, za = base(x), predictor.classifier.embed(x)
        cos.append(float(torch.nn.functional.cosine_similarity(zb, za).mean()))
        if decoder is not None:
            dense = x.to_dense() if isinstance(x, SparseBatch) else x
            ratio.append(float(((decoder(za) - dense) ** 2).mean() / ((decoder(zb) - dense) ** 2).mean()))
    return {"unlabelled_cosine": round(float(np.mean(cos)), 4),
            "unlabelled_decoder_mse_ratio": round(float(np.mean(ratio)), 4) if ratio else np.nan}


def method_of(finetune: dict) -> str:
    if finetune["mode"] == "lora":
        targets = finetune.get("target_preset") or finetune.get("target_modules")
        targets = targets if isinstance(targets, str) else "+".join(targets)
        return f"LoRA r={finetune['r']} ({targets})"
    return {"frozen": "frozen base + linear probe", "full": "full fine-tuning"}[finetune["mode"]]


def collect(sweep: Path, real: Path) -> pd.DataFrame:
    rows = []
    for run in sorted(sweep.glob("*/*/[0-9]*")):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
        metrics = json.loads((run / "metrics.json").read_text())
        report = json.loads((run / "evaluation" / "report.json").read_text())
        ref = report["forgetting"]["reference"]
        mse = ref.get("reconstruction_mse")
        finetune = {**metrics["finetune"], "target_preset": overrides.get("lora.target_modules", "all")}
        rows.append({"base": BASES[run.parts[-3]], "method": method_of(finetune), "seed": int(overrides["seed"]),
                     "trainable_params": metrics["trainable_params"],
                     "test_accuracy": report["model"]["accuracy"], "test_macro_f1": report["model"]["macro_f1"],
                     "frozen_emb_lr_macro_f1": report["baselines"]["frozen_embedding_lr"]["macro_f1"],
                     "genes_lr_macro_f1": report["baselines"]["genes_lr"]["macro_f1"],
                     "heldout_knn_acc_base": ref["base"]["knn_accuracy"],
                     "heldout_knn_f1_base": ref["base"]["knn_macro_f1"],
                     "heldout_knn_acc": ref["adapted"]["knn_accuracy"], "heldout_knn_f1": ref["adapted"]["knn_macro_f1"],
                     "heldout_retained_acc": ref["retained_accuracy"], "heldout_retained_f1": ref["retained_macro_f1"],
                     "heldout_cosine": ref["mean_cosine"],
                     "heldout_decoder_mse_ratio": round(mse["adapted"] / mse["base"], 4) if mse else np.nan,
                     **drift(run, real)})
    return pd.DataFrame(rows).sort_values(["base", "method", "seed"])


def summarise(df: pd.DataFrame, out: Path) -> str:
    grouped = df.drop(columns=["seed"]).groupby(["base", "method"], sort=False)
    summary = grouped.mean(numeric_only=True).round(4).add_suffix(" mean").join(
        grouped.std(numeric_only=True).round(4).add_suffix(" sd"))
    summary.to_csv(out / "summary.csv")
    cols = ["test_accuracy", "test_macro_f1", "heldout_knn_acc", "heldout_knn_f1", "heldout_cosine",
            "heldout_decoder_mse_ratio", "unlabelled_cosine"]
    lines = ["| base | method | trainable params | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for (base, method), row in summary.iterrows():
        cells = ["n/a" if np.isnan(row[c + " mean"]) else f"{row[c + ' mean']:.3f} +- {row[c + ' sd']:.3f}"
                 for c in cols]
        lines.append(f"| {base} | {method} | {int(row['trainable_params mean']):,} | " + " | ".join(cells) + " |")
    lines += ["", "| base | held-out kNN accuracy of the base | kNN macro-F1 of the base | frozen embeddings + LR "
                  "macro-F1 | genes + LR macro-F1 |", "|---|---|---|---|---|"]
    for base, g in df.groupby("base", sort=False):
        lines.append(f"| {base} | {g['heldout_knn_acc_base'].mean():.3f} | {g['heldout_knn_f1_base'].mean():.3f} | "
                     f"{g['frozen_emb_lr_macro_f1'].mean():.3f} +- {g.groupby('seed')['frozen_emb_lr_macro_f1'].first().std():.3f} | "
                     f"{g['genes_lr_macro_f1'].mean():.3f} +- {g.groupby('seed')['genes_lr_macro_f1'].first().std():.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweep", type=Path)
    p.add_argument("--real", type=Path, default=Path("../shared/data/real"))
    p.add_argument("--out", type=Path, default=Path("experiments/transfer_study"))
    args = p.parse_args()
    df = collect(args.sweep, args.real)
    df.to_csv(args.out / "runs.csv", index=False)
    print(summarise(df, args.out))


if __name__ == "__main__":
    main()
