"""SCimilarity model folders, as SCimilarity writes them, and the base encoder fine-tuning starts from.

A model folder holds ``encoder.ckpt`` (``{"state_dict": ...}``, written by ``torch.save``), ``gene_order.tsv``
and ``layer_sizes.json`` (the shape of every state-dict entry); SCimilarity's pretraining adds ``decoder.ckpt``
and ``label_ints.csv``. Checkpoints are read with ``torch.load(weights_only=True)``, which refuses pickled code.
A folder may hold ``encoder.safetensors`` instead of ``encoder.ckpt`` (the bases shipped in the package do).

``packaged:<name>`` names a base shipped inside the package (``resources/bases/<name>``, with its provenance);
runs record that name rather than a path, so they reload on any machine with the package installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from scimilarity_lora.genes import gene_order_hash, resolve_gene_order, read_gene_order, write_gene_order
from scimilarity_lora.model.encoder import Encoder, EncoderConfig

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.ckpt"
ENCODER_SAFETENSORS_FILE = "encoder.safetensors"
GENE_ORDER_FILE = "gene_order.tsv"
LAYER_SIZES_FILE = "layer_sizes.json"
DECODER_FILE = "decoder.ckpt"
LABEL_INTS_FILE = "label_ints.csv"
#: SCimilarity's architecture, used for a stand-in when the config leaves sizes unset
DEFAULT_LATENT_DIM = 128
DEFAULT_HIDDEN_DIM = (1024, 1024, 1024)
#: ``model.pretrained_dir`` prefix naming a base shipped in the package
PACKAGED_PREFIX = "packaged:"


class ModelFolderError(ValueError):
    """A SCimilarity model folder or checkpoint that cannot be loaded as given."""


def require_gene_order(genes: list[str], sha256: str | None, what: str) -> list[str]:
    """``genes`` (a base's order), if it is the one ``what`` recorded by hash (files that omit the 28,231 names)."""
    found = gene_order_hash(genes)
    if found != sha256:
        raise ModelFolderError(f"the base of {what} has another gene order (sha256 {found[:16]}...) than it was "
                               f"trained on ({str(sha256)[:16]}...)")
    return genes


def read_layer_sizes(path: Path) -> dict[str, list[int]]:
    """``layer_sizes.json``: a mapping of state-dict key -> shape (a list of positive integers)."""
    try:
        sizes = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from e
    ok = isinstance(sizes, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool)
                                                                 and 0 < n < 2**31 for n in v)
        for k, v in sizes.items())
    if not ok:
        raise ModelFolderError(f"{path} must map state-dict keys to shapes (lists of positive integers; [] for a scalar), e.g. "
                               '{"network.0.1.weight": [1024, 28231], ...}; got ' + str(sizes)[:100])
    return sizes


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


