"""Inference with a trained model directory: the model directory format, the predictor and ``annotate``.
Built on :mod:`scimilarity_lora.model` and the shared contract only: no Lightning, no torchmetrics."""
