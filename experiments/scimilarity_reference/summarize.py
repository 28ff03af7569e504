"""Retention (kNN accuracy and macro-F1 on the held-out sorted PBMCs) per variant, mean +- sd over seeds, from the
``retention.json`` that measure.py wrote in each run directory of run.sh.

    python experiments/scimilarity_reference/summarize.py outputs/scimilarity_side_by_side \
        --out experiments/scimilarity_reference/results.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    variants: dict[str, list[dict]] = {}
    for f in sorted(args.root.glob("*/retention.json")):
        variant = re.sub(r"_seed\d+$", "", f.parent.name)
        r = json.loads(f.read_text())["retention"]
        variants.setdefault(variant, []).append({"run": f.parent.name, **r["pretrained"]})
    summary = {}
    for variant, rows in variants.items():
        acc, f1 = np.array([r["knn_accuracy"] for r in rows]), np.array([r["knn_macro_f1"] for r in rows])
        summary[variant] = {"n_seeds": len(rows), "knn_accuracy_mean": round(float(acc.mean()), 4),
                            "knn_accuracy_sd": round(float(acc.std(ddof=1)), 4) if len(rows) > 1 else None,
                            "knn_macro_f1_mean": round(float(f1.mean()), 4), "runs": rows}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for variant, s in summary.items():
        print(f"{variant:24s} n={s['n_seeds']} kNN accuracy {s['knn_accuracy_mean']:.3f} +- {s['knn_accuracy_sd']} "
              f"macro-F1 {s['knn_macro_f1_mean']:.3f}")


if __name__ == "__main__":
    main()
