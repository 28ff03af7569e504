#!/usr/bin/env bash
# The exact commands behind experiments/pbmc_lora_study/README.md. Run from the repository root with the venv
# active (make demo creates it). Outputs go to outputs/ (git-ignored); tables and plots are copied here.
# With the real SCimilarity weights, add  model.pretrained_dir=/path/to/model_v1.1  to both train.py lines.
set -euo pipefail
HERE=experiments/pbmc_lora_study
MODES=outputs/multiruns/pbmc_modes
RANKS=outputs/multiruns/pbmc_rank_target
rm -rf "$MODES" "$RANKS"

# 1. fine-tuning modes x 3 seeds (LoRA r=8 on all Linears, linear probe, full fine-tuning)
python train.py --multirun finetune=lora,frozen,full seed=0,1,2 hydra.sweep.dir=$MODES \
  trainer.enable_progress_bar=false "$@"
# 2. LoRA rank x target modules (seed 0)
python train.py --multirun lora.r=2,8,32 lora.target_modules=input,hidden,output,all hydra.sweep.dir=$RANKS \
  trainer.enable_progress_bar=false "$@"

# evaluation (adds frozen-embedding+LR and genes+LR baselines, forgetting, calibration) and summaries
for run in "$MODES"/*/ "$RANKS"/*/; do python evaluate.py run_dir="$run" > /dev/null 2>&1; done
python -m scimilarity_lora.evaluation.summarize "$MODES"
python -m scimilarity_lora.evaluation.summarize "$RANKS"
for d in "$MODES" "$RANKS"; do
  name=$(basename "$d")
  cp "$d/summary.md" "$HERE/${name}_summary.md"; cp "$d/summary.csv" "$HERE/${name}_summary.csv"
  cp "$d/summary.png" "$HERE/${name}.png"
  [ -f "$d/summary_over_seeds.csv" ] && cp "$d/summary_over_seeds.csv" "$HERE/${name}_over_seeds.csv"
done
for seed in 0 1 2; do cp "$MODES/$seed/evaluation/report.md" "$HERE/lora_seed${seed}_report.md"; done
cp "$MODES/0/evaluation/confusion_matrix.png" "$HERE/lora_seed0_confusion_matrix.png"
cp "$MODES/6/evaluation/confusion_matrix.png" "$HERE/full_seed0_confusion_matrix.png"
