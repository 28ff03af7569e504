"""A crash in the middle of writing a checkpoint leaves the previous one intact and loadable."""

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
