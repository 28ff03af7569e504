"""Entry point for `bentoml serve` / `bentoml build` from the repository root (see bentofile.yaml)."""

from scimilarity_lora.serving.service import SCimilarityLoRA

__all__ = ["SCimilarityLoRA"]
