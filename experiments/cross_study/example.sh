#!/usr/bin/env bash
# Labels between studies (#21): train on the FACS-sorted PBMCs, score the run on two other studies' labels through
# the Cell Ontology. Needs the real-data folder beside the repository (REAL=../shared/data/real by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
REAL=${REAL:-../shared/data/real}
MAPS=experiments/cross_study/label_maps
RUN=${RUN:-outputs/cross_study/sorted}
python train.py data=h5ad data.path=$REAL/mudan_sorted_pbmc.h5ad data.label_key=cell_type \
    data.label_to_ontology=$MAPS/mudan_sorted_pbmc.csv hydra.run.dir=$RUN trainer.enable_progress_bar=false
python evaluate.py run_dir=$RUN query.path=$REAL/pbmc3k_seurat.h5ad query.label_key=cell_type \
    query.label_map=$MAPS/pbmc3k_seurat.csv
python evaluate.py run_dir=$RUN query.path=pbmc68k_reduced query.label_key=bulk_labels query.layer=raw \
    query.input_is_log1p=true query.label_map=packaged:pbmc68k_bulk_labels
python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = {q.name: json.loads((q / "report.json").read_text()) for q in sorted((run / "evaluation" / "query").iterdir())}
keep = ("accuracy", "macro_f1", "balanced_accuracy", "ontology_aware_accuracy", "rejection_rate", "n_cells_scored")
out = {name: {**{k: r[k] for k in keep}, "with_unknown": r["with_unknown"]["head"],
              "with_coarse": {k: r["with_unknown"]["coarse"][k] for k in ("coverage", "accuracy", "fraction_coarse")},
              "majority_voting": {k: r["majority_voting"][k] for k in ("accuracy", "macro_f1", "n_clusters")},
              "majority_voting_expression": {k: r["majority_voting_expression"][k]
                                             for k in ("accuracy", "macro_f1", "n_clusters")},
              "labels": {k: v["kind"] for k, v in r["labels"].items()}} for name, r in rows.items()}
out["train_metrics"] = {k: json.loads((run / "metrics.json").read_text())[k] for k in ("test/accuracy", "test/macro_f1")}
Path("experiments/cross_study/example_results.json").write_text(json.dumps(
    {"command": "bash experiments/cross_study/example.sh", **out}, indent=2))
print(json.dumps(out, indent=1))
PY
