"""Ship a pretrained run's encoder inside the package: ``src/scimilarity_lora/resources/bases/<name>/`` with
``encoder.safetensors``, ``gene_order.tsv``, ``layer_sizes.json`` and ``provenance.json`` (the command, the input
files' sha256, the losses, the wall time and the retention figure), loadable as ``model.pretrained_dir=packaged:<name>``.

    python experiments/pretrained_base/package_base.py outputs/pretrained_base_demo pbmc_demo \
        --retention experiments/pretrained_base/demo_results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from scimilarity_lora.model.folder import load_model_folder, save_model_folder, state_dict_hash

BASES = Path(__file__).resolve().parents[2] / "src" / "scimilarity_lora" / "resources" / "bases"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("name")
    p.add_argument("--retention", type=Path, required=True, help="measure.py's JSON for this run")
    args = p.parse_args()
    encoder, genes = load_model_folder(args.run / "model")
    out = save_model_folder(encoder, genes, BASES / args.name, safetensors=True)
    metrics = json.loads((args.run / "metrics.json").read_text())
    overrides = yaml.safe_load((args.run / ".hydra" / "overrides.yaml").read_text())
    retention = json.loads(args.retention.read_text())
    provenance = {
        "what": "SCimilarity's encoder architecture (hidden [1024, 1024, 1024], latent 128) over the 748 genes of "
                "SCimilarity's order that scanpy's pbmc68k_reduced measures, pretrained here with this project's "
                "pretrain.py (SCimilarity's objective) on four real PBMC datasets. NOT SCimilarity's released weights.",
        "command": "python pretrain.py " + " ".join(o for o in overrides if "progress_bar" not in o),
        "gene_order_command": "python experiments/pretrained_base/demo_gene_order.py "
                              "experiments/pretrained_base/demo_gene_order.tsv",
        "weights_sha256": state_dict_hash(encoder.state_dict()),
        "inputs": [{k: f[k] for k in ("path", "sha256", "n_cells", "n_overlap")} for f in metrics["inputs"]],
        "inputs_provenance": "../shared/data/real/README.md (not part of the package)",
        "n_cells": metrics["n_cells"],
        "epochs": metrics["epochs_trained"],
        "train_seconds": metrics["train_seconds"],
        "losses": [{k: round(v, 5) for k, v in r.items() if k in ("epoch", "train/loss", "train/mse",
                                                                   "train/triplet", "val/loss")}
                   for r in metrics["history"]],
        "retention": retention["retention"],
        "retention_definition": "kNN (k=15, cosine) label transfer from the sorted cells used in pretraining to the "
                                "20% held out (never pretrained on), both embedded by the base",
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"{out}: {sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
