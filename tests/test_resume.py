"""Crash and resume: a real training subprocess SIGKILLed mid-epoch resumes from its last checkpoint."""

import json
import os

import pytest

from helpers import REPO, run_train_cli

ARGS = ["model=tiny", "data.batch_size=32", "trainer.max_epochs=4", "callbacks.early_stopping.patience=100",
        "callbacks.last_checkpoint.every_n_train_steps=5", "trainer.enable_progress_bar=false"]
STEPS_PER_EPOCH = 16  # 490 training cells / 32


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert run_train_cli(ARGS + [f"hydra.run.dir={full}"]).returncode == 0
    env = {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = run_train_cli(ARGS + [f"hydra.run.dir={crashed}", "+callbacks.crash._target_=crash_callback.KillAtStep",
                                   "+callbacks.crash.step=23"], env=env)
    assert killed.returncode == -9  # SIGKILL, in epoch 1 (steps 16..31)
    assert not (crashed / "metrics.json").exists()
    assert (crashed / "checkpoints" / "last.ckpt").is_file()

    resumed = run_train_cli(ARGS + [f"hydra.run.dir={crashed}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(full), metrics(crashed)
    assert b["resumed_from_step"] == 20  # the last mid-epoch save before the kill at step 23
    assert a["resumed_from_step"] == 0
    assert a["global_step"] == b["global_step"] == 4 * STEPS_PER_EPOCH
    assert a["epochs_trained"] == b["epochs_trained"] == 4
    # the resumed epoch sees a different shuffle of its remaining batches, so metrics agree only closely
    assert abs(a["test/accuracy"] - b["test/accuracy"]) <= 0.1
    # nothing logged before the crash is lost: each attempt has its own CSV log
    assert sorted(p.name for p in (crashed / "csv").iterdir()) == ["version_0", "version_1"]


@pytest.mark.slow
def test_a_sweep_resumes_without_redoing_finished_jobs(tmp_path):
    args = ["--multirun", "model=tiny", "trainer.max_epochs=1", "lora.r=2,4", f"hydra.sweep.dir={tmp_path}",
            "trainer.enable_progress_bar=false"]
    assert run_train_cli(args).returncode == 0
    finished = (tmp_path / "0" / "metrics.json").stat().st_mtime_ns
    (tmp_path / "1" / "metrics.json").unlink()  # job 1 "died" before writing its results
    res = run_train_cli(args + ["resume=true"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "0" / "metrics.json").stat().st_mtime_ns == finished  # not redone
    assert metrics(tmp_path / "1")["finetune"]["r"] == 4
    assert "already finished; skipping" in res.stdout + res.stderr
