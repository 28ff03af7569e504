"""Model directories as adapters of one shared base, for :class:`~scimilarity_lora.model.multi_adapter.MultiAdapterClassifier`.

An adapter-only model directory (``lora`` or ``frozen`` over a base with a recorded sha256) becomes an
:class:`Adapter`: its peft LoRA weights and its head, with its classes and the base it needs. Directories trained on
another base, or with full fine-tuning (a whole encoder each), are refused by name.
"""

from __future__ import annotations

from pathlib import Path

from scimilarity_lora.inference.artifact import (ADAPTER_DIR, HEAD_FILE, ModelSpec, is_adapter_only, load_safetensors,
                                                 model_dir_genes, read_model_config)
from scimilarity_lora.model.classifier import ClassifierHead
from scimilarity_lora.model.folder import ModelFolderError
from scimilarity_lora.model.multi_adapter import Adapter, AdapterError, read_peft_lora


def read_adapter(model_dir: str | Path, name: str, base_sha256: str | None = None,
                 base_genes: list[str] | None = None) -> tuple[Adapter, ModelSpec]:
    """``model_dir`` as a named adapter; ``base_sha256`` and ``base_genes``: the served base, which the adapter must
    have trained on (its genes are the adapter's, unless the directory carries its own list)."""
    folder = Path(model_dir)
    config = read_model_config(folder)
    trained_on = dict(config.get("base") or {}).get("sha256")
    if base_sha256 is not None and trained_on != base_sha256:
        raise AdapterError(f"adapter {name!r} was trained on base {str(trained_on)[:16]}..., "
                           f"not on the served base {base_sha256[:16]}...")
    spec = ModelSpec.from_json(config, model_dir_genes(folder, config, base_genes))
    if not is_adapter_only(spec):
        raise AdapterError(f"{folder} ({spec.finetune.get('mode')} fine-tuning) carries a whole encoder, not an "
                           "adapter of a shared base")
    head = ClassifierHead(spec.encoder.latent_dim, len(spec.classes), spec.head_scale)
    try:
        head.load_state_dict(load_safetensors(folder / HEAD_FILE))
    except RuntimeError as e:
        raise ModelFolderError(f"{folder / HEAD_FILE} does not fit {len(spec.classes)} classes: {e}") from e
    updates = read_peft_lora(folder / ADAPTER_DIR) if spec.finetune.get("mode") == "lora" else {}
    meta = {"classes": list(spec.classes), "finetune": dict(spec.finetune), "base": dict(spec.base),
            "metrics": {k: v for k, v in (config.get("metrics") or {}).items() if isinstance(v, (int, float))}}
    return Adapter(name, updates, head.eval(), meta), spec
