#!/usr/bin/env bash
# CellTypist (the real package, in its own environment) on the two cross-study tasks of example.sh, scored by the
# project's own label matching and metrics: -> experiments/cross_study/peers_results.json
set -euo pipefail
cd "$(dirname "$0")/../.."
REAL=${REAL:-../shared/data/real}
MAPS=experiments/cross_study/label_maps
OUT=outputs/peers; RESULTS=experiments/cross_study/peers_results.json
mkdir -p $OUT; rm -f $RESULTS
bash experiments/cross_study/make_peers_env.sh
for fs in "" "--feature-selection"; do
  tag=${fs:+_feature_selection}
  .venv-peers/bin/python experiments/cross_study/peers/celltypist_run.py $REAL/mudan_sorted_pbmc.h5ad cell_type \
      $REAL/pbmc3k_seurat.h5ad $OUT/celltypist${tag}_pbmc3k.csv $fs --majority-voting
  .venv-peers/bin/python experiments/cross_study/peers/celltypist_run.py $REAL/mudan_sorted_pbmc.h5ad cell_type \
      pbmc68k_reduced $OUT/celltypist${tag}_pbmc68k.csv --query-layer raw --query-log1p $fs --majority-voting
  for col in predicted_labels majority_voting; do
    python experiments/cross_study/score_predictions.py $OUT/celltypist${tag}_pbmc3k.csv $REAL/pbmc3k_seurat.h5ad \
        cell_type --classes-map $MAPS/mudan_sorted_pbmc.csv --query-map $MAPS/pbmc3k_seurat.csv --column $col \
        --out $RESULTS --name "pbmc3k_seurat:celltypist${tag}:$col" > /dev/null
    python experiments/cross_study/score_predictions.py $OUT/celltypist${tag}_pbmc68k.csv pbmc68k_reduced bulk_labels \
        --classes-map $MAPS/mudan_sorted_pbmc.csv --query-map packaged:pbmc68k_bulk_labels --column $col \
        --out $RESULTS --name "pbmc68k_reduced:celltypist${tag}:$col" > /dev/null
  done
done
cat $RESULTS
