#!/usr/bin/env bash
# Side-by-side: our pretraining vs SCimilarity 0.4.1's own MetricLearningDataModule + MetricLearning, on the same
# cells (the 1,712 sorted PBMCs outside the 20% holdout), gene order (the demo base's 748 genes), epochs (40) and
# batch size (512); retention = kNN transfer to the 428 held-out cells. Seeds 0, 1, 2 each.
# Run from the repository root with the venv active. SCIM_PY: a Python with scimilarity==0.4.1 and its dependencies:
#   python3 -m venv /work/scim-venv && /work/scim-venv/bin/pip install torch==2.13.0 scimilarity==0.4.1
set -euo pipefail
SCIM_PY=${SCIM_PY:-/work/scim-venv/bin/python}
REAL=${REAL:-../shared/data/real}
O=outputs/scimilarity_side_by_side
ONE_FILE="data.files=[{path: $REAL/mudan_sorted_pbmc.h5ad, label_key: cell_type}]"
COMMON=(data=pretrain_real_pbmc "$ONE_FILE" data.val_fraction=0 trainer.limit_val_batches=0
        model.gene_order=experiments/pretrained_base/demo_gene_order.tsv trainer.max_epochs=40
        trainer.enable_progress_bar=false)
# ours with the default (cosine) objective, one seed
python pretrain.py "${COMMON[@]}" objective.optimizer._target_=torch.optim.AdamW +objective.optimizer.weight_decay=0.01 \
  seed=0 hydra.run.dir=$O/ours_cosine_seed0
for s in 0 1 2; do
  # SCimilarity 0.4.1's code objective | the same with its class-balanced batches (512 / 9 types = 56 per type)
  python pretrain.py "${COMMON[@]}" objective=scimilarity_041 seed=$s hydra.run.dir=$O/ours_041_seed$s
  python pretrain.py "${COMMON[@]}" objective=scimilarity_041 data.cells_per_class=56 seed=$s \
    hydra.run.dir=$O/ours_041_balanced_seed$s
done
python experiments/scimilarity_reference/prepare.py $O/ours_041_seed0 --out $O/inputs
for s in 0 1 2; do
  $SCIM_PY experiments/scimilarity_reference/train_scimilarity.py $O/inputs --epochs 40 --seed $s --out $O/theirs_seed$s
  cp $O/ours_041_seed0/holdout.csv $O/theirs_seed$s/
done
for run in $O/ours_* $O/theirs_*; do
  python experiments/pretrained_base/measure.py "$run" --real "$REAL" --out "$run/retention.json" > /dev/null
done
python experiments/scimilarity_reference/summarize.py $O --out experiments/scimilarity_reference/results.json
