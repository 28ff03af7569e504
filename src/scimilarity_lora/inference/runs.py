"""A training run's directory, as training writes it and evaluation, export and summaries read it::

    <run dir>/
      .hydra/config.yaml   the resolved run config      metrics.json   test/val metrics, provenance
      model/               the model directory (see :mod:`.artifact`)
      base/                (stand-in bases only) the random base encoder, in SCimilarity's folder format
      checkpoints/  splits.csv  plots/  csv/  evaluation/
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.folder import ModelFolderError, load_model_folder, resolve_model_dir, state_dict_hash

log = logging.getLogger(__name__)

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
#: where a run saves a random stand-in base, so evaluation reloads it rather than re-drawing it
STAND_IN_BASE_DIR = "base"
#: the metric that names the best run of a sweep
SELECT_METRIC = "val/macro_f1"


class RunDirError(ValueError):
    pass


def run_metrics(run_dir: Path) -> dict:
    """A run's ``metrics.json`` plus the flat ``query/<name>/...`` figures of every query it was evaluated on
    (``evaluation/query/<name>/metrics.json``), so a sweep can be ranked by how it labels another study."""
    metrics = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    for extra in sorted(Path(run_dir).glob("evaluation/query/*/metrics.json")):
        metrics.update(json.loads(extra.read_text()))
    return metrics


def best_run(multirun_dir: Path, metric: str = SELECT_METRIC) -> Path:
    """The run of a sweep with the highest ``metric`` in its metrics (training's, or a query's: see
    :func:`run_metrics`)."""
    scores = []
    for metrics_file in sorted(multirun_dir.glob("*/metrics.json")):
        value = run_metrics(metrics_file.parent).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            scores.append((float(value), metrics_file.parent))
    if not scores:
        raise RunDirError(f"no run under {multirun_dir} has {metric!r} in a metrics.json")
    value, run = max(scores, key=lambda s: s[0])
    log.info("best of %d runs by %s: %s (%.4f)", len(scores), metric, run, value)
    return run


def base_folder(run_dir: str | Path, base: dict) -> Path:
    """Where a run's base encoder lives: the pretrained folder training recorded, or the stand-in the run saved."""
    return resolve_model_dir(base["path"]) if base.get("path") else Path(run_dir) / STAND_IN_BASE_DIR


def load_recorded_base(run_dir: str | Path, base: dict, genes: Sequence[str] | None = None) -> Encoder:
    """The encoder a run fine-tuned from, as training recorded it (``base``: path and sha256 of its weights).
    The one place evaluation, export and checkpoint reloading get it; refuses a folder that is gone, has another
    gene order, or whose weights differ from the recorded ones (naming both hashes)."""
    encoder, folder_genes = recorded_base(run_dir, base)
    if genes is not None and list(folder_genes) != list(genes):
        raise ModelFolderError(f"the base encoder at {base_folder(run_dir, base)} has another gene order than the "
                               "trained model")
    return encoder


def recorded_base(run_dir: str | Path, base: dict) -> tuple[Encoder, list[str]]:
    """:func:`load_recorded_base` with the folder's gene order (for files that record only its hash)."""
    folder = base_folder(run_dir, base)
    if not folder.is_dir():
        raise ModelFolderError(f"the base encoder of {run_dir} was at {folder}, which is gone")
    encoder, folder_genes = load_model_folder(folder)
    expected = base.get("sha256")
    if expected:
        found = state_dict_hash(encoder.state_dict())
        if found != expected:
            raise ModelFolderError(f"the base encoder at {folder} has weights sha256 {found[:16]}..., but the model "
                                   f"was fine-tuned from {expected[:16]}...: not the same base")
    return encoder, list(folder_genes)
