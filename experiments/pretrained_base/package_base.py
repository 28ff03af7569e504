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
#: where each input file comes from (the package must say so itself: users do not have the folder the files sat in)
ORIGINS = {
    "mudan_sorted_pbmc": ("JEFworks/MUDAN @3636ed2f, data/referenceCounts.rda + referenceAnnot.rda",
                          "Zheng et al. 2017, Nat Commun 8:14049: 9 FACS-sorted PBMC populations (10x)"),
    "mudan_pbmcA_unlabelled": ("JEFworks/MUDAN @3636ed2f, data/pbmcA.rda",
                               "Zheng et al. 2017: frozen PBMCs of donor A (pbmc68k_reduced: fresh PBMCs, same donor)"),
    "pbmc_3chem_unlabelled": ("baj12/scWGParis @4a3ea760, data/1k_PBMC_v2_filt.rds, 1k_PBMC_v3_filt.rds, "
                              "5prime_PBMC_filt_1kcells.rds", "10x Genomics public PBMC 1k datasets (3' v2, 3' v3, 5')"),
    "kang_ifnb_unlabelled": ("immunogenomics/harmony @df19af23, data/pbmc_stim.RData",
                             "Kang et al. 2018, Nat Biotechnol 36:89: control and IFN-beta stimulated PBMCs"),
}


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
        "inputs": [_input(f) for f in metrics["inputs"]],
        "inputs_note": "raw UMI counts converted to .h5ad from the repositories named (R objects -> AnnData, values "
                       "unchanged); pretrain.py reads them from the folder data=pretrain_real_pbmc names "
                       "(SCIMILARITY_REAL_DATA)",
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


def _input(f: dict) -> dict:
    name = Path(f["path"]).stem
    origin, study = ORIGINS[name]
    return {"file": f"{name}.h5ad", "sha256": f["sha256"], "n_cells": f["n_cells"], "genes_present": f["n_overlap"],
            "origin": origin, "study": study}


if __name__ == "__main__":
    main()
