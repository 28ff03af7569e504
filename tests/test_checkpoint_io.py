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
    """With a frozen base a checkpoint is adapter-sized: no base weights, no gene list (its hash instead), and the
    best checkpoint gives way to model/ once the run is done; it reloads (resume, export) with the recorded base,
    and refuses a base whose weights or gene order changed."""
    import json

    import torch
    from helpers import compose_train

    from scimilarity_lora.genes import read_gene_order, write_gene_order
    from scimilarity_lora.inference.artifact import read_model_dir
    from scimilarity_lora.model.folder import ModelFolderError, load_model_folder, save_model_folder
    from scimilarity_lora.training.checkpoint_io import classifier_from_checkpoint
    from scimilarity_lora.training.run import run

    sizes = {}
    for mode in ("lora", "full"):
        out = tmp_path / mode
        run(compose_train(["model=tiny", "model.gene_order=scimilarity", "trainer.max_epochs=1",  # a store of
                           "trainer.enable_progress_bar=false", f"finetune={mode}",  # its own: the base is altered
                           f"paths.base_store={tmp_path / 'bases'}"], out))
        best = json.loads((out / "metrics.json").read_text())["best_checkpoint"]
        assert (best is None) == (mode == "lora")  # full mode keeps whole checkpoints
        assert [p.name for p in (out / "checkpoints").glob("epoch*.ckpt")] == ([] if mode == "lora" else [Path(best).name])
        last = out / "checkpoints" / "last.ckpt"
        sizes[mode] = last.stat().st_size
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        base_keys = [k for k in ckpt["state_dict"] if k.startswith("model.encoder.") and "lora_" not in k]
        assert (base_keys == []) == (mode == "lora") and ("base_sha256" in ckpt) == (mode == "lora")
        genes = ckpt["hyper_parameters"]["gene_order"]
        assert (genes is None) == (mode == "lora") and ("gene_order_sha256" in ckpt) == (mode == "lora")
    assert sizes["lora"] < 0.5 * sizes["full"], sizes

    lora = tmp_path / "lora"
    last = lora / "checkpoints" / "last.ckpt"
    stored = Path(json.loads((lora / "metrics.json").read_text())["base_model"]["path"])
    assert stored.parent == tmp_path / "bases" and not (lora / "base").exists()
    module = classifier_from_checkpoint(last)  # the base and its gene order come back from the store
    assert module.hparams["gene_order"] == read_gene_order(stored / "gene_order.tsv")
    assert len(module.hparams["gene_order"]) == 28231
    assert module.encoder.base_model.model.network[0][1].base_layer.weight.abs().sum() > 0
    encoder, genes = load_model_folder(stored)
    write_gene_order(genes[::-1], stored / "gene_order.tsv")
    both_hashes = r"another gene order \(sha256 [0-9a-f]{16}\.\.\.\) than it was trained on \([0-9a-f]{16}\.\.\.\)"
    with pytest.raises(ModelFolderError, match=both_hashes):
        classifier_from_checkpoint(last)
    with pytest.raises(ModelFolderError, match=both_hashes):  # the model dir names the order by hash too
        read_model_dir(lora / "model")
    with torch.no_grad():
        encoder.network[0][1].weight[0, 0] += 1.0
    save_model_folder(encoder, genes, stored)
    with pytest.raises(ModelFolderError, match="not the same base"):
        classifier_from_checkpoint(last)


def test_a_finished_run_trained_further_without_improving_keeps_its_best_from_model_dir(tmp_path, caplog):
    """The best checkpoint of a finished LoRA run is gone (model/ holds it). Training on from last.ckpt with epochs
    that do not beat it (lr 0) must test and keep those same weights, not the last ones or nothing."""
    import json

    from helpers import compose_train
    from safetensors.torch import load_file

    from scimilarity_lora.training.run import run

    common = ["model=tiny", "trainer.enable_progress_bar=false", "callbacks.early_stopping=null"]
    run(compose_train(common + ["trainer.max_epochs=2"], tmp_path))
    first = json.loads((tmp_path / "metrics.json").read_text())
    adapter = load_file(tmp_path / "model" / "adapter" / "adapter_model.safetensors")
    (tmp_path / "metrics.json").unlink()
    with caplog.at_level("INFO", logger="scimilarity_lora.training.run"):
        run(compose_train(common + ["trainer.max_epochs=3", "model.classifier.optimizer.lr=0.0", "ckpt_path=last"],
                          tmp_path))
    assert "the best epoch is still the one in" in caplog.text
    second = json.loads((tmp_path / "metrics.json").read_text())
    assert second["epochs_trained"] == 3 and second["resumed_from_step"] == first["global_step"]
    assert second["test/accuracy"] == first["test/accuracy"] and second["val/macro_f1"] == first["val/macro_f1"]
    again = load_file(tmp_path / "model" / "adapter" / "adapter_model.safetensors")
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)
    assert list((tmp_path / "checkpoints").glob("epoch*.ckpt")) == []


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """It failed with `RuntimeError: [enforce fail at inline_container.cc:672]` and no word of disk space."""
    import torch

    from scimilarity_lora.training.checkpoint_io import AtomicCheckpointIO
    from scimilarity_lora.user_errors import DiskFullError

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    (tmp_path / "last.ckpt.tmp").symlink_to("/dev/full")  # every write to the temporary file: ENOSPC
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path}"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_the_model_directory_is_written_atomically(tmp_path):
    import errno

    from scimilarity_lora.inference.artifact import atomic_model_dir
    from scimilarity_lora.user_errors import DiskFullError

    final = tmp_path / "model"
    with atomic_model_dir(final) as tmp:
        (tmp).mkdir()
        (tmp / "model_config.json").write_text("{\"v\": 1}")
    assert (final / "model_config.json").read_text() == "{\"v\": 1}"
    with pytest.raises(DiskFullError, match="no space left on"):
        with atomic_model_dir(final) as tmp:
            tmp.mkdir()
            (tmp / "model_config.json").write_text("{\"v\": 2}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (final / "model_config.json").read_text() == "{\"v\": 1}"  # the previous one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]   # no temporary directory left behind
