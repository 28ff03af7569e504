"""The LightningModule: training of a :class:`~scimilarity_lora.model.classifier.CellClassifier` (SCimilarity
encoder, + LoRA, -> linear head): loss, torchmetrics, optimiser, and the frozen base's BatchNorm policy.

Hyperparameters saved in the checkpoint are plain JSON-like values (encoder architecture, gene order, classes,
preprocessing, fine-tuning config), so a checkpoint is self-contained and loads with ``weights_only=True``.
Optimizer and scheduler are Hydra partials and deliberately *not* saved: they are training concerns, recorded
in the run's resolved config instead.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from scimilarity_lora.inference.artifact import ModelSpec
from scimilarity_lora.model.adapters import (
    FinetuneConfig,
    base_is_frozen,
    count_parameters,
    freeze_batchnorm_stats,
    prepare_encoder,
)
from scimilarity_lora.model.classifier import CellClassifier, ClassifierHead
from scimilarity_lora.model.encoder import Encoder, EncoderConfig
from scimilarity_lora.model.folder import load_encoder_weights
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

    def spec(self) -> ModelSpec:
        """What the model directory records besides weights (see :mod:`scimilarity_lora.inference.artifact`)."""
        hp = self.hparams
        return ModelSpec(encoder=EncoderConfig.from_dict(hp["encoder_config"]), genes=list(hp["gene_order"]),
                         classes=self.classes, preprocessing=Preprocessing.from_dict(hp["preprocessing"]),
                         finetune=self.finetune.to_dict(), head_scale=float(hp["head_scale"]),
                         base=dict(hp["base"] or {}), gene_aliases=bool(hp["gene_aliases"]))

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

    def on_train_start(self) -> None:
        counts = self.parameter_counts()
        log.info(
            "fine-tuning mode %r: %s trainable of %s parameters (%.2f%%)", self.finetune.mode,
            f"{counts['trainable_params']:,}", f"{counts['total_params']:,}",
            100 * counts["trainable_params"] / counts["total_params"],
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
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
