"""Measure each run of the unseen-genes sweep: first-layer drift on genes absent from the fine-tuning data, and the
embedding drift (base vs adapted) of real cells that do express them. Writes results.{json,md} to --out.

    python experiments/unseen_genes/measure.py outputs/multiruns/unseen_genes --real ../shared/data/real
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from scimilarity_lora.data.io import read_anndata
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.evaluation.evaluate import base_encoder

REAL_SETS = ["kang_ifnb_unlabelled", "pbmc_3chem_unlabelled", "mudan_pbmcA_unlabelled", "mudan_sorted_pbmc"]


@torch.no_grad()
def embedding_drift(run: Path, real: Path, max_cells: int = 2000) -> dict[str, float]:
    """Mean cosine similarity of base vs adapted embeddings of real cells (raw counts, all their genes)."""
    predictor = CellTypePredictor.load(run / "model")
    base = base_encoder(run, predictor.spec).eval()
    out = {}
    for name in REAL_SETS:
        path = real / f"{name}.h5ad"
        if not path.is_file():
            continue
        adata = read_anndata(str(path))[:max_cells]
        alignment = predictor.alignment(list(adata.var_names))
        x = predictor.featurize(adata.X, alignment, output="auto")
        z_adapted = predictor.classifier.embed(x)
        z_base = base(x)
        out[name] = round(float(torch.nn.functional.cosine_similarity(z_base, z_adapted).mean()), 4)
    return out


def weight_drift(run: Path) -> dict[str, float]:
    predictor = CellTypePredictor.load(run / "model")  # the adapter merged into the recorded base
    w0 = base_encoder(run, predictor.spec).network[0][1].weight.detach()
    w1 = predictor.classifier.encoder.network[0][1].weight.detach()
    seen = load_file(run / "model" / "adapter" / "seen_genes.safetensors")["seen_genes"].bool()
    d = w1 - w0
    return {"n_seen_genes": int(seen.sum()),
            "unseen_rel_drift_pct": round(100 * float(d[:, ~seen].norm() / w0[:, ~seen].norm()), 3),
            "seen_rel_drift_pct": round(100 * float(d[:, seen].norm() / w0[:, seen].norm()), 3),
            "unseen_share_of_update_pct": round(100 * float(d[:, ~seen].norm() ** 2 / d.norm() ** 2), 3),
            "unseen_max_abs_change": float(d[:, ~seen].abs().max())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweep")
    p.add_argument("--real", default="../shared/data/real")
    p.add_argument("--out", default="experiments/unseen_genes")
    args = p.parse_args()
    rows = []
    for run in sorted(Path(args.sweep).glob("[0-9]*")):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
        metrics = json.loads((run / "metrics.json").read_text())
        row = {"policy": overrides["lora.unseen_genes"], "seed": int(overrides["seed"]),
               "test_accuracy": round(metrics["test/accuracy"], 4), "test_macro_f1": round(metrics["test/macro_f1"], 4),
               **weight_drift(run)}
        real = Path(args.real)
        row["cosine_base_vs_adapted"] = embedding_drift(run, real) if real.is_dir() else {}
        rows.append(row)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    sets = sorted({k for r in rows for k in r["cosine_base_vs_adapted"]})
    lines = ["| policy | seed | test acc | test macro-F1 | unseen-gene drift (% of norm) | seen-gene drift (%) | "
             "unseen share of update (%) | " + " | ".join(f"cosine {s}" for s in sets) + " |",
             "|" + "---|" * (7 + len(sets))]
    for r in sorted(rows, key=lambda r: (r["policy"], r["seed"])):
        lines.append(f"| {r['policy']} | {r['seed']} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | "
                     f"{r['unseen_rel_drift_pct']:.3f} | {r['seen_rel_drift_pct']:.2f} | "
                     f"{r['unseen_share_of_update_pct']:.2f} | "
                     + " | ".join(f"{r['cosine_base_vs_adapted'].get(s, float('nan')):.4f}" for s in sets) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
