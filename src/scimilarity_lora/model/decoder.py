"""SCimilarity's decoder, key for key with ``scimilarity.nn_models.Decoder`` (0.4.1): the embedding back to the
log-normalised expression of every gene. Pretraining reconstructs its input through it; a frozen decoder also
measures what an adapted encoder forgot (reconstruction error of cells it was not tuned on).

``network`` is ``Sequential(Linear, BatchNorm1d, PReLU)`` from the latent space, then ``Sequential(Dropout, Linear,
BatchNorm1d, PReLU)`` per further hidden layer, then a bare ``Linear`` to the genes. SCimilarity builds it with the
encoder's hidden sizes reversed, and saves it as ``decoder.ckpt`` (``{"state_dict": ...}``) beside ``encoder.ckpt``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Decoder(nn.Module):
    def __init__(self, n_genes: int, latent_dim: int = 128, hidden_dim: Sequence[int] = (1024, 1024, 1024),
                 dropout: float = 0.5) -> None:
        super().__init__()
        hidden_dim = list(hidden_dim)
        if n_genes < 1 or latent_dim < 1 or not hidden_dim or min(hidden_dim) < 1:
            raise ValueError(f"invalid decoder sizes: n_genes={n_genes}, hidden={hidden_dim}, latent={latent_dim}")
        self.n_genes, self.latent_dim, self.hidden_dim, self.dropout = n_genes, latent_dim, hidden_dim, dropout
        self.network = nn.ModuleList()
        for i, width in enumerate(hidden_dim):
            block = [nn.Linear(latent_dim if i == 0 else hidden_dim[i - 1], width), nn.BatchNorm1d(width), nn.PReLU()]
            self.network.append(nn.Sequential(*block) if i == 0 else nn.Sequential(nn.Dropout(p=dropout), *block))
        self.network.append(nn.Linear(hidden_dim[-1], n_genes))

    @classmethod
    def for_encoder(cls, n_genes: int, latent_dim: int, encoder_hidden_dim: Sequence[int],
                    dropout: float = 0.5) -> "Decoder":
        """The decoder SCimilarity pairs with an encoder: the same hidden sizes, in reverse order."""
        return cls(n_genes, latent_dim, list(reversed(list(encoder_hidden_dim))), dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.network:
            z = layer(z)
        return z
