"""Score each leave-one-class-out run: novelty AUROC for the held-out class against the in-domain test cells, the
share of held-out cells answered "unknown", and in-domain coverage and accuracy at the fitted thresholds.

    python experiments/unknown_cells/measure.py outputs/unknown_cells --out experiments/unknown_cells
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import roc_auc_score

from scimilarity_lora.inference.calibration import novelty_scores
from scimilarity_lora.inference.predictor import CellTypePredictor


def score(run: Path, adata) -> dict:
    cfg = json.loads((run / "model" / "model_config.json").read_text())["training_config"]
    held_out = cfg["data"]["exclude_classes"][0]
    predictor = CellTypePredictor.load(run / "model")
    splits = pd.read_csv(run / "splits.csv")
    test_ids = splits.loc[splits["split"] == "test", "cell_id"].astype(str)
    labels = adata.obs["bulk_labels"].astype(str)
    groups = {"held_out": adata[labels == held_out], "test": adata[test_ids.to_numpy()]}
    out = {}
    for name, sub in groups.items():
        res = predictor.predict_cells(sub.raw.X, list(sub.raw.var_names), input_is_log1p=True)
        out[name] = {"status": res.status, "novelty": novelty_scores(res.embeddings, predictor.calibration.centroids),
                     "confidence": res.probs.max(1), "correct": np.asarray(predictor.classes)[res.probs.argmax(1)]
                     == sub.obs["bulk_labels"].astype(str).to_numpy()}
    h, t = out["held_out"], out["test"]
    y = np.r_[np.ones(len(h["novelty"])), np.zeros(len(t["novelty"]))]
    kept = t["status"] == "ok"
    return {"held_out_class": held_out, "n_held_out": int(len(h["novelty"])), "n_test": int(len(t["novelty"])),
            "auroc_novelty": round(roc_auc_score(y, np.r_[h["novelty"], t["novelty"]]), 3),
            "auroc_1_minus_confidence": round(roc_auc_score(y, np.r_[-h["confidence"], -t["confidence"]]), 3),
            "held_out_unknown": round(float(np.mean(h["status"] != "ok")), 3),
            "held_out_novel": round(float(np.mean(h["status"] == "novel")), 3),
            "test_coverage": round(float(kept.mean()), 3),
            "test_accuracy_covered": round(float(t["correct"][kept].mean()) if kept.any() else float("nan"), 3),
            "test_accuracy_all": round(float(t["correct"].mean()), 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs")
    p.add_argument("--out", default="experiments/unknown_cells")
    args = p.parse_args()
    adata = sc.datasets.pbmc68k_reduced()
    rows = [score(run, adata) for run in sorted(Path(args.runs).iterdir(), key=lambda r: r.name) if run.is_dir()]
    df = pd.DataFrame(rows)
    means = df.drop(columns=["held_out_class"]).mean(numeric_only=True).round(3).to_dict()
    (Path(args.out) / "results.json").write_text(json.dumps({"runs": rows, "mean": means}, indent=2) + "\n")
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    lines.append("| **mean** | " + " | ".join(str(means.get(c, "")) for c in cols[1:]) + " |")
    (Path(args.out) / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