def packaged_bases() -> list[str]:
    """Names of the pretrained bases shipped in the package (``packaged:<name>``)."""
    from importlib import resources

    root = Path(str(resources.files("scimilarity_lora") / "resources" / "bases"))
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def resolve_model_dir(spec: str | Path) -> Path:
    """A model folder path, or ``packaged:<name>`` for a base shipped in the package."""
    text = str(spec)
    if not text.startswith(PACKAGED_PREFIX):
        return Path(spec)
    from importlib import resources

    name = text[len(PACKAGED_PREFIX):]
    if name not in packaged_bases():
        raise ModelFolderError(f"no packaged base named {name!r}; the package ships: {packaged_bases()}")
    return Path(str(resources.files("scimilarity_lora") / "resources" / "bases" / name))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``torch.save``d checkpoint (or a ``.safetensors`` file) safely; unwrap SCimilarity's
    ``{"state_dict": ...}``."""
    if not path.is_file():
        raise ModelFolderError(f"missing file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFolderError(f"{path} is corrupt or truncated: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(
            f"{path} is not a plain tensor checkpoint (refused to unpickle arbitrary objects): {e}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelFolderError(f"{path} is not a readable checkpoint (corrupt, truncated or another format): "
                               f"{type(e).__name__}: {str(e)[:200]}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFolderError(f"{path} does not hold a state dict of tensors")
    return obj


def load_model_folder(path: str | Path, dropout: float = 0.5,
                      input_dropout: float = 0.4) -> tuple[Encoder, list[str]]:
    """Load a SCimilarity model folder (e.g. the downloaded ``model_v1.1``): encoder with weights + gene order.

    Sizes come from the folder; dropout rates are training choices the folder does not record, so they are given."""
    folder = resolve_model_dir(path)
    if not folder.is_dir():
        raise ModelFolderError(f"SCimilarity model folder not found: {folder}")
    encoder_file = folder / ENCODER_FILE
    if not encoder_file.is_file() and (folder / ENCODER_SAFETENSORS_FILE).is_file():
        encoder_file = folder / ENCODER_SAFETENSORS_FILE
    for name in (encoder_file.name, GENE_ORDER_FILE, LAYER_SIZES_FILE):
        if not (folder / name).is_file():
            raise ModelFolderError(f"SCimilarity model folder {folder} is missing {name}")
    genes = read_gene_order(folder / GENE_ORDER_FILE)
    layer_sizes = read_layer_sizes(folder / LAYER_SIZES_FILE)
    config = config_from_layer_sizes(layer_sizes, n_genes=len(genes))
    first = layer_sizes.get("network.0.1.weight")
    if first is not None and first[1] != len(genes):
        raise ModelFolderError(
            f"{GENE_ORDER_FILE} lists {len(genes)} genes but {LAYER_SIZES_FILE} says the input layer takes "
            f"{first[1]}: the gene order does not belong to these weights"
        )
    # the weights first, checked against the JSON, and only then the encoder: a 108-byte layer_sizes.json asking
    # for hidden sizes [1e6, 1e6] must not allocate gigabytes before anything is verified
    state = load_state_dict_file(encoder_file)
    wrong = [f"{k}: file {tuple(v.shape)} vs {LAYER_SIZES_FILE} {layer_sizes[k]}" for k, v in state.items()
             if k in layer_sizes and list(v.shape) != list(layer_sizes[k])]
    if wrong:
        raise ModelFolderError(f"{encoder_file} does not match {folder / LAYER_SIZES_FILE}: {wrong[:3]}")
    encoder = Encoder.from_config(EncoderConfig(config.n_genes, config.latent_dim, config.hidden_dim, dropout,
                                                input_dropout))
    load_encoder_weights(encoder, state, source=str(encoder_file))
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


def save_model_folder(encoder: Encoder, genes: list[str], path: str | Path, safetensors: bool = False) -> Path:
    """Write a folder in SCimilarity's own format (what ``Encoder.save_state`` + ``save_all`` produce), or with
    ``encoder.safetensors`` in place of ``encoder.ckpt`` (``safetensors=True``; SCimilarity itself reads only the
    latter)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if len(genes) != encoder.config.n_genes:
        raise ValueError(f"{len(genes)} genes for an encoder with {encoder.config.n_genes} inputs")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(folder / ENCODER_SAFETENSORS_FILE))
    else:
        torch.save({"state_dict": state}, folder / ENCODER_FILE)
    (folder / LAYER_SIZES_FILE).write_text(json.dumps({k: list(v.size()) for k, v in state.items()}))
    write_gene_order(genes, folder / GENE_ORDER_FILE)
    return folder


def stored_base_path(store: str | Path, sha256: str) -> Path:
    """Where :func:`store_base_folder` keeps the base whose weights hash to ``sha256``."""
    return Path(store).resolve() / sha256[:16]


def store_base_folder(encoder: Encoder, genes: list[str], store: str | Path) -> Path:
    """Keep a base once in a content-addressed store: ``<store>/<sha256 prefix of its weights>`` in SCimilarity's
    format. Runs of a sweep that share a stand-in base share its one copy; concurrent writers (parallel sweep jobs)
    each write a private folder and rename it into place, and whoever comes second discards theirs."""
    folder = stored_base_path(store, state_dict_hash(encoder.state_dict()))
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    save_model_folder(encoder, genes, tmp)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_pretrained_folder(encoder: Encoder, decoder: torch.nn.Module, genes: list[str], classes: list[str],
                           path: str | Path, hyperparameters: dict | None = None) -> Path:
    """What SCimilarity's ``MetricLearning.save_all`` writes: the encoder folder plus ``decoder.ckpt``,
    ``label_ints.csv`` (label int -> name, pandas' quoted CSV) and ``hyperparameters.json``."""
    import csv

    folder = save_model_folder(encoder, genes, path)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in decoder.state_dict().items()}}, folder / DECODER_FILE)
    with open(folder / LABEL_INTS_FILE, "w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(["", "0"])
        for i, name in enumerate(classes):
            writer.writerow([i, name])
    if hyperparameters is not None:
        (folder / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))
    return folder


