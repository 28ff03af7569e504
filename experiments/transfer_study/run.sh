#!/usr/bin/env bash
# Study 2, part 1: LoRA (unseen genes frozen / trained), linear probe and full fine-tuning on the base pretrained
# from real PBMCs (experiments/pretrained_base), fine-tuned on pbmc68k_reduced, 3 seeds; evaluated on the target
# task, with the two logistic-regression baselines, and for forgetting on the sorted PBMCs (reference=).
# Run from the repository root with the venv active, after experiments/pretrained_base's command.
set -euo pipefail
BASE=${BASE:-outputs/pretrained_base_real/model}
REAL=${REAL:-../shared/data/real}
S=outputs/multiruns/transfer_study
rm -rf "$S"
python train.py --multirun model.pretrained_dir=$BASE finetune=lora lora.unseen_genes=freeze,train seed=0,1,2 \
  hydra.sweep.dir=$S/lora trainer.enable_progress_bar=false
python train.py --multirun model.pretrained_dir=$BASE finetune=frozen,full seed=0,1,2 \
  hydra.sweep.dir=$S/other trainer.enable_progress_bar=false
for run in "$S"/lora/*/ "$S"/other/*/; do
  python evaluate.py run_dir="$run" reference.path=$REAL/mudan_sorted_pbmc.h5ad reference.label_key=cell_type > /dev/null 2>&1
done
python experiments/transfer_study/measure.py "$S" --real "$REAL" --out experiments/transfer_study
python experiments/transfer_study/plot.py experiments/transfer_study/runs.csv
