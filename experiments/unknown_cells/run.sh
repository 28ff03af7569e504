#!/usr/bin/env bash
# Leave-one-class-out on the bundled PBMCs: train without one class, then ask whether the model answers "unknown"
# for that class's cells while still labelling the in-domain test cells. Run from the repository root (venv active).
set -euo pipefail
OUT=outputs/unknown_cells
rm -rf "$OUT"
python - <<'PY' > /tmp/loco_classes.txt
import scanpy as sc
for c in sorted(sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).unique()):
    print(c)
PY
i=0
while IFS= read -r cls; do
  python train.py "data.exclude_classes=[\"$cls\"]" hydra.run.dir="$OUT/$i" trainer.enable_progress_bar=false "$@" \
    > "$OUT.$i.log" 2>&1 || { cat "$OUT.$i.log"; exit 1; }
  i=$((i + 1))
done < /tmp/loco_classes.txt
python experiments/unknown_cells/measure.py "$OUT" --out experiments/unknown_cells
