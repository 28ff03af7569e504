"""Encoder + linear head: the one forward pass that training, evaluation, inference and serving all run."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scimilarity_lora.model.adapters import merged_encoder
from scimilarity_lora.model.encoder import Encoder, EncoderConfig
from scimilarity_lora.model.sparse import SparseBatch


class ClassifierHead(nn.Module):
    """Linear classifier on the L2-normalised embedding, which is first multiplied by ``scale``.

    SCimilarity embeddings have unit norm, so without a scale the logits start tiny and the head needs many steps
    to become confident; a fixed scale (as in cosine classifiers) fixes that without adding parameters.
    """

    def __init__(self, latent_dim: int, n_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.linear = nn.Linear(latent_dim, n_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z * self.scale)


class CellClassifier(nn.Module):
    """A SCimilarity encoder (plain, frozen, or wrapped by peft) followed by a :class:`ClassifierHead`."""

    def __init__(self, encoder: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    @classmethod
    def build(cls, config: EncoderConfig, n_classes: int, head_scale: float = 10.0) -> "CellClassifier":
        """A fresh classifier of the given architecture (weights to be loaded)."""
        return cls(Encoder.from_config(config), ClassifierHead(config.latent_dim, n_classes, head_scale))

    @property
    def latent_dim(self) -> int:
        return self.head.linear.in_features

    @property
    def n_classes(self) -> int:
        return self.head.linear.out_features

    def embed(self, x: "torch.Tensor | SparseBatch") -> torch.Tensor:
        return self.encoder(x)

    def logits_and_embedding(self, x: "torch.Tensor | SparseBatch") -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.head(z), z

    def forward(self, x: "torch.Tensor | SparseBatch") -> torch.Tensor:
        return self.head(self.encoder(x))

    def merged(self) -> "CellClassifier":
        """A copy whose encoder is a plain :class:`Encoder` with any LoRA folded in (no adapter cost at inference)."""
        return CellClassifier(merged_encoder(self.encoder), copy.deepcopy(self.head))
