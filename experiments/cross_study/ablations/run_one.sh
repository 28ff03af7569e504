#!/usr/bin/env bash
# One single-run ablation of Study 3 (#22): train this project's recipe on every gene (data.gene_panel=null, the
# default when these ablations ran) with extra overrides on a task's reference, score it on the task's query (head,
# no majority voting), print one line.
#   TASK=68k|s|3k68|s68 [REFPATH=<reference .h5ad>] bash experiments/cross_study/ablations/run_one.sh NAME [overrides...]
#   68k: pbmc68k_reduced -> pbmc3k   s: sorted -> pbmc3k   3k68: pbmc3k -> pbmc68k   s68: sorted -> pbmc68k
# REFPATH replaces the reference file (e.g. one restricted to the query's genes by restrict_genes.py).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export WANDB_MODE=offline
R=${REAL:-../shared/data/real}; M=experiments/cross_study/label_maps; PY=${PY:-.venv/bin/python}
name=$1; shift
Q3K="query.path=$R/pbmc3k_seurat.h5ad query.label_key=cell_type query.label_map=$M/pbmc3k_seurat.csv"
Q68="query.path=pbmc68k_reduced query.label_key=bulk_labels query.layer=raw query.input_is_log1p=true query.label_map=packaged:pbmc68k_bulk_labels"
SORTED="data.label_key=cell_type data.label_to_ontology=$M/mudan_sorted_pbmc.csv"
case "${TASK:-68k}" in
  68k)  REF="data.path=pbmc68k_reduced data.label_key=bulk_labels data.layer=raw data.input_is_log1p=true data.label_to_ontology=packaged:pbmc68k_bulk_labels"; Q=$Q3K ;;
  s)    REF="data.path=${REFPATH:-$R/mudan_sorted_pbmc.h5ad} $SORTED"; Q=$Q3K ;;
  3k68) REF="data.path=${REFPATH:-$R/pbmc3k_seurat.h5ad} data.label_key=cell_type data.label_to_ontology=$M/pbmc3k_seurat.csv"; Q=$Q68 ;;
  s68)  REF="data.path=${REFPATH:-$R/mudan_sorted_pbmc.h5ad} $SORTED"; Q=$Q68 ;;
esac
RUN=outputs/cross_study/ablations/${TASK:-68k}_$name
rm -rf "$RUN"; mkdir -p "$(dirname "$RUN")"
$PY train.py data=h5ad $REF data.gene_panel=null trainer.enable_progress_bar=false logger=csv hydra.run.dir=$RUN "$@" > $RUN.train.log 2>&1
$PY evaluate.py run_dir=$RUN $Q baselines=false query.majority_voting=false query.name=q > $RUN.eval.log 2>&1
$PY -c "
import json; r = json.load(open('$RUN/evaluation/query/q/report.json')); m = json.load(open('$RUN/metrics.json'))
print('${TASK:-68k} $name', 'accuracy', r['accuracy'], 'macro_f1', r['macro_f1'], 'own_test_macro_f1', round(m['test/macro_f1'], 3))"
