"""Every benchmark of this folder, at its documented size or at a tiny one, from one list (so none can rot).

    python benchmarks/suite.py                         # make bench: every script at its documented size (hours)
    python benchmarks/suite.py --only startup scaling  # some of them
    python benchmarks/suite.py --smoke --out-dir /tmp/bench   # make bench-smoke's sizes (the tests run these)

Each entry names its script, the arguments of its documented run (what ``docs/benchmarks.md`` and the README
report), the arguments of a smoke run (seconds to a minute), and the JSON keys the documentation's tables read:
``tests/test_benchmarks.py`` runs every smoke and checks that its JSON holds those keys. ``{run}`` stands for a
trained demo run (trained once, ``python train.py``), ``{base}`` for a full-size SCimilarity folder (the base
pretrained here, ``experiments/pretrained_base``; the smoke uses the packaged demo base), ``{out}`` for the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FULL_BASE = REPO / "outputs" / "pretrained_base_real" / "model"


@dataclass(frozen=True)
class Bench:
    script: str
    full: list[str] = field(default_factory=list)
    smoke: list[str] = field(default_factory=list)
    keys: tuple[str, ...] = ()
    out: str | None = None  # the documented result's file name (default: <name>.json)


BENCHMARKS: dict[str, Bench] = {
    "training_speed": Bench("training_speed.py", [], ["--steps", "2", "--batch-size", "32", "--densities", "0.05"],
                            ("lora", "training", "inference_5pct", "peak_rss_mb")),
    "pretraining_speed": Bench("pretraining_speed.py", [], ["--steps", "2", "--batch-size", "64"],
                               ("bare_dense_loop_cells_per_s", "ours_cells_per_s", "ours_over_bare")),
    "loader_throughput": Bench("loader_throughput.py", [], ["--n-cells", "2000", "--batches", "3"],
                               ("census_stream_cells_per_s", "in_memory_cells_per_s", "train_step_cells_per_s",
                                "census_over_train_step", "peak_rss_mb")),
    "evaluate_memory": Bench("evaluate_memory.py", [], ["--n-cells", "1500", "--train-batches", "2",
                                                   "--workdir", "{work}/evaluate_memory"],
                             ("split_cells", "train", "evaluate", "dense_copy_bytes")),
    "scaling": Bench("scaling.py", [], ["--sizes", "1200", "--train-steps", "2", "--query-cells", "200",
                                        "--skip-evaluate", "--workdir", "{work}/scaling"],  # evaluate_memory's
                     ("rows", "sizes", "plot")),                                         # smoke evaluates

    "reference_index": Bench("reference_index.py", ["--run", "{run}"],
                             ["--run", "{run}", "--sizes", "1500", "--queries", "100", "--efs", "50",
                              "--search-seconds", "1"], ("builds", "queries", "search_latency")),
    "startup": Bench("startup.py", [], ["--repeats", "1"],
                     ("import_predictor", "import_service", "bentoml_serve_to_ready")),
    "serve_load": Bench("serve_load.py", ["--run-dir", "{run}"],
                        ["--run-dir", "{run}", "--seconds", "1", "--concurrency", "2", "--big-batch-cells", "300"],
                        ("single", "batch", "batch_npz", "in_process_forward_cells_per_s",
                         "served_batch_over_in_process_forward", "served_npz_batch_over_in_process_forward",
                         "total_errors")),
    "soak": Bench("soak.py", [], ["--seconds", "3", "--single-clients", "2", "--batch-clients", "1"],
                  ("single", "batch", "total_errors", "server_rss_mb", "rss_growth_mb_after_warmup")),
    "alignment_memory": Bench("alignment_memory.py", ["--run", "{run}"],
                              ["--run", "{run}", "--requests", "2", "--genes", "2000"],
                              ("status_codes", "rss_before_mb", "rss_after_mb", "growth_mb", "cache_bound_mb")),
    "worker_kill": Bench("worker_kill.py", ["--run", "{run}"], ["--run", "{run}", "--seconds", "2"], ("results",)),
    "multi_adapter": Bench("multi_adapter.py", [], ["--counts", "1", "2", "--repeats", "5"],
                           ("rss", "throughput_cells_per_s", "single_cell_p50_ms")),
    "serve_adapters": Bench("serve_adapters.py", [], ["--counts", "1", "10", "--repeats", "5"],
                            ("rss", "throughput_cells_per_s", "single_cell_p50_ms")),
    "sweep_disk": Bench("sweep_disk.py", ["--base", "{base}"],
                        ["--base", "{base}", "--ranks", "2", "--targets", "all", "--extra",
                         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"],
                        ("base_bytes", "lora_runs", "lora_sweep_bytes", "lora_run_bytes", "full_finetuning_run_bytes")),
}


def demo_run(work: Path, smoke: bool) -> Path:
    """A trained demo run (the embedded default; one epoch for the smoke sizes), trained once per work folder."""
    run = work / ("demo_run_smoke" if smoke else "demo_run")
    if not (run / "model").is_dir():
        subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false",
                        *(["trainer.max_epochs=1"] if smoke else [])], cwd=REPO, check=True, capture_output=True)
    return run


def command(name: str, smoke: bool, work: Path, out: Path) -> list[str] | None:
    """The command line of one benchmark, or None when it needs what this machine lacks (said on stdout)."""
    bench = BENCHMARKS[name]
    args = bench.smoke if smoke else bench.full
    if any("{base}" in a for a in args):
        if smoke:
            from scimilarity_lora.model.folder import resolve_model_dir

            base = resolve_model_dir("packaged:pbmc_demo")
        elif FULL_BASE.is_dir():
            base = FULL_BASE
        else:
            print(f"{name}: skipped, it needs a full-size base at {FULL_BASE} (experiments/pretrained_base builds it)")
            return None
        args = [a.replace("{base}", str(base)) for a in args]
    if any("{run}" in a for a in args):
        args = [a.replace("{run}", str(demo_run(work, smoke))) for a in args]
    args = [a.replace("{work}", str(work)) for a in args]
    return [sys.executable, f"benchmarks/{bench.script}", *args, "--out", str(out)]  # run from the repo root


def run_one(name: str, smoke: bool, work: Path, out_dir: Path) -> dict | None:
    """Run one benchmark; returns its JSON (after checking the keys the docs read), or None if skipped."""
    out = out_dir / (BENCHMARKS[name].out or f"{name}.json")
    cmd = command(name, smoke, work, out)
    if cmd is None:
        return None
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    result = json.loads(out.read_text())
    missing = [k for k in BENCHMARKS[name].keys if k not in result]
    if missing:
        raise RuntimeError(f"{name}: {out} lacks {missing}, which the documentation's tables read")
    print(f"{name}: {out} in {time.perf_counter() - t:.0f} s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds to a minute each)")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    p.add_argument("--out-dir", default=None, help=f"where the JSON goes (default: {RESULTS}; a temporary "
                                                   "folder with --smoke)")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "bench"))
    p.add_argument("--workers", type=int, default=1,
                   help="benchmarks at a time (1 for documented numbers: they measure speed)")
    a = p.parse_args()
    if a.smoke and a.out_dir is None:
        import tempfile

        a.out_dir = tempfile.mkdtemp(prefix="bench_smoke_")
    out_dir, work = Path(a.out_dir or RESULTS), Path(a.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    failed = run_all(a.only, a.smoke, work, out_dir, workers=a.workers)
    if failed:
        sys.exit("failed: " + "; ".join(f"{name}: {error[:3000]}" for name, error in failed.items()))


def run_all(names: list[str], smoke: bool, work: Path, out_dir: Path, workers: int = 1) -> dict[str, str]:
    """Run the benchmarks (``workers`` at a time: the smoke sizes spend most of their time starting processes);
    returns {name: error} of those that failed; the others' JSON is in ``out_dir``."""
    from concurrent.futures import ThreadPoolExecutor

    if any("{run}" in a for n in names for a in (BENCHMARKS[n].smoke if smoke else BENCHMARKS[n].full)):
        demo_run(work, smoke)  # once, before any of them runs
    failed: dict[str, str] = {}

    def one(name: str) -> None:
        try:
            run_one(name, smoke, work, out_dir)
        except Exception as e:  # noqa: BLE001 - reported by name; the others still run
            failed[name] = str(e)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, names))
    return failed


if __name__ == "__main__":
    main()
