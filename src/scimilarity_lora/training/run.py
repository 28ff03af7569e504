"""One training run from a composed Hydra config: build, fit, test, export, write ``metrics.json``.

The root ``train.py`` only composes the config and calls :func:`run`. Everything is built with
``hydra.utils.instantiate`` from the config groups in ``conf/``.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from scimilarity_lora.evaluation.plots import plot_confusion_matrix, plot_learning_curves
from scimilarity_lora.inference.artifact import atomic_model_dir, save_model_dir
from scimilarity_lora.inference.runs import METRICS_FILE, MODEL_DIR, STAND_IN_BASE_DIR
from scimilarity_lora.model.adapters import FinetuneConfig, resolve_target_modules
from scimilarity_lora.model.encoder import EncoderConfig
from scimilarity_lora.model.folder import (DEFAULT_HIDDEN_DIM, PACKAGED_PREFIX, BaseModel, save_model_folder,
                                          state_dict_hash, store_base_folder, stored_base_path)
from scimilarity_lora.preprocess import Preprocessing
from scimilarity_lora.training.callbacks import MetricsHistory, RestoreRNGState, SetDatasetEpoch, TrainingSpeed
from scimilarity_lora.training.calibrate import fit_calibration
from scimilarity_lora.training.checkpoint_io import classifier_from_checkpoint

log = logging.getLogger(__name__)


#: the keys of conf/model that describe the base encoder (passed to ``model.base``, i.e. ``load_base``)
BASE_KEYS = ("pretrained_dir", "gene_order", "latent_dim", "hidden_dim", "dropout", "input_dropout")


def finetune_config(cfg: DictConfig) -> FinetuneConfig:
    """Validate the fine-tuning settings before any data is read (bad ``lora.*`` values fail fast).

    ``lora.*`` settings mean something only with ``finetune=lora``: set in another mode they are refused rather
    than silently ignored."""
    lora = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") is not None else {}
    mode = str(cfg.finetune.mode)
    if mode != "lora":
        defaults = FinetuneConfig().to_dict() | {"target_modules": "all"}
        changed = {k: v for k, v in lora.items() if _as_comparable(v) != _as_comparable(defaults.get(k))}
        if changed:
            raise ValueError(f"lora.* settings apply only with finetune=lora, but this run uses finetune={mode}: "
                             + ", ".join(f"lora.{k}={v}" for k, v in changed.items()))
        return FinetuneConfig(mode=mode)
    finetune = FinetuneConfig.from_dict({**lora, "mode": mode})
    if not cfg.model.pretrained_dir:
        # the stand-in's layer names are known from the config; a pretrained folder is checked when loaded
        hidden = tuple(cfg.model.hidden_dim or DEFAULT_HIDDEN_DIM)
        resolve_target_modules(finetune.target_modules, EncoderConfig(1, hidden_dim=hidden))
    return finetune


def _as_comparable(v: Any) -> Any:
    if isinstance(v, str) and "," in v:
        v = [t.strip() for t in v.split(",")]
    if isinstance(v, (list, tuple)):
        return tuple(str(t) for t in v) if len(v) != 1 else str(v[0])
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def build_base(cfg: DictConfig, datamodule: Any) -> BaseModel:
    """The base encoder from ``conf/model``'s keys (the single description of it), via ``model.base``."""
    arch = {k: OmegaConf.to_container(cfg.model, resolve=True)[k] for k in BASE_KEYS}
    needs_data_genes = not (arch["pretrained_dir"] or arch["gene_order"])
    # called with plain Python values: gene lists and tensors must not become OmegaConf containers
    return instantiate(cfg.model.base, _convert_="all")(
        **arch, data_genes=datamodule.data_genes() if needs_data_genes else None)


def base_identity(base: BaseModel, base_store: str | None = None) -> dict[str, Any]:
    """What identifies the base: its weights' hash, and where to reload it: a pretrained folder's absolute path
    (a packaged base keeps its ``packaged:<name>``, valid wherever the package is installed), a stand-in's folder
    in ``paths.base_store`` (stored once per distinct weights), or (``path`` null, no store) the stand-in's copy
    that the run saves as ``<run dir>/base``."""
    sha256 = state_dict_hash(base.encoder.state_dict())
    if not base.is_pretrained:
        path = str(stored_base_path(base_store, sha256)) if base_store else None
    elif base.source.startswith(PACKAGED_PREFIX):
        path = base.source
    else:
        path = str(Path(base.source).resolve())
    return {"is_pretrained": base.is_pretrained, "source": base.source, "path": path, "sha256": sha256}


def class_ontology(datamodule: Any) -> dict[str, Any]:
    """Class -> CL id, the coarse terms and the CL release, for the model directory; {} when no class has an id."""
    from scimilarity_lora.data.ontology import ontology_record

    terms = datamodule.class_terms()
    if not any(terms.values()):
        return {}
    return ontology_record(terms, list(datamodule.labels.classes))


