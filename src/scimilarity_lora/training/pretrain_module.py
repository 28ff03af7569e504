"""The pretraining LightningModule: SCimilarity's encoder and decoder trained with its objective (triplets mined in
the batch with the Cell Ontology's exclusions, on cosine distance, mixed with MSE reconstruction of the
log-normalised input: ``w * triplet + (1 - w) * mse``), all in :mod:`scimilarity_lora.model`."""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F

from scimilarity_lora.model.decoder import Decoder
from scimilarity_lora.model.encoder import Encoder, EncoderConfig
from scimilarity_lora.model.sparse import SparseBatch
from scimilarity_lora.model.triplet import mine_triplets, mixed_loss, triplet_loss

log = logging.getLogger(__name__)


class PretrainModule(L.LightningModule):
    def __init__(self, encoder_config: dict, classes: list[str], allowed_negative: list[list[bool]],
                 margin: float = 0.05, negative_selection: str = "semihard", triplet_weight: float = 0.001,
                 distance: str = "cosine", l1: float = 0.0, decoder_dropout: float | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        config = EncoderConfig.from_dict(encoder_config)
        self.encoder = Encoder.from_config(config)
        self.decoder = Decoder.for_encoder(config.n_genes, config.latent_dim, config.hidden_dim,
                                           config.dropout if decoder_dropout is None else decoder_dropout)
        allowed = torch.as_tensor(allowed_negative, dtype=torch.bool).reshape(len(classes), len(classes))
        self.register_buffer("allowed_negative", allowed, persistent=False)

    def losses(self, batch: tuple[Any, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        z = self.encoder(x)
        target = x.to_dense() if isinstance(x, SparseBatch) else x
        mse = F.mse_loss(self.decoder(z), target)
        distance = self.hparams["distance"]
        triplets = mine_triplets(z, y, self.allowed_negative, self.hparams["margin"], self.hparams["negative_selection"],
                                 distance=distance)
        triplet = triplet_loss(z, triplets, self.hparams["margin"], distance)
        loss = mixed_loss(triplet, mse, self.hparams["triplet_weight"])
        out = {"loss": loss, "triplet": triplet, "mse": mse,
               "n_triplets": torch.tensor(float(len(triplets))), "n_hard": torch.tensor(float(triplets.n_hard))}
        if self.hparams["l1"] and self.training:
            out["l1"] = self.l1_penalty()
            out["loss"] = loss + out["l1"]
        return out

    def l1_penalty(self) -> torch.Tensor:
        """SCimilarity 0.4.1's L1 penalty on the encoder's first Linear layer (weight and bias), scaled by the
        current learning rate: ``l1 * sum|W1| * lr``."""
        first = next(m for m in self.encoder.modules() if isinstance(m, torch.nn.Linear))
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self._trainer is not None else 1.0
        return self.hparams["l1"] * sum(p.abs().sum() for p in first.parameters()) * lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        n = len(batch[1])
        self.log_dict({f"train/{k}": v for k, v in out.items()}, on_step=False, on_epoch=True, batch_size=n,
                      prog_bar=False)
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, on_step=False, on_epoch=True, batch_size=len(batch[1]),
                      prog_bar=True)

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=5e-3))
        optimizer = factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "epoch"}}
