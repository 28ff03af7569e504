"""Peak memory of `evaluate.py` at Census scale: a run trained on a 50,000-cell Census-shaped store with the full
28,231-gene model, then evaluated with baselines, under /usr/bin/time (peak RSS of the evaluate process).

    python benchmarks/evaluate_memory.py                  # ~10 min on 2 cores; target: peak RSS <= 2 GB

A dense copy of the splits would need cells x 28,231 x 4 bytes (reported as `dense_copy_bytes` for comparison).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a command, from GNU time."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, capture_output=True, text=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{res.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return time.perf_counter() - t, rss_kb / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=50_000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--train-batches", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "evaluate_memory.json"))
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_evaluate_"))
    store, run = work / "soma", work / "run"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "scimilarity_lora.data.soma_store", str(store), "--n-cells",
                        str(args.n_cells)], cwd=REPO, check=True)
    train_s, train_rss = timed([sys.executable, "train.py", "model=scimilarity_full", "data=census",
                                f"data.uri={store}", "data.batch_size=256", "trainer.max_epochs=1",
                                f"trainer.limit_train_batches={args.train_batches}", "trainer.limit_val_batches=5",
                                "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], work / "train.log")
    eval_s, eval_rss = timed([sys.executable, "evaluate.py", f"run_dir={run}"], work / "evaluate.log")
    report = json.loads((run / "evaluation" / "report.json").read_text())
    n_cells = json.loads((run / "metrics.json").read_text())["n_cells"]
    write_result({
        "benchmark": "evaluate_memory", "n_cells_in_store": args.n_cells, "n_genes": 28231, "split_cells": n_cells,
        "train": {"seconds": round(train_s, 1), "peak_rss_mb": round(train_rss)},
        "evaluate": {"seconds": round(eval_s, 1), "peak_rss_mb": round(eval_rss), "target_peak_rss_mb": 2048,
                     "baselines": sorted(report.get("baselines", {}))},
        "dense_copy_bytes": {split: n * 28231 * 4 for split, n in n_cells.items()},
    }, args.out)


if __name__ == "__main__":
    main()
