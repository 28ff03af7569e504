"""The trained-model directory: what training writes and what evaluation, annotation and serving load.

::

    model/
      model_config.json      format, encoder architecture, classes, preprocessing, fine-tuning config, base identity,
                             the sha256 of the gene order
      gene_order.tsv         the encoder's input genes, one per line (SCimilarity's format): only in a *merged*
                             directory; an adapter-only one takes them from its base
      encoder.safetensors    the encoder with LoRA merged in, SCimilarity's state-dict keys: only in a *merged*
                             directory (full fine-tuning, or what export puts in the BentoML store)
      head.safetensors       the classification head
      adapter/               (LoRA runs) the adapter in peft's own format (adapter_config.json +
                             adapter_model.safetensors; ``PeftModel.from_pretrained(base_encoder, adapter/)`` loads
                             it), and seen_genes.safetensors: the training data's gene coverage

With a frozen base (``lora``, ``frozen``) a run's directory is *adapter-only*: no encoder.safetensors and no gene
list (both are the base's; the gene list is 0.22 MB for SCimilarity's 28,231 genes, a fifth of an r=8 adapter), the
base is the one ``model_config.json`` names (its folder and the sha256 of its weights), reloaded and checked on read
(its gene order against the recorded hash); the adapter is applied with peft and merged. A run directory thus costs
the adapter and head, and the base is stored once however many runs fine-tune it.

Only safetensors and JSON: loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scimilarity_lora.genes import gene_order_hash, read_gene_order, write_gene_order
from scimilarity_lora.model.classifier import CellClassifier
from scimilarity_lora.model.encoder import EncoderConfig
from scimilarity_lora.model.folder import ModelFolderError, load_encoder_weights, require_gene_order
from scimilarity_lora.preprocess import Preprocessing
from scimilarity_lora.user_errors import no_space_is_a_user_error

FORMAT = "scimilarity-lora/1"
CONFIG_FILE = "model_config.json"
GENE_ORDER_FILE = "gene_order.tsv"
ENCODER_FILE = "encoder.safetensors"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"


@dataclass
class ModelSpec:
    """Everything about a trained classifier except its weights: the contract inference must honour."""

    encoder: EncoderConfig
    genes: list[str]
    classes: list[str]
    preprocessing: Preprocessing
    finetune: dict
    head_scale: float = 10.0
    #: identity of the encoder fine-tuning started from: is_pretrained, source (folder), sha256 of its state dict
    base: dict = field(default_factory=dict)
    #: rescue old/alias gene symbols when aligning (training's ``data.gene_aliases``)
    gene_aliases: bool = True
    #: Cell Ontology: ``class_terms`` (class -> CL id or null), ``coarse_terms`` (the ancestors the model may
    #: answer, each with its class indices), ``release``; empty for a model trained without CL ids
    ontology: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "encoder": self.encoder.to_dict(), "classes": list(self.classes),
                "preprocessing": self.preprocessing.to_dict(), "finetune": dict(self.finetune),
                "head_scale": self.head_scale, "base": dict(self.base), "gene_aliases": self.gene_aliases,
                "gene_order_sha256": gene_order_hash(self.genes), "ontology": dict(self.ontology)}

    @classmethod
    def from_json(cls, d: dict, genes: list[str]) -> "ModelSpec":
        return cls(encoder=EncoderConfig.from_dict(d["encoder"]), genes=genes, classes=list(d["classes"]),
                   preprocessing=Preprocessing.from_dict(d["preprocessing"]), finetune=dict(d["finetune"]),
                   head_scale=float(d["head_scale"]), base=dict(d.get("base") or {}),
                   gene_aliases=bool(d.get("gene_aliases", True)), ontology=dict(d.get("ontology") or {}))


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def is_adapter_only(spec: ModelSpec) -> bool:
    """A frozen base with a recorded identity: the directory needs only what training changed."""
    return _frozen_recorded_base(spec.finetune, spec.base)


def _frozen_recorded_base(finetune: dict, base: dict) -> bool:
    return finetune.get("mode") in ("lora", "frozen") and bool(base.get("sha256"))


def save_model_dir(classifier: CellClassifier, spec: ModelSpec, path: str | Path, extra: dict | None = None,
                   seen_genes: torch.Tensor | None = None, merged: bool | None = None) -> Path:
    """Write a trained classifier with its spec as a model directory: adapter-only for a frozen base with a
    recorded identity, else (or with ``merged=True``) with the encoder, LoRA merged in."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps({**spec.to_json(), **(extra or {})}, indent=2, default=str))
    if merged or (merged is None and not is_adapter_only(spec)):
        write_merged_encoder(classifier, spec.genes, out)
    save_file(_tensors(classifier.head), out / HEAD_FILE)
    if hasattr(classifier.encoder, "save_pretrained"):
        classifier.encoder.save_pretrained(out / ADAPTER_DIR)
        if seen_genes is not None:
            save_file({"seen_genes": seen_genes.detach().cpu().to(torch.uint8)}, out / ADAPTER_DIR / "seen_genes.safetensors")
    return out


