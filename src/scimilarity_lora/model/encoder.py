"""SCimilarity's encoder, key for key (pure torch; reading and writing model folders is in :mod:`.folder`).

The architecture reproduces ``scimilarity.nn_models.Encoder`` (scimilarity 0.4.1): ``network`` is a ModuleList of
``Sequential(Dropout, Linear, BatchNorm1d, PReLU)`` blocks and a final bare ``Linear`` to the latent space;
``forward`` L2-normalises. State-dict keys therefore match the released weights (``network.0.1.weight``, ...,
``network.3.weight``), so a downloaded ``model_v1.1`` folder loads unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from scimilarity_lora.model.sparse import SparseBatch, first_block


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild the encoder's architecture (weights come separately)."""

    n_genes: int
    latent_dim: int = 128
    hidden_dim: tuple[int, ...] = field(default=(1024, 1024, 1024))
    dropout: float = 0.5
    input_dropout: float = 0.4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_dim"] = list(self.hidden_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        return cls(
            n_genes=int(d["n_genes"]),
            latent_dim=int(d["latent_dim"]),
            hidden_dim=tuple(int(h) for h in d["hidden_dim"]),
            dropout=float(d["dropout"]),
            input_dropout=float(d["input_dropout"]),
        )


class Encoder(nn.Module):
    """SCimilarity's encoder: genes -> L2-normalised latent embedding."""

    def __init__(
        self,
        n_genes: int,
        latent_dim: int = 128,
        hidden_dim: tuple[int, ...] | list[int] = (1024, 1024, 1024),
        dropout: float = 0.5,
        input_dropout: float = 0.4,
    ) -> None:
        super().__init__()
        hidden_dim = list(hidden_dim)
        if n_genes < 1 or latent_dim < 1 or not hidden_dim or min(hidden_dim) < 1:
            raise ValueError(f"invalid encoder sizes: n_genes={n_genes}, hidden={hidden_dim}, latent={latent_dim}")
        self.config = EncoderConfig(n_genes, latent_dim, tuple(hidden_dim), dropout, input_dropout)
        self.latent_dim = latent_dim
        self.network = nn.ModuleList()
        for i, width in enumerate(hidden_dim):
            self.network.append(
                nn.Sequential(
                    nn.Dropout(p=input_dropout if i == 0 else dropout),
                    nn.Linear(n_genes if i == 0 else hidden_dim[i - 1], width),
                    nn.BatchNorm1d(width),
                    nn.PReLU(),
                )
            )
        self.network.append(nn.Linear(hidden_dim[-1], latent_dim))

    @classmethod
    def from_config(cls, config: EncoderConfig) -> "Encoder":
        return cls(config.n_genes, config.latent_dim, config.hidden_dim, config.dropout, config.input_dropout)

    def gene_major_first_layer(self) -> "Encoder":
        """Keep the first layer's weight (hidden x genes) in gene-major memory order, for inference.

        The sparse first layer reads that weight one gene row at a time (``embedding_bag`` over ``weight.T``); stored
        as is, a frozen weight gets a transposed copy beside it (115 MB at 28,231 genes x 1,024). Stored gene-major,
        ``weight.T`` is already contiguous and no copy is made. Values, dense results and the state dict's contents
        are unchanged; only the strides differ (safetensors writers here call ``.contiguous()``)."""
        first = self.network[0][1]
        linear = getattr(first, "base_layer", first)  # a peft LoRA layer wraps the Linear
        if not linear.weight.t().is_contiguous():
            linear.weight.data = linear.weight.detach().t().contiguous().t()
        return self

    def forward(self, x: "torch.Tensor | SparseBatch") -> torch.Tensor:
        layers = iter(self.network)
        if isinstance(x, SparseBatch):  # the first layer reads only the non-zero genes (see sparse.py)
            x = first_block(next(layers), x)
        for layer in layers:
            x = layer(x)
        return F.normalize(x, p=2, dim=1)


def linear_layer_names(config: EncoderConfig) -> dict[str, list[str]]:
    """Names of the encoder's Linear layers by role: the targets LoRA can attach to."""
    n_hidden = len(config.hidden_dim)
    return {
        "input": ["network.0.1"],
        "hidden": [f"network.{i}.1" for i in range(1, n_hidden)],
        "output": [f"network.{n_hidden}"],
    }
