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

log = logging.getLogger(__name__)

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
#: where a run saves a random stand-in base, so evaluation reloads it rather than re-drawing it
STAND_IN_BASE_DIR = "base"
#: the metric that names the best run of a sweep
SELECT_METRIC = "val/macro_f1"


class RunDirError(ValueError):
    pass


def best_run(multirun_dir: Path, metric: str = SELECT_METRIC) -> Path:
    """The run of a sweep with the highest ``metric`` in its metrics.json."""
    scores = []
    for metrics_file in sorted(multirun_dir.glob("*/metrics.json")):
        value = json.loads(metrics_file.read_text()).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            scores.append((float(value), metrics_file.parent))
    if not scores:
        raise RunDirError(f"no run under {multirun_dir} has {metric!r} in a metrics.json")
    value, run = max(scores, key=lambda s: s[0])
    log.info("best of %d runs by %s: %s (%.4f)", len(scores), metric, run, value)
    return run
