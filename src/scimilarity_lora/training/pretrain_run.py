"""One pretraining run from ``conf/pretrain.yaml``: SCimilarity's objective on one or several ``.h5ad`` files, a
SCimilarity model folder out (``<run dir>/model``: encoder.ckpt, decoder.ckpt, gene_order.tsv, layer_sizes.json,
label_ints.csv, hyperparameters.json) that ``python train.py model.pretrained_dir=<it>`` fine-tunes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from scimilarity_lora.data.ontology import relation
from scimilarity_lora.genes import resolve_gene_order
from scimilarity_lora.inference.runs import METRICS_FILE, MODEL_DIR
from scimilarity_lora.model.encoder import EncoderConfig
from scimilarity_lora.model.folder import (
    DEFAULT_HIDDEN_DIM,
    DEFAULT_LATENT_DIM,
    load_decoder,
    load_model_folder,
    save_pretrained_folder,
)
from scimilarity_lora.model.triplet import negatives_from_relations
from scimilarity_lora.training.callbacks import MetricsHistory, RestoreRNGState, SetDatasetEpoch

log = logging.getLogger(__name__)


def run_pretraining(cfg: DictConfig) -> float | None:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    m = cfg.model
    init = None
    if cfg.get("init_from"):  # continue pretraining an existing folder (e.g. model_v1.1)
        encoder, genes = load_model_folder(cfg.init_from, m.dropout, m.input_dropout)
        init = (encoder.state_dict(), load_decoder(cfg.init_from, encoder.config, m.dropout).state_dict())
        config = encoder.config
    else:
        genes = resolve_gene_order(m.gene_order)
        config = EncoderConfig(len(genes), m.latent_dim or DEFAULT_LATENT_DIM,
                               tuple(m.hidden_dim or DEFAULT_HIDDEN_DIM), m.dropout, m.input_dropout)
    datamodule = instantiate(cfg.data)
    datamodule.gene_order = list(genes)
    datamodule.setup("fit")
    classes = list(datamodule.labels.classes)
    allowed = negatives_from_relations(classes, relation(datamodule.class_terms()))
    module = instantiate(cfg.objective, _partial_=True)(encoder_config=config.to_dict(), classes=classes,
                                                        allowed_negative=allowed.tolist())
    if init is not None:
        module.encoder.load_state_dict(init[0])
        module.decoder.load_state_dict(init[1])
    history = MetricsHistory()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    # the class-balanced batch sampler shards itself across DDP ranks; Lightning must not wrap it
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks + [history, SetDatasetEpoch(), RestoreRNGState()],
                                     logger=loggers or False, use_distributed_sampler=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update({"train_seconds": round(seconds, 1), "epochs_trained": int(trainer.current_epoch),
                    "global_step": int(trainer.global_step), "history": history.rows, "init_from": cfg.get("init_from"),
                    "class_terms": datamodule.class_terms(), **datamodule.summary()})
    if trainer.is_global_zero:
        hyper = {**OmegaConf.to_container(cfg.objective, resolve=True), **config.to_dict()}
        hyper = {k: v for k, v in hyper.items() if not isinstance(v, dict)}
        save_pretrained_folder(module.encoder, module.decoder, list(genes), classes, out / MODEL_DIR, hyper)
        if datamodule.holdout is not None:
            datamodule.holdout.to_csv(out / "holdout.csv", index=False)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
        log.info("pretrained in %.0f s; SCimilarity model folder: %s", seconds, out / MODEL_DIR)
    return metrics.get("val/loss")
