"""Package a trained model into the BentoML model store, for ``bentoml serve``.

    python -m scimilarity_lora.serving.export outputs/runs/<date>/<time>        # a run directory
    python -m scimilarity_lora.serving.export outputs/multiruns/<date>/<time>   # a sweep: the best run by val/macro_f1
    python -m scimilarity_lora.serving.export path/to/checkpoints/epoch...ckpt  # a Lightning checkpoint
    python -m scimilarity_lora.serving.export outputs/runs/<date>/<time> --adapter --name pbmc_bulk
        # an adapter-only run as an adapter: its base goes into the store once (scimilarity_base:<sha256 prefix>),
        # the adapter (peft weights + head + classes, a few MB) as its own model that names that base

The BentoML model holds the run's model directory (see :mod:`scimilarity_lora.inference.artifact`) made
self-contained: the encoder with LoRA merged (inference pays nothing for the adapter; an adapter-only run directory
is merged with its recorded base here), the head, classes, gene order and preprocessing, plus training metrics and
config as metadata. Weights are safetensors: loading never unpickles.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from scimilarity_lora.inference.artifact import ENCODER_FILE, read_model_dir, save_model_dir, write_merged_encoder
from scimilarity_lora.inference.runs import MODEL_DIR, METRICS_FILE, best_run

log = logging.getLogger(__name__)

DEFAULT_NAME = "scimilarity_lora"


class ExportError(ValueError):
    pass


def resolve_model_dir(source: str | Path, workdir: Path) -> tuple[Path, dict]:
    """A model directory for ``source`` (run dir, multirun dir or .ckpt) and the run's metrics (if any)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".ckpt":
        from scimilarity_lora.training.checkpoint_io import classifier_from_checkpoint  # the training stack, only here

        module = classifier_from_checkpoint(source)
        return save_model_dir(module.model, module.spec(), workdir / MODEL_DIR, merged=True), {}
    if not source.is_dir():
        raise ExportError(f"not a run directory, multirun directory or .ckpt file: {source}")
    run = source if (source / METRICS_FILE).is_file() else best_run(source)
    if not (run / MODEL_DIR).is_dir():
        raise ExportError(f"{run} has no {MODEL_DIR}/ directory (did the run finish?)")
    return run / MODEL_DIR, json.loads((run / METRICS_FILE).read_text())


def export_to_bentoml(source: str | Path, name: str = DEFAULT_NAME) -> str:
    """Save the model into the BentoML store; returns the model tag (``name:version``)."""
    import bentoml

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, metrics = resolve_model_dir(source, Path(tmp))
        spec, classifier, _ = read_model_dir(model_dir)  # validates (and reloads the base) before anything is stored
        scalar_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        metadata = {
            "classes": spec.classes,
            "n_genes": len(spec.genes),
            "finetune": spec.finetune,
            "base_is_pretrained": bool(spec.base.get("is_pretrained")),
            "source": str(Path(source).resolve()),
            "metrics": scalar_metrics,
        }
        with bentoml.models.create(name, labels={"framework": "pytorch", "task": "cell-type-annotation"},
                                   metadata=metadata) as model:
            shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
            if not (Path(model.path) / ENCODER_FILE).is_file():  # an adapter-only run: the store gets it merged
                write_merged_encoder(classifier, spec.genes, model.path)
        return str(model.tag)


BASE_NAME = "scimilarity_base"


def base_tag(sha256: str) -> str:
    return f"{BASE_NAME}:{sha256[:16]}"


def export_adapter(source: str | Path, name: str) -> tuple[str, str]:
    """An adapter-only run into the store as an adapter model, its base stored once; returns (adapter, base) tags.

    The base model holds the base's SCimilarity folder files; a base already in the store (same sha256) is reused,
    so many adapters cost the base once."""
    import bentoml

    from scimilarity_lora.inference.artifact import is_adapter_only
    from scimilarity_lora.inference.runs import base_folder

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, metrics = resolve_model_dir(source, Path(tmp))
        spec, _, config = read_model_dir(model_dir)  # validates, and checks the recorded base's weights
        if not is_adapter_only(spec):
            raise ExportError(f"{source}: {spec.finetune.get('mode')} fine-tuning has no adapter of a shared base; "
                              "export it as a merged model (without --adapter)")
        sha = spec.base["sha256"]
        tag = base_tag(sha)
        try:
            bentoml.models.get(tag)
            log.info("base %s is already in the store", tag)
        except bentoml.exceptions.NotFound:
            folder = base_folder(model_dir.parent, spec.base)
            with bentoml.models.create(tag, labels={"kind": "base"}, metadata={
                    "sha256": sha, "source": spec.base.get("source"), "n_genes": len(spec.genes),
                    "is_pretrained": bool(spec.base.get("is_pretrained"))}) as model:
                for f in folder.iterdir():
                    if f.is_file():
                        shutil.copy2(f, Path(model.path) / f.name)
            log.info("stored base %s from %s", tag, folder)
        scalar_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with bentoml.models.create(name, labels={"kind": "adapter", "base": sha[:16]}, metadata={
                "base": tag, "base_sha256": sha, "classes": spec.classes, "finetune": spec.finetune,
                "source": str(Path(source).resolve()), "metrics": scalar_metrics}) as model:
            shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
        return str(model.tag), tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Package a trained run into the BentoML model store.")
    parser.add_argument("source", help="run dir, multirun dir (best run by val/macro_f1) or .ckpt")
    parser.add_argument("--name", default=DEFAULT_NAME, help="BentoML model name")
    parser.add_argument("--adapter", action="store_true",
                        help="store an adapter-only run as an adapter of its base (the base stored once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.adapter:
        adapter, base = export_adapter(args.source, args.name)
        print(f"{adapter} (base {base})")
        return
    tag = export_to_bentoml(args.source, args.name)
    print(tag)


if __name__ == "__main__":
    main()
