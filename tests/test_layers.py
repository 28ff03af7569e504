"""The floor plan holds: pure model code imports no Lightning; inference and serving never load the training stack."""

import json
import subprocess
import sys

import pytest

from helpers import REPO

TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics", "hydra")


def modules_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", [
    "scimilarity_lora.model.classifier",
    "scimilarity_lora.model.folder",
    "scimilarity_lora.inference.predictor",
    "scimilarity_lora.inference.annotate",
    "scimilarity_lora.serving.service",
])
def test_inference_and_serving_load_no_training_stack(module):
    loaded = modules_after_import(module)
    assert module in loaded
    assert not {m for m in loaded if m.split(".")[0] in TRAINING_STACK}, f"{module} pulled in the training stack"


def test_model_layer_imports_nothing_above_it():
    """model/ is pure torch: no data modules, training, inference, evaluation or serving code."""
    loaded = modules_after_import("scimilarity_lora.model.classifier, scimilarity_lora.model.folder, "
                                  "scimilarity_lora.model.adapters")
    ours = {m for m in loaded if m.startswith("scimilarity_lora.")}
    above = {m for m in ours if m.split(".")[1] in ("data", "training", "inference", "evaluation", "serving")}
    assert not above, above
    assert "anndata" not in loaded and "peft" not in loaded  # peft is imported only when adapters are attached


def test_the_encoder_then_head_forward_exists_once():
    """Training, inference and evaluation all run CellClassifier's forward; nobody composes encoder + head again."""
    offenders = []
    for path in (REPO / "src" / "scimilarity_lora").rglob("*.py"):
        text = path.read_text()
        if "head(self.encoder(" in text.replace(" ", "") or "self.head(z)" in text:
            offenders.append(path.name)
    assert offenders == ["classifier.py"], offenders
