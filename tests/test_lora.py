import pytest
import torch

from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.adapters import (
    FinetuneConfig,
    count_parameters,
    freeze_batchnorm_stats,
    merged_encoder,
    prepare_encoder,
    resolve_target_modules,
)

ARCH = dict(n_genes=50, latent_dim=8, hidden_dim=[16, 12, 10])


def test_presets_expand_to_scimilarity_linear_names():
    cfg = Encoder(**ARCH).config
    assert resolve_target_modules(["input"], cfg) == ["network.0.1"]
    assert resolve_target_modules(["hidden"], cfg) == ["network.1.1", "network.2.1"]
    assert resolve_target_modules(["output"], cfg) == ["network.3"]
    assert resolve_target_modules(["all"], cfg) == ["network.0.1", "network.1.1", "network.2.1", "network.3"]
    assert resolve_target_modules(["network.3", "input"], cfg) == ["network.3", "network.0.1"]


def test_unknown_target_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match="unknown target 'network.9'"):
        resolve_target_modules(["network.9"], Encoder(**ARCH).config)
    with pytest.raises(ValueError, match="lora.r must be a positive integer"):
        FinetuneConfig(mode="lora", r=0)
    with pytest.raises(ValueError, match="finetune mode"):
        FinetuneConfig(mode="half")


@pytest.mark.parametrize("targets, expected", [
    (("input",), 4 * (50 + 16)),
    (("hidden",), 4 * (16 + 12) + 4 * (12 + 10)),
    (("all",), 4 * (50 + 16 + 16 + 12 + 12 + 10 + 10 + 8)),
])
def test_lora_trains_only_adapter_weights(targets, expected):
    model = prepare_encoder(Encoder(**ARCH), FinetuneConfig(mode="lora", r=4, target_modules=targets))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in Encoder(**ARCH).parameters()) + expected


def test_frozen_and_full_modes():
    assert count_parameters(prepare_encoder(Encoder(**ARCH), FinetuneConfig(mode="frozen")))[0] == 0
    full = prepare_encoder(Encoder(**ARCH), FinetuneConfig(mode="full"))
    assert count_parameters(full)[0] == count_parameters(full)[1]


def test_merge_reproduces_the_adapted_model():
    torch.manual_seed(0)
    model = prepare_encoder(Encoder(**ARCH), FinetuneConfig(mode="lora", r=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    x = torch.rand(20, 50)
    merged = merged_encoder(model).eval()
    assert type(merged) is Encoder and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert (merged(x) - model(x)).abs().max() < 1e-5


def test_frozen_batchnorm_keeps_pretrained_statistics():
    model = prepare_encoder(Encoder(**ARCH), FinetuneConfig(mode="lora", r=2)).train()
    freeze_batchnorm_stats(model)
    bn = model.base_model.model.network[0][2]
    before = bn.running_mean.clone()
    model(torch.rand(32, 50) * 3)
    assert torch.equal(bn.running_mean, before)
    full = Encoder(**ARCH).train()
    before = full.network[0][2].running_mean.clone()
    full(torch.rand(32, 50) * 3)
    assert not torch.equal(full.network[0][2].running_mean, before)


def test_adapter_saves_in_peft_format(tmp_path):
    from peft import PeftModel

    model = prepare_encoder(Encoder(**ARCH), FinetuneConfig(mode="lora", r=2, target_modules=("output",)))
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    reloaded = PeftModel.from_pretrained(Encoder(**ARCH), tmp_path / "adapter")
    assert any("lora_A" in k for k in reloaded.state_dict())
