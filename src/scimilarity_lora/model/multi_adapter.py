"""Many LoRA adapters over one frozen base encoder, in one forward pass (the S-LoRA / LoRAX idea for cells).

A batch mixes rows for different adapters. The base's matmuls run once for the whole batch; each adapter adds its
low-rank update ``scaling * (x @ A.T) @ B.T`` only to its own rows (a forward hook on every base Linear it targets);
each adapter's classification head reads only its rows. Rows of an adapter get exactly what that adapter's merged
model computes, up to float rounding: BatchNorm uses the base's running statistics, which LoRA training keeps frozen.

Adapters are read from peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``). Only plain LoRA
is supported (no DoRA or other variants: their update is not a low-rank add). Pure torch: no Lightning, no peft.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from scimilarity_lora.model.classifier import ClassifierHead
from scimilarity_lora.model.encoder import Encoder

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be served over this base."""


@dataclass
class LowRankUpdate:
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float


@dataclass
class Adapter:
    """One served model: LoRA updates by base module name (empty for a frozen-base model) and its head."""

    name: str
    updates: dict[str, LowRankUpdate]
    head: ClassifierHead
    meta: dict = field(default_factory=dict)

    @property
    def n_parameters(self) -> int:
        return sum(u.A.numel() + u.B.numel() for u in self.updates.values()) + sum(
            p.numel() for p in self.head.parameters())


def read_peft_lora(adapter_dir: str | Path) -> dict[str, LowRankUpdate]:
    """LoRA updates from a peft adapter directory, by the base module they modify (e.g. ``network.0.1``)."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder} is not a peft adapter directory: {e}") from e
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise AdapterError(f"{folder}: only plain LoRA adapters can be served together (got {config.get('peft_type')}"
                           f"{', DoRA' if config.get('use_dora') else ''})")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{folder}: per-layer rank/alpha patterns are not supported")
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    updates = {}
    for key, A in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")] if key.startswith(PEFT_PREFIX) else key[:-len(".lora_A.weight")]
        B = weights.get(key.replace(".lora_A.", ".lora_B."))
        if B is None:
            raise AdapterError(f"{folder}: {key} has no matching lora_B")
        updates[module] = LowRankUpdate(A.float(), B.float(), scaling)
    if not updates:
        raise AdapterError(f"{folder}: no LoRA weights found")
    return updates


class MultiAdapterClassifier(nn.Module):
    """One base :class:`Encoder` (kept in eval mode) and any number of named adapters, served in mixed batches."""

    def __init__(self, base: Encoder) -> None:
        super().__init__()
        self.base = base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapters: dict[str, Adapter] = {}
        self._linears = {name: m for name, m in self.base.named_modules() if isinstance(m, nn.Linear)}
        self._groups: list[tuple[Adapter, torch.Tensor]] | None = None
        for name, module in self._linears.items():
            module.register_forward_hook(self._hook(name))

    # -- the set of adapters ----------------------------------------------------------------------------------
    def add(self, adapter: Adapter) -> None:
        self.check(adapter)
        self.adapters[adapter.name] = adapter

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter that does not fit the base, before anything is registered."""
        for module, u in adapter.updates.items():
            linear = self._linears.get(module)
            if linear is None:
                raise AdapterError(f"adapter {adapter.name!r} targets {module}, which the base does not have")
            if tuple(u.A.shape[1:]) != (linear.in_features,) or u.B.shape[0] != linear.out_features:
                raise AdapterError(f"adapter {adapter.name!r} does not fit the base's {module}: A {tuple(u.A.shape)}, "
                                   f"B {tuple(u.B.shape)} vs Linear({linear.in_features}, {linear.out_features})")
        if adapter.head.linear.in_features != self.base.latent_dim:
            raise AdapterError(f"adapter {adapter.name!r}'s head reads {adapter.head.linear.in_features} dimensions, "
                               f"the base embeds in {self.base.latent_dim}")

    def remove(self, name: str) -> Adapter:
        return self.adapters.pop(name)

    # -- mixed batches ----------------------------------------------------------------------------------------
    def _hook(self, module_name: str):
        def add_updates(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not self._groups:
                return output
            x = inputs[0]
            for adapter, rows in self._groups:
                u = adapter.updates.get(module_name)
                if u is not None:
                    xr = x.index_select(0, rows)
                    output = output.index_add(0, rows, (xr @ u.A.T) @ u.B.T, alpha=u.scaling)
            return output

        return add_updates

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, names: Sequence[str], adapters: dict[str, Adapter] | None = None
                ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Dense ``x`` (rows preprocessed for the base's genes) and the adapter name of each row ->
        (embeddings of every row, ``{name: (row indices, logits of those rows)}``). ``adapters``: the set to use
        (a snapshot the caller holds), else the registered ones."""
        if len(names) != x.shape[0]:
            raise ValueError(f"{len(names)} adapter names for {x.shape[0]} rows")
        adapters = self.adapters if adapters is None else adapters
        unknown = sorted(set(names) - set(adapters))
        if unknown:
            raise KeyError(f"unknown adapters {unknown}; served: {sorted(self.adapters)}")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        self._groups = [(adapters[n], torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items()]
        try:
            z = self.base(x)
        finally:
            self._groups = None
        out = {}
        for name, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.long)
            out[name] = (index, adapters[name].head(z.index_select(0, index)))
        return z, out
