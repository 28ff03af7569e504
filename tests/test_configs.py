"""Every config group option composes, and bad configs fail before any data is read."""

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from helpers import REPO, compose_train
import scimilarity_lora.data.anndata as anndata_module
from scimilarity_lora.training.run import run

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in (REPO / "conf").iterdir() if p.is_dir()}
PRETRAIN_ONLY = ("objective",)  # groups of conf/pretrain.yaml alone
OPTIONS = [(g, o) for g, opts in GROUPS.items() if g not in ("hydra", "paths", *PRETRAIN_ONLY) for o in opts]


def test_every_group_the_product_promises_exists():
    assert {"data", "model", "lora", "trainer", "logger", "callbacks", "experiment", "hparams_search"} <= set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS)
def test_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "h5ad":
        overrides.append("data.path=x.h5ad")
    if group == "data" and option == "census":
        overrides.append("data.uri=/tmp/x")
    cfg = compose_train(overrides, tmp_path)
    assert cfg.paths.output_dir == str(tmp_path)
    assert instantiate(cfg.trainer, _partial_=True) is not None
    assert cfg.data._target_.startswith("scimilarity_lora.data.")


@pytest.fixture
def no_data_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(anndata_module, "read_anndata", refuse)


@pytest.mark.parametrize("override, message", [
    ("lora.r=0", "lora.r must be a positive integer"),
    ("lora.alpha=-1", "lora.alpha must be positive"),
    ("lora.target_modules=network.9", "lora.target_modules: unknown target 'network.9'"),
    ("lora.dropout=1.5", r"lora.dropout must be in \[0, 1\)"),
])
def test_impossible_values_fail_before_data_is_loaded(override, message, tmp_path, no_data_reads):
    cfg = compose_train(["model=tiny", override], tmp_path)
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_unknown_override_names_the_key(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lora.rank"):
        compose_train(["lora.rank=4"], tmp_path)


# -- config means what it says ----------------------------------------------------------------------------------
def test_an_experiments_top_level_keys_win_over_train_yaml(tmp_path):
    """`_self_` first: an experiment's tags, seed and optimized_metric are not overwritten by train.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="experiment", name="_test_top_level", package="_global_",
                                 node={"seed": 7, "optimized_metric": "val/accuracy", "tags": ["t"]})
    cfg = compose_train(["experiment=pbmc_lora_vs_frozen"], tmp_path)
    assert list(cfg.tags) == ["pbmc68k", "modes"]
    cfg = compose_train(["experiment=_test_top_level"], tmp_path)
    assert (cfg.seed, cfg.optimized_metric, list(cfg.tags)) == (7, "val/accuracy", ["t"])
    assert cfg.data.seed == 7  # interpolations follow


@pytest.mark.parametrize("overrides, named", [
    (["finetune=frozen", "lora.r=64", "lora.target_modules=bogus"], ["lora.r=64", "lora.target_modules=bogus"]),
    (["finetune=full", "lora.alpha=-3"], ["lora.alpha=-3"]),
])
def test_lora_settings_outside_lora_mode_are_refused(overrides, named, tmp_path, no_data_reads):
    cfg = compose_train(["model=tiny", *overrides], tmp_path)
    with pytest.raises(ValueError, match="apply only with finetune=lora") as e:
        run(cfg)
    assert all(n in str(e.value) for n in named)


def test_the_architecture_is_described_once(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="hidden_dim"):
        compose_train(["model.base.hidden_dim=[8]"], tmp_path)
    cfg = compose_train(["model=tiny", "model.hidden_dim=[8,4]", "lora.target_modules=network.1.1"], tmp_path)
    from scimilarity_lora.training.run import finetune_config

    assert finetune_config(cfg).target_modules == ("network.1.1",)  # the early check reads the one copy


def _write_folder(tmp_path, hidden=(32, 16), latent=8):
    from scimilarity_lora.model.encoder import Encoder
    from scimilarity_lora.model.folder import save_model_folder

    genes = [f"G{i}" for i in range(40)]
    return save_model_folder(Encoder(40, latent, hidden), genes, tmp_path / "folder")


@pytest.mark.parametrize("key, value, says", [
    ("hidden_dim", [64, 64], r"model.hidden_dim=\[64, 64\] but the model folder .* has hidden sizes \[32, 16\]"),
    ("latent_dim", 128, r"model.latent_dim=128 but the model folder .* has latent dimension 8"),
    ("gene_order", "scimilarity", r"model.gene_order='scimilarity' \(28,231 genes\) but the model folder .* \(40 genes"),
])
def test_architecture_keys_that_disagree_with_the_folder_are_an_error(key, value, says, tmp_path):
    from scimilarity_lora.model.folder import ModelFolderError, load_base

    folder = _write_folder(tmp_path)
    with pytest.raises(ModelFolderError, match=says):
        load_base(pretrained_dir=str(folder), **{key: value})
    same = load_base(pretrained_dir=str(folder), hidden_dim=[32, 16], latent_dim=8)
    assert same.encoder.config.hidden_dim == (32, 16)


def test_a_gene_order_that_agrees_with_the_folder_is_accepted(tmp_path):
    from scimilarity_lora.model.folder import load_base

    folder = _write_folder(tmp_path)
    order = tmp_path / "order.tsv"
    order.write_text("\n".join(f"G{i}" for i in range(40)) + "\n")
    assert load_base(pretrained_dir=str(folder), gene_order=str(order)).genes == [f"G{i}" for i in range(40)]


def test_own_data_gets_a_base_over_scimilaritys_full_gene_order(tmp_path):
    """data=h5ad (a user's file) picks model=scimilarity_full: the 748-gene demo base is not a silent default for
    a file of another tissue; an explicit model= still wins."""
    from helpers import compose_train

    cfg = compose_train(["data=h5ad", "data.path=cells.h5ad"], tmp_path / "o")
    assert cfg.model.gene_order == "scimilarity" and cfg.model.pretrained_dir is None
    assert cfg.data.path == "cells.h5ad" and cfg.data.label_key == "cell_type" and cfg.data.layer == "X"
    cfg = compose_train(["data=h5ad", "data.path=cells.h5ad", "model=demo_base"], tmp_path / "o")
    assert cfg.model.pretrained_dir == "packaged:pbmc_demo"
    assert compose_train([], tmp_path / "o").model.pretrained_dir == "packaged:pbmc_demo"


def test_own_data_gets_study_3s_recipe_and_the_demo_keeps_its_own(tmp_path):
    """data=h5ad: the 2,000-gene panel and count augmentation (Study 3's best across studies); the bundled demo
    trains on all its 765 genes without augmentation; both are one override away."""
    from helpers import compose_train

    own = compose_train(["data=h5ad", "data.path=cells.h5ad"], tmp_path / "o").data
    assert own.gene_panel == 2000 and own.gene_panel_method == "variable"
    assert (own.augment.downsample_fraction, own.augment.downsample_min, own.augment.gene_dropout) == (0.5, 0.3, 0.1)
    demo = compose_train([], tmp_path / "o").data
    assert demo.gene_panel is None and demo.augment.downsample_fraction == 0 and demo.augment.gene_dropout == 0
    off = compose_train(["data=h5ad", "data.path=cells.h5ad", "data.gene_panel=null"], tmp_path / "o").data
    assert off.gene_panel is None


def test_dropout_applies_to_a_pretrained_folder(tmp_path):
    from scimilarity_lora.model.folder import load_base

    base = load_base(pretrained_dir=str(_write_folder(tmp_path)), dropout=0.1, input_dropout=0.2)
    assert base.encoder.network[0][0].p == 0.2 and base.encoder.network[1][0].p == 0.1


def test_tags_reach_metrics_and_every_logger(tmp_path):
    cfg = compose_train(["model=tiny", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                         "logger=many", "tags=[pbmc,first-try]"], tmp_path)
    assert list(cfg.logger.wandb.tags) == ["pbmc", "first-try", "lora"]
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tags"] == ["pbmc", "first-try"]
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "- pbmc" in hparams and "- first-try" in hparams
    import wandb

    wandb.teardown()  # finish() can return before wandb-core has closed the run file (see test_evaluate)
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"first-try" in record.read_bytes()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("overrides", [[], ["objective.negative_selection=hardest", "objective.triplet_weight=0.5"],
                                        ["init_from=/some/model_v1.1"]])
def test_the_pretraining_config_composes(overrides, tmp_path):
    from helpers import compose_pretrain

    cfg = compose_pretrain(overrides, tmp_path)
    assert cfg.objective._target_.endswith("PretrainModule") and cfg.data._target_.endswith("PretrainDataModule")
    assert cfg.objective.margin == 0.05 and cfg.model.gene_order == "scimilarity"
