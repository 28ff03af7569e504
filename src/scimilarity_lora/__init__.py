"""scimilarity-lora: fine-tune SCimilarity with LoRA."""
