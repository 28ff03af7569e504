"""The pretraining job: SCimilarity's objective as a Hydra run, a SCimilarity folder out, fine-tunable, continuable."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_REAL_DATA
from helpers import compose_pretrain, compose_train
from scimilarity_lora.model.folder import load_decoder, load_model_folder

SMALL = ["model.hidden_dim=[64,32]", "model.latent_dim=16", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from scimilarity_lora.training.pretrain_run import run_pretraining

    out = tmp_path_factory.mktemp("pretrain")
    run_pretraining(compose_pretrain(SMALL + ["trainer.max_epochs=4"], out))
    return out


def test_the_loss_decreases_and_a_scimilarity_folder_is_written(pretrained):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    losses = [r["train/loss"] for r in metrics["history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert metrics["train/n_triplets"] > 0
    folder = pretrained / "model"
    assert {p.name for p in folder.iterdir()} >= {"encoder.ckpt", "decoder.ckpt", "gene_order.tsv",
                                                   "layer_sizes.json", "label_ints.csv", "hyperparameters.json"}
    encoder, genes = load_model_folder(folder)
    assert len(genes) == 28231 and encoder.config.hidden_dim == (64, 32) and encoder.config.latent_dim == 16
    assert metrics["class_terms"]["CD8+ Cytotoxic T"] == "CL:0000625"


def test_scimilaritys_own_classes_load_the_folder_with_identical_outputs(pretrained):
    from test_encoder import real_scimilarity_nn_models

    nn_models = real_scimilarity_nn_models()
    folder = pretrained / "model"
    ours, genes = load_model_folder(folder)
    theirs = nn_models.Encoder(len(genes), latent_dim=16, hidden_dim=[64, 32])
    theirs.load_state(str(folder / "encoder.ckpt"))
    dec_theirs = nn_models.Decoder(len(genes), latent_dim=16, hidden_dim=[32, 64])
    dec_theirs.load_state(str(folder / "decoder.ckpt"))
    dec_ours = load_decoder(folder, ours.config)
    x = torch.rand(6, len(genes))
    with torch.no_grad():
        z_ours, z_theirs = ours.eval()(x), theirs.eval()(x)
        assert (z_ours - z_theirs).abs().max() < 1e-5
        assert (dec_ours.eval()(z_ours) - dec_theirs.eval()(z_theirs)).abs().max() < 1e-5
    import pandas as pd

    label_ints = pd.read_csv(folder / "label_ints.csv", index_col=0)
    assert label_ints.iloc[:, 0].tolist()[:2] == ["CD14+ Monocyte", "CD19+ B"]


def test_the_folder_fine_tunes_as_model_pretrained_dir(pretrained, tmp_path):
    from omegaconf import OmegaConf

    from scimilarity_lora.training.run import run

    cfg = compose_train([f"model.pretrained_dir={pretrained / 'model'}", "trainer.max_epochs=1",
                         "trainer.enable_progress_bar=false"], tmp_path)
    run(cfg)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # what `python train.py` leaves in its run dir
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["base_model"]["is_pretrained"] and metrics["gene_overlap"]["n_overlap"] == 748

    # forgetting on reference cells, with the base's own (frozen) decoder
    from scimilarity_lora.evaluation.evaluate import evaluate_run

    report = evaluate_run(tmp_path, baselines=False, reference={"path": "pbmc68k_reduced", "label_key": "bulk_labels",
                                                                "layer": "raw", "input_is_log1p": True})
    ref = report["forgetting"]["reference"]
    assert ref["n_cells"] == 700 and ref["k"] == 15 and 0 < ref["base"]["knn_accuracy"] <= 1
    assert ref["retained_accuracy"] == pytest.approx(ref["adapted"]["knn_accuracy"] / ref["base"]["knn_accuracy"],
                                                     abs=1e-3)
    assert ref["reconstruction_mse"]["base"] > 0 and ref["reconstruction_mse"]["adapted"] > 0
    assert -1 <= ref["mean_cosine"] < 1

    # retention on held-out cells only: kNN transfer from the other cells to those named in a holdout.csv
    import pandas as pd

    from scimilarity_lora.data.io import DataError, read_anndata

    ids = read_anndata("pbmc68k_reduced").obs_names[::7]
    pd.DataFrame({"cell_id": ids}).to_csv(tmp_path / "holdout.csv", index=False)
    held = evaluate_run(tmp_path, baselines=False, reference={
        "path": "pbmc68k_reduced", "label_key": "bulk_labels", "layer": "raw", "input_is_log1p": True,
        "query_cells": str(tmp_path / "holdout.csv")})["forgetting"]["reference"]
    assert held["n_query"] == len(ids) == 100 and held["n_cells"] == 700
    assert 0 < held["base"]["knn_accuracy"] <= 1 and held["base"] != ref["base"]
    pd.DataFrame({"barcode": ids}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="no cell_id column"):
        evaluate_run(tmp_path, baselines=False, reference={"path": "pbmc68k_reduced", "label_key": "bulk_labels",
                                                           "layer": "raw", "input_is_log1p": True,
                                                           "query_cells": str(tmp_path / "bad.csv")})


def test_knn_transfer_votes_among_reference_cells_only():
    from scimilarity_lora.evaluation.metrics import knn_transfer

    reference = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    query = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert knn_transfer(reference, np.array([0, 0, 1, 1]), query, k=2).tolist() == [0, 1]
    assert knn_transfer(reference, np.array([0, 0, 1, 1]), query, k=99).shape == (2,)  # k capped at the reference


def test_continue_pretraining_starts_from_the_given_weights(pretrained, tmp_path, monkeypatch):
    """init_from: the first step's loss equals the source model's loss on the same batch."""
    from hydra.utils import instantiate

    from scimilarity_lora.model.triplet import negatives_from_relations
    from scimilarity_lora.training.pretrain_module import PretrainModule

    folder = pretrained / "model"
    cfg = compose_pretrain(SMALL + [f"init_from={folder}"], tmp_path)
    datamodule = instantiate(cfg.data)
    encoder, genes = load_model_folder(folder)
    datamodule.gene_order = genes
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    allowed = negatives_from_relations(datamodule.labels.classes, lambda a, b: False).tolist()

    def module_from(enc_state, dec_state):
        m = PretrainModule(encoder.config.to_dict(), list(datamodule.labels.classes), allowed,
                           negative_selection="hardest")
        m.encoder.load_state_dict(enc_state)
        m.decoder.load_state_dict(dec_state)
        return m.eval()

    source = module_from(encoder.state_dict(), load_decoder(folder, encoder.config).state_dict())
    from scimilarity_lora.training import pretrain_run

    captured = {}

    def grab(self):  # the weights the job starts training from, copied before the first step
        captured["module"] = module_from(self.encoder.state_dict(), self.decoder.state_dict())

    monkeypatch.setattr(PretrainModule, "on_train_start", grab, raising=False)
    pretrain_run.run_pretraining(compose_pretrain(SMALL + [f"init_from={folder}", "trainer.max_epochs=1",
                                                           "trainer.limit_train_batches=1"], tmp_path))
    with torch.no_grad():
        a, b = source.losses(batch), captured["module"].losses(batch)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-7)
    assert float(a["mse"]) == pytest.approx(float(b["mse"]), abs=1e-7)


@pytest.mark.skipif(not (SHARED_REAL_DATA / "mudan_sorted_pbmc.h5ad").is_file(),
                    reason=f"real PBMC data not at {SHARED_REAL_DATA} (see its README for where to get it)")
def test_a_real_labelled_and_unlabelled_mix_with_a_holdout(tmp_path):
    from scimilarity_lora.training.pretrain_run import run_pretraining

    files = (f"[{{path: {SHARED_REAL_DATA / 'mudan_sorted_pbmc.h5ad'}, label_key: cell_type}},"
             f"{{path: {SHARED_REAL_DATA / 'kang_ifnb_unlabelled.h5ad'}}}]")
    run_pretraining(compose_pretrain(SMALL + ["trainer.max_epochs=1", f"data.files={files}",
                                              "data.holdout_file=mudan_sorted_pbmc", "data.label_to_ontology={}",
                                              "data.batch_size=512"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    holdout = __import__("pandas").read_csv(tmp_path / "holdout.csv")
    assert len(holdout) == metrics["n_cells"]["holdout"] == pytest.approx(0.2 * 2140, abs=10)
    assert metrics["n_labelled_train"] < metrics["n_cells"]["train"]  # unlabelled Kang cells train too
    assert {i["sha256"] is not None for i in metrics["inputs"]} == {True}


def test_every_batch_holds_positives_of_every_labelled_type():
    from scimilarity_lora.data.pretrain import ClassBalancedBatchSampler

    labels = np.r_[np.zeros(50), np.ones(5), np.full(3, 2), np.full(100, -1)].astype(int)
    sampler = ClassBalancedBatchSampler(labels, batch_size=32, per_class=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for b in batches:
        assert len(b) == 32 and len(set(b)) == 32
        counts = np.bincount(labels[b][labels[b] >= 0], minlength=3)
        assert (counts >= 4).all() or (counts[2] >= 3 and counts[:2].min() >= 4)  # a 3-cell type: all it has
    assert batches == list(sampler)  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="cannot hold 4 cells of each of 3"):
        ClassBalancedBatchSampler(labels, batch_size=8, per_class=4)


def test_the_batch_sampler_shards_ranks_and_resumes_mid_epoch():
    from scimilarity_lora.data.pretrain import ClassBalancedBatchSampler

    labels = np.repeat([0, 1, 2, -1], [40, 30, 20, 110])
    single = ClassBalancedBatchSampler(labels, batch_size=32, per_class=4, seed=3, world_size=1, rank=0)
    ranks = [ClassBalancedBatchSampler(labels, 32, 4, seed=3, world_size=2, rank=r) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(2)
    assert len(single) == 7 and [len(r) for r in ranks] == [4, 4]  # 7 batches, padded to 8 across 2 ranks
    by_rank = [list(r) for r in ranks]
    interleaved = [b for pair in zip(*by_rank) for b in pair]
    assert interleaved[:7] == list(single)  # the same epoch, dealt out rank by rank
    for batch in by_rank[0] + by_rank[1]:
        assert all(sum(labels[i] == c for i in batch) >= 4 for c in (0, 1, 2))  # positives of every type
    # mid-epoch: a fresh sampler given the saved position hands out the rest of the same epoch
    it = iter(single)
    first = [next(it), next(it), next(it)]
    state = single.state_dict()
    assert state == {"epoch": 2, "consumed": 3}
    resumed = ClassBalancedBatchSampler(labels, 32, 4, seed=3, world_size=1, rank=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert first + list(resumed) == list(single)


@pytest.mark.slow
def test_pretraining_under_ddp_on_cpu_two_processes(tmp_path):
    from helpers import run_train_cli

    res = run_train_cli(SMALL + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
                                 "data.batch_size=128", f"hydra.run.dir={tmp_path}"], script="pretrain.py")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MEMBER: 2/2" in res.stderr + res.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    n_train = metrics["n_cells"]["train"]
    per_rank = int(np.ceil(int(np.ceil(n_train / 128)) / 2))
    assert metrics["global_step"] == 2 * per_rank  # each rank took its half of the batches, not all of them
    assert (tmp_path / "model" / "encoder.ckpt").is_file()


@pytest.mark.slow
def test_killed_pretraining_resumes_exactly(tmp_path):
    import os

    from helpers import REPO, run_train_cli, run_train_clis

    args = SMALL + ["trainer.max_epochs=3", "data.batch_size=128", "callbacks.last_checkpoint.every_n_train_steps=4"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    env = {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    uninterrupted, killed = run_train_clis(
        {"args": args + [f"hydra.run.dir={full}"], "script": "pretrain.py"},
        {"args": args + [f"hydra.run.dir={crashed}", "+callbacks.crash._target_=crash_callback.KillAtStep",
                         "+callbacks.crash.step=9"], "env": env, "script": "pretrain.py"})
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert killed.returncode == -9 and (crashed / "checkpoints" / "last.ckpt").is_file()
    resumed = run_train_cli(args + [f"hydra.run.dir={crashed}", "ckpt_path=last"], script="pretrain.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (full, crashed))
    steps_per_epoch = int(np.ceil(a["n_cells"]["train"] / 128))
    assert a["global_step"] == b["global_step"] == 3 * steps_per_epoch
    # resumed mid-epoch 1 from the save at step 8 (6 batches per epoch): the same batches, RNG and weights follow
    assert [r["epoch"] for r in a["history"]] == [r["epoch"] for r in b["history"]] == [0, 1, 2]
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["val/loss"] == pytest.approx(ra["val/loss"], abs=1e-6)
    for epoch in (0, 2):  # epoch 1's train loss is averaged over the batches each process ran
        assert b["history"][epoch]["train/loss"] == pytest.approx(a["history"][epoch]["train/loss"], abs=1e-6)


def test_each_pretraining_epoch_draws_its_own_class_balanced_batches(tmp_path):
    """The batch sampler learns the epoch from the training callbacks (Lightning sets samplers' epochs only)."""
    import epoch_recorder

    from scimilarity_lora.training.pretrain_run import run_pretraining

    epoch_recorder.SEEN.clear()
    run_pretraining(compose_pretrain(SMALL + ["trainer.max_epochs=2", "data.batch_size=128",
                                              "+callbacks.rec._target_=epoch_recorder.FirstBatchPerEpoch"], tmp_path))
    (e0, labels0), (e1, labels1) = epoch_recorder.SEEN
    assert (e0, e1) == (0, 1)
    assert labels0 != labels1  # another order (labels of the first batch, class-balanced part first)


def test_pretraining_refuses_a_training_data_option_with_the_pretraining_form():
    """`python pretrain.py data=h5ad data.path=cells.h5ad` (how train.py takes a file) ended in an AttributeError."""
    import subprocess
    import sys

    from helpers import REPO

    res = subprocess.run([sys.executable, "pretrain.py", "data=h5ad", "data.path=cells.h5ad"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: data=h5ad is a training data option; pretraining takes its inputs as "
                                 "data.files=")
