#!/usr/bin/env bash
# Build the peers' environment (CellTypist, scvi-tools, SingleR) beside the project's: .venv-peers
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
[ -x .venv-peers/bin/python ] || $PYTHON -m venv .venv-peers
.venv-peers/bin/pip install --quiet --upgrade pip
.venv-peers/bin/pip install --quiet torch==2.13.0  # the CPU wheel, before scvi-tools asks for torch
.venv-peers/bin/pip install --quiet -r experiments/cross_study/requirements-peers.txt
.venv-peers/bin/python -c "import celltypist, sklearn, scvi, singler; print('celltypist', celltypist.__version__, 'sklearn', sklearn.__version__, 'scvi-tools', scvi.__version__, 'singler', singler.__version__)"
