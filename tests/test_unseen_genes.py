"""lora.unseen_genes: input-layer LoRA never writes into genes no training cell expressed (unless asked to)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import compose_train
from scimilarity_lora.model.adapters import FinetuneConfig, freeze_unseen_genes, prepare_encoder
from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.folder import load_model_folder
from scimilarity_lora.training.run import run


def test_frozen_columns_stay_exactly_zero_under_adamw():
    torch.manual_seed(0)
    enc = Encoder(20, 4, [8])
    model = prepare_encoder(enc, FinetuneConfig(mode="lora", r=2, target_modules=("input",)))
    seen = torch.zeros(20, dtype=torch.bool)
    seen[:12] = True
    assert freeze_unseen_genes(model, enc.config, seen) == 8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(20):
        x = torch.rand(16, 20)  # even non-zero inputs on unseen genes cannot move their columns
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    (a,) = [p for n, p in model.named_parameters() if "lora_A" in n and "network.0.1" in n]
    assert torch.count_nonzero(a[:, 12:]) == 0 and torch.count_nonzero(a[:, :12]) > 0


@pytest.mark.parametrize("policy", ["freeze", "train"])
def test_merged_first_layer_of_unseen_genes(policy, tmp_path):
    """Trained on PBMCs (748 of 28,231 genes), the merged weights of the 27,483 others are the base's under freeze."""
    cfg = compose_train(["model=tiny", "model.gene_order=scimilarity", "trainer.max_epochs=2",
                         "trainer.enable_progress_bar=false", "lora.target_modules=input", "lora.r=4",
                         f"lora.unseen_genes={policy}"], tmp_path)
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    base, _ = load_model_folder(metrics["base_model"]["path"])
    w0 = base.network[0][1].weight.detach()
    from scimilarity_lora.inference.predictor import CellTypePredictor

    w1 = CellTypePredictor.load(tmp_path / "model").classifier.encoder.network[0][1].weight.detach()
    seen = load_file(tmp_path / "model" / "adapter" / "seen_genes.safetensors")["seen_genes"].bool()
    assert int(seen.sum()) == 748
    unseen = ~seen
    assert torch.allclose(w1[:, seen], w0[:, seen]) is False  # the adapter did learn on the seen genes
    drift = (w1[:, unseen] - w0[:, unseen]).abs().max().item()
    if policy == "freeze":
        assert drift <= 1e-7 and metrics["lora_unseen_genes_frozen"] == 28231 - 748
        assert metrics["finetune"]["unseen_genes"] == "freeze"
    else:
        assert drift > 1e-5 and metrics["lora_unseen_genes_frozen"] == 0


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="lora.unseen_genes must be one of"):
        FinetuneConfig(mode="lora", unseen_genes="sometimes")
