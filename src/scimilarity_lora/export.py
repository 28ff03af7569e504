"""Package a trained model into the BentoML model store, for ``bentoml serve``.

    python -m scimilarity_lora.export outputs/runs/<date>/<time>          # a run directory
    python -m scimilarity_lora.export outputs/multiruns/<date>/<time>     # a sweep: the best run by val/macro_f1
    python -m scimilarity_lora.export path/to/checkpoints/epoch...ckpt    # a Lightning checkpoint

The BentoML model holds the run's model directory (see :mod:`scimilarity_lora.artifact`): the encoder with LoRA
merged (inference pays nothing for the adapter), the head, classes, gene order and preprocessing, plus training
metrics and config as metadata. Weights are safetensors: loading never unpickles.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

from scimilarity_lora.artifact import classifier_from_checkpoint, read_model_dir, save_model_dir

log = logging.getLogger(__name__)

DEFAULT_NAME = "scimilarity_lora"
SELECT_METRIC = "val/macro_f1"


class ExportError(ValueError):
    pass


def best_run(multirun_dir: Path, metric: str = SELECT_METRIC) -> Path:
    """The run of a sweep with the highest ``metric`` in its metrics.json."""
    scores = []
    for metrics_file in sorted(multirun_dir.glob("*/metrics.json")):
        value = json.loads(metrics_file.read_text()).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            scores.append((float(value), metrics_file.parent))
    if not scores:
        raise ExportError(f"no run under {multirun_dir} has {metric!r} in a metrics.json")
    value, run = max(scores, key=lambda s: s[0])
    log.info("best of %d runs by %s: %s (%.4f)", len(scores), metric, run, value)
    return run


def resolve_model_dir(source: str | Path, workdir: Path) -> tuple[Path, dict]:
    """A model directory for ``source`` (run dir, multirun dir or .ckpt) and the run's metrics (if any)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".ckpt":
        out = save_model_dir(classifier_from_checkpoint(source), workdir / "model")
        return out, {}
    if not source.is_dir():
        raise ExportError(f"not a run directory, multirun directory or .ckpt file: {source}")
    run = source if (source / "metrics.json").is_file() else best_run(source)
    if not (run / "model").is_dir():
        raise ExportError(f"{run} has no model/ directory (did the run finish?)")
    return run / "model", json.loads((run / "metrics.json").read_text())


def export_to_bentoml(source: str | Path, name: str = DEFAULT_NAME) -> str:
    """Save the model into the BentoML store; returns the model tag (``name:version``)."""
    import bentoml

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, metrics = resolve_model_dir(source, Path(tmp))
        config, genes, _, _ = read_model_dir(model_dir)  # validates before anything is stored
        scalar_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        metadata = {
            "classes": config["classes"],
            "n_genes": len(genes),
            "finetune": config["finetune"],
            "base_is_pretrained": config["base_is_pretrained"],
            "source": str(Path(source).resolve()),
            "metrics": scalar_metrics,
        }
        with bentoml.models.create(name, labels={"framework": "pytorch", "task": "cell-type-annotation"},
                                   metadata=metadata) as model:
            shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
        return str(model.tag)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Package a trained run into the BentoML model store.")
    parser.add_argument("source", help="run dir, multirun dir (best run by val/macro_f1) or .ckpt")
    parser.add_argument("--name", default=DEFAULT_NAME, help="BentoML model name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tag = export_to_bentoml(args.source, args.name)
    print(tag)


if __name__ == "__main__":
    main()