def load_decoder(folder: str | Path, encoder_config: EncoderConfig, dropout: float = 0.5) -> torch.nn.Module:
    """The folder's ``decoder.ckpt`` (SCimilarity's pretraining output), loaded safely into our Decoder."""
    from scimilarity_lora.model.decoder import Decoder

    decoder = Decoder.for_encoder(encoder_config.n_genes, encoder_config.latent_dim, encoder_config.hidden_dim, dropout)
    state = load_state_dict_file(Path(folder) / DECODER_FILE)
    try:
        decoder.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFolderError(f"{Path(folder) / DECODER_FILE} does not fit the encoder's architecture: {e}") from e
    return decoder


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class BaseModel:
    """The encoder fine-tuning starts from, with its gene order and provenance."""

    encoder: Encoder
    genes: list[str]
    is_pretrained: bool
    source: str


def load_base(
    pretrained_dir: str | None = None,
    gene_order: str | None = None,
    data_genes: Sequence[str] | None = None,
    latent_dim: int | None = None,
    hidden_dim: Sequence[int] | None = None,
    dropout: float = 0.5,
    input_dropout: float = 0.4,
) -> BaseModel:
    """SCimilarity's weights from ``pretrained_dir`` or, without one, a randomly initialised stand-in.

    With ``pretrained_dir`` the folder defines the architecture and the gene order: sizes given here must agree with
    it (an error names both), and so must a ``gene_order``. The stand-in has SCimilarity's architecture (or the
    sizes given) over ``gene_order`` (``"scimilarity"`` for the packaged 28,231 genes, or a file) or else over the
    dataset's own genes. It is *not* SCimilarity: results from it say nothing about the pretrained model, so we
    warn loudly.
    """
    if pretrained_dir:
        encoder, genes = load_model_folder(pretrained_dir, dropout, input_dropout)
        if gene_order and list(resolve_gene_order(gene_order)) != list(genes):
            raise ModelFolderError(
                f"model.gene_order={gene_order!r} ({len(resolve_gene_order(gene_order)):,} genes) but the model folder "
                f"{pretrained_dir} has another gene order ({len(genes):,} genes in its gene_order.tsv); the folder "
                "defines it: set model.gene_order=null (data=h5ad picks model=scimilarity_full, whose gene_order is "
                "SCimilarity's 28,231 genes)")
        _check_sizes(encoder.config, latent_dim, hidden_dim, pretrained_dir)
        return BaseModel(encoder, genes, True, str(pretrained_dir))
    if gene_order:
        genes, source = resolve_gene_order(gene_order), f"random init over gene order {gene_order!r}"
    elif data_genes:
        genes, source = list(data_genes), "random init over the dataset's genes"
    else:
        raise ModelFolderError("no pretrained_dir, gene_order or data genes to build an encoder from")
    log.warning(
        "BASE MODEL IS NOT SCIMILARITY: %s (%d genes). Set model.pretrained_dir=/path/to/model_v1.1 to fine-tune "
        "the real pretrained weights.", source, len(genes),
    )
    encoder = Encoder(len(genes), latent_dim or DEFAULT_LATENT_DIM, tuple(hidden_dim or DEFAULT_HIDDEN_DIM),
                      dropout, input_dropout)
    return BaseModel(encoder, genes, False, source)


def _check_sizes(config: EncoderConfig, latent_dim: int | None, hidden_dim: Sequence[int] | None,
                 folder: str) -> None:
    if latent_dim is not None and int(latent_dim) != config.latent_dim:
        raise ModelFolderError(f"model.latent_dim={latent_dim} but the model folder {folder} has latent dimension "
                               f"{config.latent_dim}; unset model.latent_dim (the folder defines it)")
    if hidden_dim is not None and tuple(int(h) for h in hidden_dim) != config.hidden_dim:
        raise ModelFolderError(f"model.hidden_dim={list(hidden_dim)} but the model folder {folder} has hidden "
                               f"sizes {list(config.hidden_dim)}; unset model.hidden_dim (the folder defines it)")
