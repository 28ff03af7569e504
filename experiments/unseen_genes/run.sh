#!/usr/bin/env bash
# lora.unseen_genes=freeze vs train: what input-layer LoRA does to genes the fine-tuning data never showed it.
# Run from the repository root with the venv active. Needs ../shared/data/real (real full-transcriptome PBMCs;
# see its README) for the embedding-drift columns; the weight columns need nothing but the bundled data.
set -euo pipefail
SWEEP=outputs/multiruns/unseen_genes
REAL=${REAL:-../shared/data/real}
rm -rf "$SWEEP"
# the full-size stand-in (SCimilarity's 28,231 genes; pbmc68k_reduced covers 748 of them), LoRA r=8 on all Linears
python train.py --multirun model=scimilarity_full lora.unseen_genes=freeze,train seed=0,1,2 \
  hydra.sweep.dir=$SWEEP trainer.enable_progress_bar=false
python experiments/unseen_genes/measure.py "$SWEEP" --real "$REAL" --out experiments/unseen_genes
