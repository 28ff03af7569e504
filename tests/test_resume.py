"""Crash and resume: a real training subprocess SIGKILLed mid-epoch resumes from its last checkpoint."""

import json
import os

import pytest

from helpers import REPO, run_train_cli, run_train_clis

ARGS = ["model=tiny", "data.batch_size=32", "trainer.max_epochs=4", "callbacks.early_stopping.patience=100",
        "callbacks.last_checkpoint.every_n_train_steps=5", "trainer.enable_progress_bar=false"]
STEPS_PER_EPOCH = 16  # 490 training cells / 32
CRASH_ENV = {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # crash_callback


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    uninterrupted, killed = run_train_clis(
        {"args": ARGS + [f"hydra.run.dir={full}"]},
        {"args": ARGS + [f"hydra.run.dir={crashed}", "+callbacks.crash._target_=crash_callback.KillAtStep",
                         "+callbacks.crash.step=23"], "env": CRASH_ENV})
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
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
    # the loader's position and the RNGs are in the checkpoint: the resumed run is the uninterrupted run
    for key in ("test/accuracy", "test/macro_f1", "test/loss", "val/macro_f1"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
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


@pytest.mark.slow
def test_killed_census_run_resumes_exactly(tmp_path):
    """The same guarantee for a run streaming from a (local) Census store."""
    from scimilarity_lora.data.soma_store import pbmc_counts, write_census_store

    store = write_census_store(pbmc_counts(n_cells=2000, n_donors=8, seed=0), tmp_path / "soma")
    args = ["model=tiny", "data=census", f"data.uri={store}", "data.batch_size=64", "data.io_batch_size=1024",
            "trainer.max_epochs=3", "callbacks.early_stopping.patience=100",
            "callbacks.last_checkpoint.every_n_train_steps=5", "trainer.enable_progress_bar=false"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    kill_at = 32  # mid-way through the second epoch: 1,501 training cells / 64 = 24 steps each (asserted below)
    uninterrupted, killed = run_train_clis(
        {"args": args + [f"hydra.run.dir={full}"]},
        {"args": args + [f"hydra.run.dir={crashed}", "+callbacks.crash._target_=crash_callback.KillAtStep",
                         f"+callbacks.crash.step={kill_at}"], "env": CRASH_ENV})
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    steps_per_epoch = metrics(full)["global_step"] // 3
    assert steps_per_epoch + 1 < kill_at < 2 * steps_per_epoch
    assert killed.returncode == -9
    resumed = run_train_cli(args + [f"hydra.run.dir={crashed}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(full), metrics(crashed)
    assert steps_per_epoch < b["resumed_from_step"] < kill_at + 1 and b["resumed_from_step"] % 5 == 0
    assert a["global_step"] == b["global_step"]
    for key in ("test/accuracy", "test/macro_f1", "test/loss", "val/macro_f1"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
