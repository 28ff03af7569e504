"""Every config group option composes, and bad configs fail before any data is read."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from helpers import REPO, compose_train
import scimilarity_lora.data.anndata as anndata_module
from scimilarity_lora.train import run

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in (REPO / "conf").iterdir() if p.is_dir()}
OPTIONS = [(g, o) for g, opts in GROUPS.items() if g not in ("hydra", "paths") for o in opts]


def test_every_group_the_product_promises_exists():
    assert {"data", "model", "lora", "trainer", "logger", "callbacks", "experiment", "hparams_search"} <= set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS)
def test_option_composes(group, option, tmp_path, real_gene_order):
    overrides = [f"{group}={option}"]
    if option == "scimilarity_full":
        overrides.append("model.gene_order_file=x.tsv")
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