def class_weights(y: np.ndarray, n_classes: int) -> list[float]:
    """Inverse-frequency weights, normalised to mean 1 over the classes present."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return (w / w[counts > 0].mean()).tolist()


def wandb_offline_without_login(logger_cfg: DictConfig | None) -> bool:
    """W&B with no API key configured and nobody at a terminal to log in would die inside Lightning with wandb's
    UsageError. Decision: log offline instead (``wandb sync`` uploads later) and say so in one warning. With a
    terminal, wandb's own login prompt is left to ask; an explicit ``WANDB_MODE`` is always respected."""
    uses_wandb = any("WandbLogger" in str(node.get("_target_", "")) for node in (logger_cfg or {}).values()
                     if node is not None)
    if not uses_wandb or os.environ.get("WANDB_MODE") or _wandb_key_configured() or sys.stdin.isatty():
        return False
    os.environ["WANDB_MODE"] = "offline"
    log.warning("W&B: no API key is configured (`wandb login` or WANDB_API_KEY) and there is no terminal to ask, "
                "so this run logs offline; upload it later with `wandb sync <run dir>/wandb/offline-run-*`, "
                "or set WANDB_MODE to choose")
    return True


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, OSError, netrc.NetrcParseError):
        return False


def _instantiate_all(nodes: DictConfig | None) -> list[Any]:
    if not nodes:
        return []
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def run(cfg: DictConfig, adata: Any = None) -> float | None:
    """Train as the config says; ``adata``: an in-memory AnnData for ``data=h5ad`` (the notebook API's ``fit``)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    finetune = finetune_config(cfg)
    optimized = cfg.get("optimized_metric")
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        if (out / METRICS_FILE).is_file():
            log.info("resume: %s already finished; skipping", out)
            metrics = json.loads((out / METRICS_FILE).read_text())
            return float(metrics[optimized]) if optimized in metrics else None
        ckpt_path = ckpt_path or ("last" if (out / "checkpoints" / "last.ckpt").is_file() else None)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, **({"adata": adata} if adata is not None else {}))
    base = build_base(cfg, datamodule)
    identity = base_identity(base, cfg.paths.get("base_store"))
    if finetune.mode == "lora":
        resolve_target_modules(finetune.target_modules, base.encoder.config)
    datamodule.gene_order = base.genes
    datamodule.setup("fit")

    extra: dict[str, Any] = {}
    if cfg.model.class_weights:
        extra["class_weights"] = class_weights(datamodule.train_labels(), len(datamodule.labels))
    model = instantiate(cfg.model.classifier, _partial_=True)(
        encoder_config=base.encoder.config.to_dict(),
        gene_order=list(base.genes),
        classes=list(datamodule.labels.classes),
        finetune=finetune.to_dict(),
        preprocessing=Preprocessing(target_sum=datamodule.preprocessing.target_sum,
                                    gene_panel=datamodule.preprocessing.gene_panel).to_dict(),
        base=identity,
        gene_aliases=bool(datamodule.gene_aliases),
        base_state_dict=base.encoder.state_dict(),
        ontology=class_ontology(datamodule),
        **extra,
    )
    frozen_genes = model.set_seen_genes(datamodule.seen_genes())
    params = model.parameter_counts()
    log.info("parameters: %s trainable / %s total", f"{params['trainable_params']:,}", f"{params['total_params']:,}")

    speed, history = TrainingSpeed(), MetricsHistory()
    callbacks = _instantiate_all(cfg.get("callbacks")) + [speed, history, SetDatasetEpoch(), RestoreRNGState()]
    wandb_offline_without_login(cfg.get("logger"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **params})
    if trainer.is_global_zero and not base.is_pretrained:
        if identity["path"]:
            store_base_folder(base.encoder, base.genes, Path(identity["path"]).parent)
        elif not (out / STAND_IN_BASE_DIR).is_dir():
            save_model_folder(base.encoder, base.genes, out / STAND_IN_BASE_DIR)

    try:
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        train_seconds = time.perf_counter() - t0
        checkpoint = trainer.checkpoint_callback
        best_path = checkpoint.best_model_path if checkpoint is not None else ""
        if best_path and not Path(best_path).is_file():
            best_path = _restore_earlier_best(model, out, best_path)
        trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)
        keep_best = bool(best_path) and (model.stores_base() or bool(cfg.get("keep_best_checkpoint")))
        metrics = _collect_metrics(trainer, model, datamodule, checkpoint, params, train_seconds, speed, identity,
                                   history)
        metrics["best_checkpoint"] = best_path if keep_best else None
        metrics["tags"] = list(cfg.get("tags") or [])
        metrics["lora_unseen_genes_frozen"] = frozen_genes
        metrics["ontology"] = {k: model.hparams["ontology"].get(k) for k in ("class_terms", "unmapped_classes", "release")
                               } if model.hparams.get("ontology") else None
        metrics["wandb_group"] = _sweep_group(cfg)
        if trainer.is_global_zero:
            _write_outputs(out, cfg, model, datamodule, best_path, metrics, history)
            if best_path and not keep_best:  # model/ now holds these weights, in peft's format
                Path(best_path).unlink()
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if trainer.is_global_zero:
            _log_figures(loggers, out, metrics)
    finally:
        _finish_wandb(loggers)
    return float(metrics[optimized]) if optimized and optimized in metrics else None


def _sweep_group(cfg: DictConfig) -> str | None:
    """The W&B group of this job (its sweep, or the run itself), recorded so evaluation can join it."""
    try:
        return str(cfg.paths.sweep_group)
    except Exception:  # noqa: BLE001 - outside a Hydra run (no HydraConfig) there is no group
        return None


def _restore_earlier_best(model: Any, out: Path, best_path: str) -> str:
    """A finished run trained further (``ckpt_path=last``) whose new epochs never beat its best: that best was
    written to ``model/`` and its checkpoint removed, so the weights to test and keep come from there."""
    if not (out / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"the best checkpoint {best_path} is gone and {out / MODEL_DIR} does not hold it")
    log.info("the best epoch is still the one in %s (its checkpoint was removed when the run finished)", out / MODEL_DIR)
    model.load_trained_weights(out / MODEL_DIR)
    return ""


def _collect_metrics(trainer, model, datamodule, checkpoint, params, train_seconds, speed, identity,
                     history) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and v.numel() == 1
    }
    metrics["test/per_class_f1"] = model.test_results.get("per_class_f1", {})
    best = checkpoint.best_model_score if checkpoint is not None else None
    metrics["val/macro_f1"] = float(best) if best is not None else float(trainer.callback_metrics.get("val/macro_f1", np.nan))
    metrics["epochs_trained"] = int(trainer.current_epoch)
    metrics["global_step"] = int(trainer.global_step)
    metrics["resumed_from_step"] = history.start_step
    metrics["history"] = history.rows  # per epoch: both splits' loss and metrics (the learning curves)
    metrics.update(params)
    metrics["train_seconds"] = round(train_seconds, 3)
    metrics["cells_per_second"] = round(speed.cells_per_second, 1)
    metrics["stream_cells_per_second"] = round(speed.stream_cells_per_second, 1)
    metrics["seconds_to_first_batch"] = speed.seconds_to_first_batch
    metrics["finetune"] = model.finetune.to_dict()
    metrics["base_model"] = identity
    metrics.update(datamodule.summary())
    return metrics


def _write_outputs(out: Path, cfg, model, datamodule, best_path: str, metrics: dict, history: MetricsHistory) -> None:
    datamodule.save_splits(out / "splits.csv")
    best = classifier_from_checkpoint(best_path) if best_path else model
    extra = {"metrics": {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))},
             "training_config": OmegaConf.to_container(cfg, resolve=True)}
    unknown = cfg.get("unknown", {})
    calibration = fit_calibration(best.model, datamodule, len(best.classes),
                                  target_accuracy=float(unknown.get("target_accuracy", 0.9)),
                                  novelty_quantile=float(unknown.get("novelty_quantile", 0.99)),
                                  coarse=bool(unknown.get("coarse", True)),
                                  coarse_novelty_quantile=float(unknown.get("coarse_novelty_quantile", 0.9)))
    with atomic_model_dir(out / MODEL_DIR) as tmp:  # never a half-written model/ (full disk, crash)
        save_model_dir(best.model, best.spec(), tmp, extra=extra, seen_genes=best.seen_genes)
        calibration.save(tmp)
    metrics["unknown"] = {"temperature": calibration.temperature,
                          "confidence_threshold": calibration.confidence_threshold,
                          "novelty_threshold": round(calibration.novelty_threshold, 6)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    if "confusion_matrix" in model.test_results:
        plot_confusion_matrix(model.test_results["confusion_matrix"], model.classes, plots / "confusion_matrix.png")
    if history.rows:
        plot_learning_curves(history.rows, plots / "learning_curves.png")
    log.info("test accuracy %.3f, macro-F1 %.3f; results in %s", metrics.get("test/accuracy", np.nan),
             metrics.get("test/macro_f1", np.nan), out)


def _log_figures(loggers: list[Any], out: Path, metrics: dict) -> None:
    """W&B gets the confusion matrix image and a per-class F1 table next to the scalar metrics."""
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        cm = out / "plots" / "confusion_matrix.png"
        if cm.is_file():
            lg.log_image(key="test/confusion_matrix", images=[str(cm)])
        rows = [[c, float(f)] for c, f in metrics.get("test/per_class_f1", {}).items()]
        lg.log_table(key="test/per_class_f1", columns=["cell_type", "f1"], data=rows)


def _finish_wandb(loggers: list[Any]) -> None:
    """One W&B run per job: close it so a multirun's next job starts a fresh run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
