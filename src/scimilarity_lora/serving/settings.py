"""Service settings, from environment variables (read once, when the service module is imported: BentoML needs
``workers`` when the service class is defined)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def _flag(name: str, default: bool = True) -> bool:
    return os.environ.get(name, "1" if default else "0") == "1"


@dataclass(frozen=True)
class Settings:
    model_tag: str = "scimilarity_lora:latest"  # a merged model, or a base (scimilarity_base:...) to serve adapters
    adapters: tuple[str, ...] = ()      # adapters of that base to serve (default: all of them in the store)
    default_model: str | None = None    # the adapter that requests without "model" go to (default: first by name)
    admin_token: str | None = None      # enables /v1/admin/adapters (add/remove adapters while serving)
    reference: str = ""                 # reference index dir (default model), or name=dir,name=dir (one per adapter)
    max_genes: int = 40_000            # genes per cell / per sparse block
    max_cells: int = 10_000            # cells per request
    max_nnz: int = 5_000_000           # non-zeros per request
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch_rows: int = 256          # cells per forward pass of the micro-batcher
    body_timeout_s: float = 30.0       # a request body must arrive within this (slow clients get 408)
    torch_threads: int = 4
    workers: int = 1
    metrics: bool = True
    access_log: bool = True
    monitoring: bool = True

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            model_tag=os.environ.get("SCIMILARITY_LORA_MODEL", cls.model_tag),
            adapters=tuple(a for a in os.environ.get("SCIMILARITY_LORA_ADAPTERS", "").split(",") if a),
            default_model=os.environ.get("SCIMILARITY_LORA_DEFAULT_MODEL") or None,
            admin_token=os.environ.get("SCIMILARITY_LORA_ADMIN_TOKEN") or None,
            reference=os.environ.get("SCIMILARITY_LORA_REFERENCE", ""),
            max_genes=_int("SCIMILARITY_LORA_MAX_GENES", cls.max_genes),
            max_cells=_int("SCIMILARITY_LORA_MAX_CELLS", cls.max_cells),
            max_nnz=_int("SCIMILARITY_LORA_MAX_NNZ", cls.max_nnz),
            max_body_bytes=_int("SCIMILARITY_LORA_MAX_BODY_BYTES", cls.max_body_bytes),
            max_batch_rows=_int("SCIMILARITY_LORA_MAX_BATCH_ROWS", cls.max_batch_rows),
            body_timeout_s=float(os.environ.get("SCIMILARITY_LORA_BODY_TIMEOUT_S", cls.body_timeout_s)),
            torch_threads=_int("SCIMILARITY_LORA_TORCH_THREADS", min(4, os.cpu_count() or 1)),
            workers=_int("SCIMILARITY_LORA_WORKERS", cls.workers),
            metrics=_flag("SCIMILARITY_LORA_METRICS"),
            access_log=_flag("SCIMILARITY_LORA_ACCESS_LOG"),
            monitoring=_flag("SCIMILARITY_LORA_MONITORING"),
        )


SETTINGS = Settings.from_env()


def max_npz_bytes(settings: Settings) -> int:
    """The largest uncompressed .npz a valid request can need: its arrays at their limits (int64/float64, gene
    names of at most 200 characters), plus room for the archive's own headers."""
    return 8 * (3 * settings.max_nnz + settings.max_cells + 1) + 4 * 200 * settings.max_genes + 1_000_000
