"""Sweeps beyond one machine through existing engines: hydra-submitit-launcher (SLURM preset; local executor)."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers import REPO, run_train_cli


def test_the_slurm_preset_composes_onto_submitit():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                                          "hydra.launcher.tasks_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.timeout_min) == (2, 4, 1, 240)


@pytest.mark.slow
def test_a_sweep_through_submitit_local(tmp_path):
    res = run_train_cli(["--multirun", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                         "model=tiny", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "lora.r=2,4",
                         f"hydra.sweep.dir={tmp_path}"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(json.loads((tmp_path / job / "metrics.json").read_text())["finetune"]["r"] for job in ("0", "1"))
    assert ranks == [2, 4]
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))  # each job went through submitit's executor
