"""A crash in the middle of writing a checkpoint leaves the previous one intact and loadable."""

from pathlib import Path

import pytest
import torch

import scimilarity_lora.training.checkpoint_io as checkpoint_io
from scimilarity_lora.training.checkpoint_io import load_lightning_checkpoint
from scimilarity_lora.training.checkpoint_io import AtomicCheckpointIO


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 20, "state_dict": {"w": torch.ones(3)}}, path)

    real_save = torch.save

    def crash_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")  # what a kill mid-write would leave behind
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 25, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)

    restored = load_lightning_checkpoint(path)
    assert restored["global_step"] == 20 and torch.equal(restored["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_lightning_trainer_uses_it(tmp_path):
    from helpers import FAST, compose_train
    from hydra.utils import instantiate

    cfg = compose_train(FAST, tmp_path)
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_lora_checkpoints_hold_the_adapter_not_the_base(tmp_path):
    """With a frozen base a checkpoint is adapter-sized; it reloads (resume, export) with the recorded base, and
    refuses a base whose weights changed."""
    import json

    import torch
    from helpers import compose_train

    from scimilarity_lora.model.folder import ModelFolderError, load_model_folder, save_model_folder
    from scimilarity_lora.training.checkpoint_io import classifier_from_checkpoint
    from scimilarity_lora.training.run import run

    sizes = {}
    for mode in ("lora", "full"):
        out = tmp_path / mode
        run(compose_train(["model=tiny", "model.gene_order=scimilarity", "trainer.max_epochs=1",
                           "trainer.enable_progress_bar=false", f"finetune={mode}"], out))
        best = json.loads((out / "metrics.json").read_text())["best_checkpoint"]
        sizes[mode] = Path(best).stat().st_size
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        base_keys = [k for k in ckpt["state_dict"] if k.startswith("model.encoder.") and "lora_" not in k]
        assert (base_keys == []) == (mode == "lora") and ("base_sha256" in ckpt) == (mode == "lora")
    assert sizes["lora"] < 0.5 * sizes["full"], sizes

    lora = tmp_path / "lora"
    best = json.loads((lora / "metrics.json").read_text())["best_checkpoint"]
    module = classifier_from_checkpoint(best)  # the base comes back from <run>/base
    assert module.encoder.base_model.model.network[0][1].base_layer.weight.abs().sum() > 0
    encoder, genes = load_model_folder(lora / "base")
    with torch.no_grad():
        encoder.network[0][1].weight[0, 0] += 1.0
    save_model_folder(encoder, genes, lora / "base")
    with pytest.raises(ModelFolderError, match="not the same base"):
        classifier_from_checkpoint(best)
