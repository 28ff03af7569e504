"""The trained-model directory: what training writes and what evaluation, annotation and serving load.

::

    model/
      model_config.json      format, encoder architecture, classes, preprocessing, fine-tuning config
      gene_order.tsv         the encoder's input genes, one per line (SCimilarity's format)
      encoder.safetensors    the encoder with LoRA merged in, SCimilarity's state-dict keys
      head.safetensors       the classification head
      adapter/               (LoRA runs) the unmerged adapter in peft's own format

Only safetensors and JSON: loading never unpickles anything. Lightning checkpoints (for resuming) are read with
``weights_only=True`` by :func:`load_lightning_checkpoint`.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scimilarity_lora.encoder import ModelFolderError
from scimilarity_lora.genes import read_gene_order, write_gene_order
from scimilarity_lora.lora import encoder_state_for_export

FORMAT = "scimilarity-lora/1"
CONFIG_FILE = "model_config.json"


def save_model_dir(module: Any, path: str | Path, extra: dict | None = None) -> Path:
    """Write a :class:`~scimilarity_lora.module.CellTypeClassifier` as a self-contained model directory."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    config = {
        "format": FORMAT,
        "encoder": dict(hp["encoder_config"]),
        "classes": list(hp["classes"]),
        "preprocessing": dict(hp["preprocessing"]),
        "finetune": module.finetune.to_dict(),
        "head_scale": float(hp["head_scale"]),
        "base_is_pretrained": bool(hp["base_is_pretrained"]),
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    write_gene_order(list(hp["gene_order"]), out / "gene_order.tsv")
    save_file(encoder_state_for_export(module.encoder), out / "encoder.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.head.state_dict().items()}, out / "head.safetensors")
    if hasattr(module.encoder, "save_pretrained"):
        module.encoder.save_pretrained(out / "adapter")
    return out


def read_model_dir(path: str | Path) -> tuple[dict, list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, gene order, encoder state, head state) with clear errors for anything missing or corrupt."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model directory not found: {folder}")
    for name in (CONFIG_FILE, "gene_order.tsv", "encoder.safetensors", "head.safetensors"):
        if not (folder / name).is_file():
            raise ModelFolderError(f"model directory {folder} is missing {name}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from e
    if config.get("format") != FORMAT:
        raise ModelFolderError(f"{folder} has format {config.get('format')!r}, expected {FORMAT!r}")
    genes = read_gene_order(folder / "gene_order.tsv")
    if len(genes) != int(config["encoder"]["n_genes"]):
        raise ModelFolderError(
            f"{folder}/gene_order.tsv lists {len(genes)} genes but the encoder takes {config['encoder']['n_genes']}"
        )
    states = []
    for name in ("encoder.safetensors", "head.safetensors"):
        try:
            states.append(load_file(folder / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFolderError(f"{folder / name} is corrupt or truncated: {e}") from e
    return config, genes, states[0], states[1]


def load_lightning_checkpoint(path: str | Path) -> dict:
    """Read a Lightning ``.ckpt`` without unpickling code; clear errors for corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(f"{path} holds objects other than tensors and plain values; refused: {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ModelFolderError(f"{path} is corrupt or truncated: {e}") from e


def classifier_from_checkpoint(path: str | Path) -> Any:
    """Rebuild a :class:`CellTypeClassifier` from a Lightning checkpoint, safely."""
    from scimilarity_lora.module import CellTypeClassifier

    ckpt = load_lightning_checkpoint(path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ModelFolderError(f"{path} is not a scimilarity-lora Lightning checkpoint")
    hp = dict(ckpt["hyper_parameters"])
    hp.pop("base_state_dict", None)
    model = CellTypeClassifier(**hp)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelFolderError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
