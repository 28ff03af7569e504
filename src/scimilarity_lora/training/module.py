"""The LightningModule: training of a :class:`~scimilarity_lora.model.classifier.CellClassifier` (SCimilarity
encoder, + LoRA, -> linear head): loss, torchmetrics, optimiser, and the frozen base's BatchNorm policy.

Hyperparameters saved in the checkpoint are plain JSON-like values (encoder architecture, gene order, classes,
preprocessing, fine-tuning config), so a checkpoint is self-contained and loads with ``weights_only=True``.
Optimizer and scheduler are Hydra partials and deliberately *not* saved: they are training concerns, recorded
in the run's resolved config instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from scimilarity_lora.genes import gene_order_hash
from scimilarity_lora.inference.artifact import ADAPTER_DIR, HEAD_FILE, ModelSpec, load_safetensors
from scimilarity_lora.model.adapters import (
    FinetuneConfig,
    base_is_frozen,
    count_parameters,
    freeze_batchnorm_stats,
    freeze_unseen_genes,
    prepare_encoder,
)
from scimilarity_lora.model.classifier import CellClassifier, ClassifierHead
from scimilarity_lora.model.encoder import Encoder, EncoderConfig
from scimilarity_lora.model.folder import ModelFolderError, load_encoder_weights
from scimilarity_lora.model.probe import fit_linear_probe
from scimilarity_lora.preprocess import Preprocessing

log = logging.getLogger(__name__)


def _metrics(n_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(n_classes, average="micro"),
            "macro_f1": MulticlassF1Score(n_classes, average="macro"),
        },
        prefix=prefix,
    )


class CellTypeClassifier(L.LightningModule):
    def __init__(
        self,
        encoder_config: dict,
        gene_order: list[str],
        classes: list[str],
        finetune: dict,
        preprocessing: dict,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        head_scale: float = 10.0,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        base: dict | None = None,
        gene_aliases: bool = True,
        base_state_dict: dict[str, torch.Tensor] | None = None,
        ontology: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "base_state_dict"], logger=False)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.finetune = FinetuneConfig.from_dict(finetune)
        config = EncoderConfig.from_dict(encoder_config)
        if len(gene_order) != config.n_genes:
            raise ValueError(f"gene_order has {len(gene_order)} genes, encoder expects {config.n_genes}")
        base_encoder = Encoder.from_config(config)
        if base_state_dict is not None:
            load_encoder_weights(base_encoder, base_state_dict, source="base encoder")
        self.model = CellClassifier(prepare_encoder(base_encoder, self.finetune),
                                    ClassifierHead(config.latent_dim, len(classes), head_scale))
        # which genes the training data covers (lora.unseen_genes=freeze); saved in checkpoints
        self.register_buffer("seen_genes", torch.ones(config.n_genes, dtype=torch.bool))
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

        n = len(classes)
        self.train_metrics = _metrics(n, "train/")
        self.val_metrics = _metrics(n, "val/")
        self.test_metrics = _metrics(n, "test/")
        self.test_per_class_f1 = MulticlassF1Score(n, average=None)
        self.test_confusion = MulticlassConfusionMatrix(n)
        self.test_results: dict[str, Any] = {}

    # -- model -----------------------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.hparams["classes"])

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def head(self) -> ClassifierHead:
        return self.model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def set_seen_genes(self, seen: "torch.Tensor | np.ndarray") -> int:
        """Record the training data's gene coverage; with ``lora.unseen_genes=freeze`` (and LoRA on the input
        layer) the adapter is kept off the uncovered genes. Returns how many gene columns are frozen."""
        self.seen_genes.copy_(torch.as_tensor(seen, dtype=torch.bool))
        if self.finetune.mode != "lora" or self.finetune.unseen_genes != "freeze":
            return 0
        frozen = freeze_unseen_genes(self.encoder, EncoderConfig.from_dict(self.hparams["encoder_config"]),
                                     self.seen_genes)
        if frozen:
            log.info("lora.unseen_genes=freeze: input-layer LoRA kept off %d of %d genes absent from the training data",
                     frozen, self.seen_genes.numel())
        return frozen

    # -- adapter-sized checkpoints ---------------------------------------------------------------------------
    def stores_base(self) -> bool:
        """Full fine-tuning changes every weight: its checkpoints hold them all. With a frozen base (``lora``,
        ``frozen``) they hold only what trains (adapter, head) plus the base's identity."""
        return not base_is_frozen(self.finetune)

    def base_keys(self) -> list[str]:
        """State-dict keys of the frozen base: the encoder's, except LoRA's own tensors."""
        return [k for k in self.state_dict() if k.startswith("model.encoder.") and "lora_" not in k]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.stores_base():
            return
        state = checkpoint["state_dict"]
        for key in self.base_keys():
            state.pop(key, None)
        checkpoint["base_sha256"] = (self.hparams.get("base") or {}).get("sha256")
        # the gene list is the base's (300 KB for SCimilarity's 28,231 genes, a quarter of an r=8 adapter): the
        # checkpoint keeps its hash, and reloading takes the list from the recorded base folder
        checkpoint["hyper_parameters"]["gene_order"] = None
        checkpoint["gene_order_sha256"] = gene_order_hash(self.hparams["gene_order"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming an adapter-sized checkpoint: the base comes from this module, which must be the same base."""
        if "base_sha256" not in checkpoint:
            return
        ours = (self.hparams.get("base") or {}).get("sha256")
        if checkpoint["base_sha256"] != ours:
            raise ModelFolderError(f"the checkpoint was trained on a base with weights sha256 "
                                   f"{str(checkpoint['base_sha256'])[:16]}..., but this run's base has "
                                   f"{str(ours)[:16]}...: not the same base")
        current = self.state_dict()
        checkpoint["state_dict"] = {**{k: current[k] for k in self.base_keys()}, **checkpoint["state_dict"]}

    def load_trained_weights(self, model_dir: str | Path) -> None:
        """Put a model directory's adapter and head (what this run trains) back into this module."""
        folder = Path(model_dir)
        adapter = folder / ADAPTER_DIR / "adapter_model.safetensors"
        if adapter.is_file():
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.encoder, load_safetensors(adapter))
            if [k for k in result.missing_keys if "lora_" in k] or result.unexpected_keys:
                raise ModelFolderError(f"{adapter} does not fit this run's adapter")
        elif self.finetune.mode == "lora":
            raise ModelFolderError(f"{folder} holds no adapter to restore")
        self.head.load_state_dict(load_safetensors(folder / HEAD_FILE))

    def spec(self) -> ModelSpec:
        """What the model directory records besides weights (see :mod:`scimilarity_lora.inference.artifact`)."""
        hp = self.hparams
        return ModelSpec(encoder=EncoderConfig.from_dict(hp["encoder_config"]), genes=list(hp["gene_order"]),
                         classes=self.classes, preprocessing=Preprocessing.from_dict(hp["preprocessing"]),
                         finetune=self.finetune.to_dict(), head_scale=float(hp["head_scale"]),
                         base=dict(hp["base"] or {}), gene_aliases=bool(hp["gene_aliases"]),
                         ontology=dict(hp.get("ontology") or {}))

    def parameter_counts(self) -> dict[str, int]:
        trainable, total = count_parameters(self)
        return {"trainable_params": trainable, "total_params": total}

    def train(self, mode: bool = True) -> "CellTypeClassifier":
        """Keep the frozen base's BatchNorm statistics fixed (see :mod:`scimilarity_lora.model.adapters`)."""
        super().train(mode)
        if mode and base_is_frozen(self.finetune):
            freeze_batchnorm_stats(self.encoder)
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores submodules' train/eval flags directly after validation, bypassing train() above;
        # re-freezing before every step is what actually guarantees the base's statistics never move.
        if base_is_frozen(self.finetune):
            freeze_batchnorm_stats(self.encoder)

    # -- steps -----------------------------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(
            logits, y, weight=self.class_weights, label_smoothing=self.hparams["label_smoothing"]
        )
        return loss, logits.argmax(dim=1), y

    def on_train_epoch_end(self) -> None:
        if self.finetune.mode == "frozen":
            self.trainer.should_stop = True  # one epoch: its validation scores and checkpoints the fitted probe

    # -- the linear probe (finetune=frozen) --------------------------------------------------------------------
    @torch.no_grad()
    def _head_inputs(self, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """What the head sees (scaled embeddings) and labels for a whole split, gathered from every rank."""
        was_training = self.training
        self.eval()
        zs, ys = [], []
        for x, y in loader:
            zs.append(self.model.embed(x.to(self.device)) * self.head.scale)
            ys.append(y.to(self.device))
        self.train(was_training)
        z, y = torch.cat(zs), torch.cat(ys)
        if self.trainer.world_size > 1:
            z, y = self.all_gather(z).flatten(0, 1), self.all_gather(y).flatten(0, 1)
        return z.cpu(), y.cpu()

    def fit_probe(self) -> float:
        """Fit the head as a logistic regression on the frozen embeddings (see :mod:`~.model.probe`); returns C."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_dataloader"):
            raise RuntimeError("finetune=frozen fits its probe on the data module's train and val splits")
        z_train, y_train = self._head_inputs(datamodule.eval_dataloader("train"))
        z_val, y_val = self._head_inputs(datamodule.eval_dataloader("val"))
        fit = fit_linear_probe(z_train, y_train, z_val, y_val, len(self.classes))
        with torch.no_grad():
            self.head.linear.weight.copy_(fit.weight.to(self.head.linear.weight))
            self.head.linear.bias.copy_(fit.bias.to(self.head.linear.bias))
        log.info("linear probe: logistic regression by L-BFGS on %d cells, C=%g chosen on %d validation cells",
                 len(y_train), fit.C, len(y_val))
        return fit.C

    def on_train_start(self) -> None:
        if self.finetune.mode == "frozen":
            self.fit_probe()
        counts = self.parameter_counts()
        log.info(
            "fine-tuning mode %r: %s trainable of %s parameters (%.2f%%)", self.finetune.mode,
            f"{counts['trainable_params']:,}", f"{counts['total_params']:,}",
            100 * counts["trainable_params"] / counts["total_params"],
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.finetune.mode == "frozen":  # the probe was fit to convergence in on_train_start
            return None
        loss, preds, y = self._step(batch)
        self.train_metrics.update(preds, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.val_metrics.update(preds, y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.test_metrics.update(preds, y)
        self.test_per_class_f1.update(preds, y)
        self.test_confusion.update(preds, y)
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=len(y))

    def on_test_epoch_end(self) -> None:
        f1 = self.test_per_class_f1.compute().cpu().tolist()
        self.test_results = {
            "per_class_f1": dict(zip(self.classes, f1)),
            "confusion_matrix": self.test_confusion.compute().cpu().tolist(),
        }
        self.test_per_class_f1.reset()
        self.test_confusion.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x), dim=1)

    # -- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        optimizer = factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "epoch"}}