@contextmanager
def atomic_model_dir(final: str | Path):
    """Write a model directory completely beside ``final``, then swap it into place: a crash or a full disk
    leaves the previous directory (or none), never a half-written one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with no_space_is_a_user_error(tmp):
            yield tmp
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_merged_encoder(classifier: CellClassifier, genes: list[str], folder: str | Path) -> Path:
    """``encoder.safetensors`` with any LoRA folded in, and its ``gene_order.tsv``: a directory that needs no base
    to load."""
    save_file(_tensors(classifier.merged().encoder), Path(folder) / ENCODER_FILE)
    write_gene_order(genes, Path(folder) / GENE_ORDER_FILE)
    return Path(folder) / ENCODER_FILE


def read_model_config(path: str | Path) -> dict:
    """The directory's ``model_config.json`` (spec plus training metrics and config), validated."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model directory not found: {folder}")
    for name in (CONFIG_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise ModelFolderError(f"model directory {folder} is missing {name}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from e
    if config.get("format") != FORMAT:
        raise ModelFolderError(f"{folder} has format {config.get('format')!r}, expected {FORMAT!r}")
    if not (folder / GENE_ORDER_FILE).is_file() and not _names_its_base_genes(config):
        raise ModelFolderError(f"model directory {folder} is missing {GENE_ORDER_FILE}")
    return config


def _names_its_base_genes(config: dict) -> bool:
    """An adapter-only directory may leave the gene list to its base, naming it by hash."""
    return (_frozen_recorded_base(dict(config.get("finetune") or {}), dict(config.get("base") or {}))
            and bool(config.get("gene_order_sha256")))


def model_dir_genes(folder: str | Path, config: dict, base_genes: list[str] | None) -> list[str]:
    """The directory's gene order: its ``gene_order.tsv``, or else its base's (``base_genes``), which must hash to
    what the directory recorded."""
    path = Path(folder) / GENE_ORDER_FILE
    if path.is_file():
        return read_gene_order(path)
    if base_genes is None:
        raise ModelFolderError(f"model directory {folder} takes its genes from its base, and none was given")
    return require_gene_order(list(base_genes), config.get("gene_order_sha256"), str(folder))


def read_model_dir(path: str | Path, base_dir: str | Path | None = None) -> tuple[ModelSpec, CellClassifier, dict[str, Any]]:
    """(spec, classifier with weights loaded, the full config) with clear errors for anything missing or corrupt.

    An adapter-only directory reloads its recorded base (from ``base_dir`` if given, e.g. where the BentoML store
    keeps it; else the folder training recorded), refuses one whose weights or gene order differ, and applies the
    peft adapter."""
    folder = Path(path)
    config = read_model_config(folder)
    base = base_genes = None
    if not (folder / GENE_ORDER_FILE).is_file():  # adapter-only: the gene list is the base's, loaded here once
        from scimilarity_lora.inference.runs import recorded_base

        base, base_genes = recorded_base(folder.parent, _base_record(dict(config.get("base") or {}), base_dir))
    genes = model_dir_genes(folder, config, base_genes)
    try:
        spec = ModelSpec.from_json(config, genes)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder / CONFIG_FILE} is incomplete: {type(e).__name__}: {e}") from e
    if len(genes) != spec.encoder.n_genes:
        raise ModelFolderError(
            f"{folder}/{GENE_ORDER_FILE} lists {len(genes)} genes but the encoder takes {spec.encoder.n_genes}")
    classifier = CellClassifier.build(spec.encoder, len(spec.classes), spec.head_scale)
    if (folder / ENCODER_FILE).is_file():
        load_encoder_weights(classifier.encoder, load_safetensors(folder / ENCODER_FILE),
                             source=str(folder / ENCODER_FILE))
    elif is_adapter_only(spec):
        classifier.encoder.load_state_dict(encoder_from_base(folder, spec, base_dir, base=base).state_dict())
    else:
        raise ModelFolderError(f"model directory {folder} is missing {ENCODER_FILE}")
    try:
        classifier.head.load_state_dict(load_safetensors(folder / HEAD_FILE))
    except RuntimeError as e:
        raise ModelFolderError(f"{folder / HEAD_FILE} does not fit {len(spec.classes)} classes: {e}") from e
    return spec, classifier.eval(), config


def _base_record(base: dict, base_dir: str | Path | None) -> dict:
    """The recorded base identity, pointed at ``base_dir`` when the base is kept elsewhere (the BentoML store)."""
    return dict(base, path=str(base_dir)) if base_dir is not None else base


def encoder_from_base(folder: Path, spec: ModelSpec, base_dir: str | Path | None = None,
                      base: torch.nn.Module | None = None) -> torch.nn.Module:
    """The recorded base (or ``base``, already loaded and checked) with the directory's peft adapter applied and
    merged (frozen mode: the base as is)."""
    from scimilarity_lora.inference.runs import load_recorded_base

    encoder = base if base is not None else load_recorded_base(folder.parent, _base_record(spec.base, base_dir),
                                                                spec.genes)
    if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        if spec.finetune.get("mode") == "lora":
            raise ModelFolderError(f"model directory {folder} is missing {ADAPTER_DIR}/adapter_config.json")
        return encoder
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(encoder, str(folder / ADAPTER_DIR)).merge_and_unload()
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelFolderError(f"{folder / ADAPTER_DIR} is not a loadable adapter for this base: {e}") from e


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a :class:`ModelFolderError` naming the file."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path} is corrupt or truncated: {e}") from e
