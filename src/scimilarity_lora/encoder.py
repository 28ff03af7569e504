"""SCimilarity's encoder, key for key, and loading a SCimilarity model folder as SCimilarity writes it.

The architecture reproduces ``scimilarity.nn_models.Encoder`` (scimilarity 0.4.1): ``network`` is a ModuleList of
``Sequential(Dropout, Linear, BatchNorm1d, PReLU)`` blocks and a final bare ``Linear`` to the latent space;
``forward`` L2-normalises. State-dict keys therefore match the released weights (``network.0.1.weight``, ...,
``network.3.weight``), so a downloaded ``model_v1.1`` folder loads unchanged.

A model folder holds ``encoder.ckpt`` (``{"state_dict": ...}``, written by ``torch.save``), ``gene_order.tsv``
and ``layer_sizes.json`` (the shape of every state-dict entry). We read the checkpoint with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scimilarity_lora.genes import read_gene_order, write_gene_order
from scimilarity_lora.sparse import SparseBatch, first_block

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.ckpt"
GENE_ORDER_FILE = "gene_order.tsv"
LAYER_SIZES_FILE = "layer_sizes.json"


class ModelFolderError(ValueError):
    """A SCimilarity model folder or checkpoint that cannot be loaded as given."""


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


# -- model folders --------------------------------------------------------------------------------------------
def config_from_layer_sizes(layer_sizes: dict[str, list[int]], n_genes: int) -> EncoderConfig:
    """Infer hidden sizes and latent dim from ``layer_sizes.json`` the way SCimilarity's CellEmbedding does."""
    linear = sorted(
        (k, v) for k, v in layer_sizes.items() if k.endswith("weight") and len(v) > 1
    )
    if len(linear) < 2:
        raise ModelFolderError(f"{LAYER_SIZES_FILE} lists {len(linear)} Linear weights; expected at least 2")
    # sort numerically: network.10.1 must come after network.9.1
    linear.sort(key=lambda kv: int(kv[0].split(".")[1]))
    return EncoderConfig(
        n_genes=n_genes,
        latent_dim=int(linear[-1][1][0]),
        hidden_dim=tuple(int(v[0]) for _, v in linear[:-1]),
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``torch.save``d checkpoint safely; unwrap SCimilarity's ``{"state_dict": ...}``."""
    if not path.is_file():
        raise ModelFolderError(f"missing file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(
            f"{path} is not a plain tensor checkpoint (refused to unpickle arbitrary objects): {e}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ModelFolderError(f"{path} is corrupt or truncated: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFolderError(f"{path} does not hold a state dict of tensors")
    return obj


def load_model_folder(path: str | Path) -> tuple[Encoder, list[str]]:
    """Load a SCimilarity model folder (e.g. the downloaded ``model_v1.1``): encoder with weights + gene order."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"SCimilarity model folder not found: {folder}")
    for name in (ENCODER_FILE, GENE_ORDER_FILE, LAYER_SIZES_FILE):
        if not (folder / name).is_file():
            raise ModelFolderError(f"SCimilarity model folder {folder} is missing {name}")
    genes = read_gene_order(folder / GENE_ORDER_FILE)
    try:
        layer_sizes = json.loads((folder / LAYER_SIZES_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{folder / LAYER_SIZES_FILE} is not valid JSON: {e}") from e
    config = config_from_layer_sizes(layer_sizes, n_genes=len(genes))
    first = layer_sizes.get("network.0.1.weight")
    if first is not None and first[1] != len(genes):
        raise ModelFolderError(
            f"{GENE_ORDER_FILE} lists {len(genes)} genes but {LAYER_SIZES_FILE} says the input layer takes "
            f"{first[1]}: the gene order does not belong to these weights"
        )
    encoder = Encoder.from_config(config)
    state = load_state_dict_file(folder / ENCODER_FILE)
    load_encoder_weights(encoder, state, source=str(folder / ENCODER_FILE))
    log.info(
        "loaded SCimilarity encoder from %s: %d genes, hidden %s, latent %d",
        folder, config.n_genes, list(config.hidden_dim), config.latent_dim,
    )
    return encoder, genes


def load_encoder_weights(encoder: Encoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load weights, turning key or shape mismatches into one readable error."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ModelFolderError(
            f"{source} does not fit the encoder architecture: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    encoder.load_state_dict(state)


def save_model_folder(encoder: Encoder, genes: list[str], path: str | Path) -> Path:
    """Write a folder in SCimilarity's own format (what ``Encoder.save_state`` + ``save_all`` produce)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if len(genes) != encoder.config.n_genes:
        raise ValueError(f"{len(genes)} genes for an encoder with {encoder.config.n_genes} inputs")
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    torch.save({"state_dict": state}, folder / ENCODER_FILE)
    (folder / LAYER_SIZES_FILE).write_text(json.dumps({k: list(v.size()) for k, v in state.items()}))
    write_gene_order(genes, folder / GENE_ORDER_FILE)
    return folder


@dataclass
class BaseModel:
    """The encoder fine-tuning starts from, with its gene order and provenance."""

    encoder: Encoder
    genes: list[str]
    is_pretrained: bool
    source: str


def load_base(
    pretrained_dir: str | None = None,
    gene_order_file: str | None = None,
    data_genes: list[str] | None = None,
    latent_dim: int = 128,
    hidden_dim: tuple[int, ...] | list[int] = (1024, 1024, 1024),
    dropout: float = 0.5,
    input_dropout: float = 0.4,
) -> BaseModel:
    """SCimilarity's weights from ``pretrained_dir`` or, without one, a randomly initialised stand-in.

    The stand-in has SCimilarity's architecture over ``gene_order_file`` (e.g. the real 28,231-gene order, for
    benchmarks) or else over the dataset's own genes. It is *not* SCimilarity: results from it say nothing about
    the pretrained model, so we warn loudly.
    """
    if pretrained_dir:
        encoder, genes = load_model_folder(pretrained_dir)
        return BaseModel(encoder, genes, True, str(pretrained_dir))
    if gene_order_file:
        genes, source = read_gene_order(gene_order_file), f"random init over {gene_order_file}"
    elif data_genes:
        genes, source = list(data_genes), "random init over the dataset's genes"
    else:
        raise ModelFolderError("no pretrained_dir, gene_order_file or data genes to build an encoder from")
    log.warning(
        "BASE MODEL IS NOT SCIMILARITY: %s (%d genes). Set model.pretrained_dir=/path/to/model_v1.1 to fine-tune "
        "the real pretrained weights.", source, len(genes),
    )
    encoder = Encoder(len(genes), latent_dim, tuple(hidden_dim), dropout, input_dropout)
    return BaseModel(encoder, genes, False, source)
