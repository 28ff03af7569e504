"""How each job's cost grows with its work, 10k to 1M cells, with the full 28,231-gene model (#25).

    python benchmarks/scaling.py                                   # 10k, 100k, 1M cells: about an hour on 2 cores
    python benchmarks/scaling.py --sizes 1500 --train-steps 3 --query-cells 300 --out /tmp/scaling.json  # smoke

For each size, one Census-shaped SOMA store and one ``.h5ad`` of the same cells (``python -m
scimilarity_lora.data.soma_store <dir> --n-cells N --h5ad <file>``: the bundled real PBMCs resampled with Poisson
noise; built once and kept in ``--workdir``), then every job as its real CLI under ``/usr/bin/time -v`` (wall time
and peak RSS measured from outside the process):

- ``train``: LoRA on ``model=scimilarity_full``, streaming the store (``data=census data.uri=...``) for a fixed
  number of steps (``--train-steps``, over as many epochs as the store's training split needs); ``cells_per_s`` is the training loop's own rate including the wait for data
  (``stream_cells_per_second`` in the run's metrics.json), ``step_cells_per_s`` the steps alone;
- ``annotate``: the ``.h5ad`` (read and written in row chunks), and ``annotate_store``: the same cells from the store;
- ``evaluate``: ``evaluate.py`` with both baselines, on the run trained on this size's store;
- ``index_build``: a reference index of every cell of the ``.h5ad``; ``index_query``: ``annotate --reference`` of
  ``--query-cells`` other cells (drawn with another seed) against it (``cells_per_s`` counts query cells).

Writes ``rows`` (one per job and size: job, n_cells, wall_s, cells_per_s, peak_rss_mb) to the JSON and a log-log
plot beside it (``scaling.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

JOBS = ("train", "annotate", "annotate_store", "evaluate", "index_build", "index_query")
ROW_KEYS = ("job", "n_cells", "wall_s", "cells_per_s", "peak_rss_mb")


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a command, from GNU time; its output goes to ``log``."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed; see {log}:\n{res.stderr[-3000:]}")
    return wall, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1)) / 1024


def cells(work: Path, n: int, seed: int = 0, need_h5ad: bool = True) -> tuple[Path, Path]:
    """The store and the .h5ad of ``n`` cells (built once; the .h5ad only matters to the jobs that read it)."""
    store, h5ad = work / f"soma_{n}_seed{seed}", work / f"cells_{n}_seed{seed}.h5ad"
    if not (store.is_dir() and (h5ad.is_file() or not need_h5ad)):
        for stale in (store, h5ad):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        subprocess.run([sys.executable, "-m", "scimilarity_lora.data.soma_store", str(store), "--n-cells", str(n),
                        "--seed", str(seed), "--h5ad", str(h5ad)], cwd=REPO, check=True, capture_output=True)
    return store, h5ad


def row(job: str, n: int, wall: float, rss: float, work_cells: int | None = None, **extra) -> dict:
    done = work_cells if work_cells is not None else n
    r = {"job": job, "n_cells": n, "wall_s": round(wall, 1), "cells_per_s": round(done / wall, 1),
         "peak_rss_mb": round(rss)}
    r.update(extra)
    print(json.dumps(r), flush=True)
    return r


def measure_size(n: int, work: Path, args: argparse.Namespace, query: Path | None) -> list[dict]:
    jobs = set(args.jobs)
    store, h5ad = cells(work, n, need_h5ad=bool(jobs & {"annotate", "annotate_store", "index_build", "index_query"}))
    size = work / f"n{n}"
    size.mkdir(exist_ok=True)
    run = size / "run"
    py = sys.executable
    rows = []
    batch = 256
    if "train" in jobs:
        rows.append(_train(py, store, run, size, batch, args))
    annotate = [py, "-m", "scimilarity_lora.inference.annotate", str(run / "model")]
    if "annotate" in jobs:
        wall, rss = timed([*annotate, str(h5ad), str(size / "annotated.h5ad")], size / "annotate.log")
        rows.append(row("annotate", n, wall, rss, input="h5ad"))
    if "annotate_store" in jobs:
        wall, rss = timed([*annotate, str(store), str(size / "annotated_store.h5ad")], size / "annotate_store.log")
        rows.append(row("annotate_store", n, wall, rss, input="soma"))
    if "evaluate" in jobs and not args.skip_evaluate:
        wall, rss = timed([py, "evaluate.py", f"run_dir={run}"], size / "evaluate.log")
        report = json.loads((run / "evaluation" / "report.json").read_text())
        rows.append(row("evaluate", n, wall, rss, work_cells=sum(report["n_cells"].values()),
                        split_cells=report["n_cells"], baselines=sorted(report.get("baselines", {}))))
    index = size / "index"
    if "index_build" in jobs:
        subprocess.run(["rm", "-rf", str(index)], check=True)
        wall, rss = timed([py, "-m", "scimilarity_lora.inference.reference", "build", str(run), str(h5ad), "--out",
                           str(index), "--label-key", "cell_type", "--no-progress"], size / "index_build.log")
        rows.append(row("index_build", n, wall, rss))
    if "index_query" in jobs:
        wall, rss = timed([*annotate, str(query), str(size / "query_annotated.h5ad"), "--reference", str(index)],
                          size / "index_query.log")
        rows.append(row("index_query", n, wall, rss, work_cells=args.query_cells, query_cells=args.query_cells))
    for f in size.glob("*annotated*.h5ad"):  # up to GBs each; the logs stay
        f.unlink()
    return rows


def _train(py: str, store: Path, run: Path, size: Path, batch: int, args: argparse.Namespace) -> dict:
    n = int(size.name[1:])
    wall, rss = timed([py, "train.py", "model=scimilarity_full", "data=census", f"data.uri={store}",
                       f"data.batch_size={batch}", "trainer.max_epochs=-1", f"+trainer.max_steps={args.train_steps}",
                       f"trainer.limit_train_batches={args.train_steps}", "trainer.limit_val_batches=4",
                       "trainer.limit_test_batches=4", "trainer.enable_progress_bar=false", "logger=csv",
                       "callbacks=default", f"hydra.run.dir={run}"], size / "train.log")
    metrics = json.loads((run / "metrics.json").read_text())
    return row("train", n, wall, rss, cells_per_s=metrics["stream_cells_per_second"],
               step_cells_per_s=metrics["cells_per_second"], steps=args.train_steps, batch_size=batch,
               seconds_to_first_batch=metrics["seconds_to_first_batch"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    for job in JOBS:
        pts = sorted((r["n_cells"], r["wall_s"], r["peak_rss_mb"]) for r in rows if r["job"] == job)
        if not pts:
            continue
        n, wall, rss = zip(*pts)
        ax_t.plot(n, wall, marker="o", label=job)
        ax_m.plot(n, rss, marker="o", label=job)
    ns = sorted({r["n_cells"] for r in rows})
    if len(ns) > 1:  # a guide: linear in cells, through the annotate job's first point
        first = min((r for r in rows if r["job"] == "annotate"), key=lambda r: r["n_cells"], default=None)
        if first:
            ax_t.plot(ns, [first["wall_s"] * x / first["n_cells"] for x in ns], "k:", lw=1, label="linear")
    ax_t.set(xscale="log", yscale="log", xlabel="cells in the store / file", ylabel="wall time (s)",
             title="Wall time per job")
    ax_m.set(xscale="log", yscale="log", xlabel="cells in the store / file", ylabel="peak RSS (MB)",
             title="Peak memory per job (measured by /usr/bin/time)")
    ax_m.axhline(2048, color="grey", ls="--", lw=1)
    ax_m.text(ns[0], 2100, "2 GB", color="grey", fontsize=8)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--query-cells", type=int, default=10_000)
    p.add_argument("--skip-evaluate", action="store_true")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS),
                   help="measure only these (evaluate and the index jobs use the run and index already there)")
    p.add_argument("--update", action="store_true",
                   help="replace only the measured (job, size) rows of --out, keeping the others and their command")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "bench_scaling"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.json"))
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    query = cells(work, args.query_cells, seed=12345)[1] if "index_query" in args.jobs else None  # other cells
    rows = []
    for n in args.sizes:
        rows += measure_size(n, work, args, query)
    out = Path(args.out)
    result = {"benchmark": "scaling", "n_genes_model": 28231, "sizes": args.sizes, "train_steps": args.train_steps,
              "query_cells": args.query_cells, "row_keys": list(ROW_KEYS), "rows": rows,
              "plot": out.with_suffix(".png").name}
    if args.update and out.is_file():  # a partial re-run: its rows replace theirs, the others stay as measured
        old = json.loads(out.read_text())
        measured = {(r["job"], r["n_cells"]) for r in rows}
        command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
        for r in rows:
            r["command"] = command
        kept = [r for r in old["rows"] if (r["job"], r["n_cells"]) not in measured]
        order = {job: i for i, job in enumerate(JOBS)}
        result = {**old, "rows": sorted(kept + rows, key=lambda r: (r["n_cells"], order[r["job"]])),
                  # rows without a "command" of their own came from this run
                  "full_run_command": old.get("full_run_command", old["command"])}
    plot(result["rows"], out.with_suffix(".png"))
    write_result(result, out)


if __name__ == "__main__":
    main()
