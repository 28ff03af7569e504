#!/usr/bin/env bash
# Study 2: LoRA (ranks 2/8/32, target presets), frozen base + linear probe and full fine-tuning on three bases
# (pretrained over SCimilarity's 28,231 genes; pretrained over the target's 748 genes = the packaged demo base;
# random with the 748-gene base's architecture), fine-tuned on pbmc68k_reduced, 3 seeds; evaluated on the target
# task with the two logistic-regression baselines, and for forgetting on the held-out sorted PBMCs (kNN transfer
# from the sorted cells used in pretraining) and on unlabelled real PBMCs (measure.py).
# Run from the repository root with the venv active, after experiments/pretrained_base's commands (both bases).
set -euo pipefail
REAL=${REAL:-../shared/data/real}
FULL=${FULL:-outputs/pretrained_base_real/model}
DEMO=${DEMO:-outputs/pretrained_base_demo/model}     # the weights of packaged:pbmc_demo, with their decoder
HOLDOUT=${HOLDOUT:-outputs/pretrained_base_real/holdout.csv}
S=${S:-outputs/multiruns/transfer_study2}
COMMON="trainer.enable_progress_bar=false seed=0,1,2"
declare -A BASE=(
  [full]="model.pretrained_dir=$FULL"
  [demo]="model.pretrained_dir=$DEMO"
  [random]="model=random model.gene_order=experiments/pretrained_base/demo_gene_order.tsv"
)
for b in demo random full; do
  python train.py --multirun ${BASE[$b]} finetune=lora lora.r=2,8,32 $COMMON hydra.sweep.dir=$S/$b/lora_rank
  if [ "$b" != full ]; then
    python train.py --multirun ${BASE[$b]} finetune=lora lora.target_modules=input,hidden,output $COMMON \
      hydra.sweep.dir=$S/$b/lora_preset
  fi
  python train.py --multirun ${BASE[$b]} finetune=frozen,full $COMMON hydra.sweep.dir=$S/$b/other
  for run in "$S/$b"/*/[0-9]*/; do
    python evaluate.py run_dir="$run" reference.path=$REAL/mudan_sorted_pbmc.h5ad reference.label_key=cell_type \
      reference.query_cells=$HOLDOUT > /dev/null 2>&1
  done
done
python experiments/transfer_study/measure.py "$S" --real "$REAL" --out experiments/transfer_study
python experiments/transfer_study/plot.py experiments/transfer_study/runs.csv
