"""Fine-tuning modes for the encoder: LoRA adapters (peft), a frozen base (linear probe), or full fine-tuning.

Decision on BatchNorm: when the base is frozen (``lora`` and ``frozen`` modes) its BatchNorm layers stay in eval
mode, so SCimilarity's pretrained running statistics are used and never drift towards the fine-tuning data. The
adapter (plus the head) is then the entire change to the model, which keeps "base + adapter" reproducible from
the adapter files alone and limits forgetting. In ``full`` mode BatchNorm trains as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from scimilarity_lora.model.encoder import Encoder, EncoderConfig, linear_layer_names

Mode = Literal["lora", "frozen", "full"]
MODES: tuple[str, ...] = ("lora", "frozen", "full")
PRESETS: tuple[str, ...] = ("input", "hidden", "output", "all")
UNSEEN_GENE_POLICIES: tuple[str, ...] = ("freeze", "train")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=("all",))
    #: input-layer LoRA on genes absent from the training data: "freeze" (A's columns zero) or "train" (peft's init)
    unseen_genes: str = "freeze"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"finetune mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "lora":
            if self.unseen_genes not in UNSEEN_GENE_POLICIES:
                raise ValueError(f"lora.unseen_genes must be one of {UNSEEN_GENE_POLICIES}, got {self.unseen_genes!r}")
            if int(self.r) < 1:
                raise ValueError(f"lora.r must be a positive integer, got {self.r}")
            if float(self.alpha) <= 0:
                raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
            if not 0 <= float(self.dropout) < 1:
                raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        targets = d.get("target_modules", ("all",))
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(
            mode=str(d.get("mode", "lora")),
            r=int(d.get("r", 8)),
            alpha=float(d.get("alpha", 16.0)),
            dropout=float(d.get("dropout", 0.05)),
            target_modules=tuple(str(t) for t in targets),
            unseen_genes=str(d.get("unseen_genes", "freeze")),
        )

    def to_dict(self) -> dict:
        """The settings that define the model: LoRA's only in ``lora`` mode (elsewhere they mean nothing)."""
        if self.mode != "lora":
            return {"mode": self.mode}
        return {"mode": self.mode, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules), "unseen_genes": self.unseen_genes}


def resolve_target_modules(targets: Sequence[str], config: EncoderConfig) -> list[str]:
    """Expand presets (``input``, ``hidden``, ``output``, ``all``) into exact Linear module names."""
    by_role = linear_layer_names(config)
    valid = [n for names in by_role.values() for n in names]
    out: list[str] = []
    for t in targets:
        if t == "all":
            names = valid
        elif t in by_role:
            names = by_role[t]
        elif t in valid:
            names = [t]
        else:
            raise ValueError(
                f"lora.target_modules: unknown target {t!r}; use a preset {list(PRESETS)} "
                f"or exact Linear names {valid}"
            )
        out.extend(n for n in names if n not in out)
    if not out:
        raise ValueError("lora.target_modules selects no layer (the 'hidden' preset is empty for a 1-layer encoder)")
    return out


def prepare_encoder(encoder: Encoder, finetune: FinetuneConfig) -> nn.Module:
    """Return the module to train: the encoder wrapped with peft LoRA, frozen, or untouched."""
    if finetune.mode == "full":
        return encoder
    if finetune.mode == "frozen":
        for p in encoder.parameters():
            p.requires_grad_(False)
        return encoder
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=finetune.r,
        lora_alpha=finetune.alpha,
        lora_dropout=finetune.dropout,
        target_modules=resolve_target_modules(finetune.target_modules, encoder.config),
        bias="none",
    )
    return get_peft_model(encoder, lora_config)


def base_is_frozen(finetune: FinetuneConfig) -> bool:
    return finetune.mode in ("lora", "frozen")


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode: use (and keep) the pretrained running statistics."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def merged_encoder(module: nn.Module) -> Encoder:
    """A plain :class:`Encoder` with any LoRA weights folded in (inference pays nothing for the adapter)."""
    import copy

    module = copy.deepcopy(module)
    if hasattr(module, "merge_and_unload"):
        module = module.merge_and_unload()
    assert isinstance(module, Encoder), type(module)
    return module


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total



# -- LoRA that touches only the genes it has seen ---------------------------------------------------------------

def input_lora_layers(module: nn.Module, config: EncoderConfig) -> list[nn.Module]:
    """The peft LoRA layers on the encoder's first Linear (genes -> hidden), if LoRA targets it."""
    name = linear_layer_names(config)["input"][0]
    return [m for n, m in module.named_modules() if (n == name or n.endswith("." + name)) and hasattr(m, "lora_A")]


def freeze_unseen_genes(module: nn.Module, config: EncoderConfig, seen: torch.Tensor) -> int:
    """Zero the input layer's LoRA A on the columns of genes absent from the training data, and keep them zero.

    peft initialises A randomly and B at zero; once B moves, ``B @ A`` writes into every gene's column, including
    genes no training cell expressed (their A columns get no gradient but keep their random values). Zeroed, with
    their gradient masked, those columns stay exactly zero under Adam/AdamW (zero gradient, zero moments, decoupled
    weight decay of zero), so the merged weights of unseen genes are the base's. Returns the columns frozen.
    """
    seen = seen.to(torch.bool).reshape(-1)
    if seen.numel() != config.n_genes:
        raise ValueError(f"seen-gene mask has {seen.numel()} entries for an encoder over {config.n_genes} genes")
    layers = input_lora_layers(module, config)
    for layer in layers:
        for lora_a in layer.lora_A.values():
            weight = lora_a.weight
            weight._seen_genes = seen  # A is (r x genes): a column per gene
            with torch.no_grad():
                weight.mul_(seen.to(device=weight.device, dtype=weight.dtype))
            if not getattr(weight, "_unseen_gene_hook", False):
                weight.register_hook(lambda grad, w=weight: grad * w._seen_genes.to(grad.device, grad.dtype))
                weight._unseen_gene_hook = True
    return int((~seen).sum()) if layers else 0
