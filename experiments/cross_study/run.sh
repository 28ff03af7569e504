#!/usr/bin/env bash
# Study 3 (#22): this project and the peers (CellTypist, scANVI, SingleR, logistic regression) on the five PBMC tasks,
# every method on the same reference and query cells, 3 seeds where there is randomness. Needs the real-data folder
# beside the repository (REAL=../shared/data/real) and builds the peers' environment (.venv-peers) if missing.
# Results: experiments/cross_study/study3/results.jsonl (resumable) -> experiments/cross_study/study3_{results.json,table.md}
set -euo pipefail
cd "$(dirname "$0")/../.."
REAL=${REAL:-../shared/data/real}
PY=${PY:-.venv/bin/python}
[ -x .venv-peers/bin/python ] || bash experiments/cross_study/make_peers_env.sh
export WANDB_MODE=offline
$PY experiments/cross_study/study3.py --real "$REAL" "$@"
$PY experiments/cross_study/summarize_study3.py
