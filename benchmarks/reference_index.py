"""Reference index at scale (#24): build time and peak RSS, query throughput of the hnsw index against exact
brute-force search on the same embeddings (recall@15), and /v1/search latency over HTTP.

    python benchmarks/reference_index.py --run outputs/runs/<date>/<time> --sizes 100000 1000000
    python benchmarks/reference_index.py --run <run> --sizes 2000 --search-seconds 3 --out /tmp/ri.json   # smoke

Each size: a Census-shaped SOMA store of that many cells (``python -m scimilarity_lora.data.soma_store``, the
bundled PBMCs resampled with Poisson noise), built into an index by the real CLI under ``/usr/bin/time -v`` (peak
RSS measured from outside the process); 2,000 query cells drawn with another seed (not in the index) are embedded
and searched by the index at several ``ef`` and exhaustively, in one process, side by side. The largest index is
then served by a real ``bentoml serve`` and single-cell ``/v1/search`` requests are timed at concurrency 1 and 16.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, export_to_temporary_store, free_port, serve, stop, write_result  # noqa: E402

K = 15


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, output) of a command, measured by /usr/bin/time -v."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return wall, rss_kb / 1024, res.stdout + res.stderr


def query_embeddings(model_dir: Path, n: int) -> np.ndarray:
    from scimilarity_lora.data.soma_store import pbmc_counts
    from scimilarity_lora.inference.reference import ReferenceEncoder

    cells = pbmc_counts(n, seed=12345)
    encoder = ReferenceEncoder.load(model_dir)
    z, _ = encoder.embed(cells.X, encoder.alignment(list(cells.var_names)))
    return z


def measure_queries(index_dir: Path, z: np.ndarray, efs: tuple[int, ...]) -> list[dict]:
    from scimilarity_lora.inference.reference import ReferenceIndex, exact_search

    index = ReferenceIndex(index_dir)
    t = time.perf_counter()
    exact_pos, _ = exact_search(index.embeddings, z, K)
    exact_s = time.perf_counter() - t
    rows = [{"method": "exact", "queries_per_s": round(len(z) / exact_s, 1), "recall_at_15": 1.0}]
    for ef in efs:
        index.hnsw.set_ef(ef)
        t = time.perf_counter()
        pos, _ = index.hnsw.knn_query(z, k=K)
        s = time.perf_counter() - t
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(pos, exact_pos)]))
        rows.append({"method": f"hnsw ef={ef}", "ef": ef, "queries_per_s": round(len(z) / s, 1),
                     "recall_at_15": round(recall, 4), "speedup_vs_exact": round(exact_s / s, 1)})
    return rows


def search_latency(run: str, index_dir: Path, seconds: float, tmp: Path) -> list[dict]:
    import requests

    from scimilarity_lora.data.soma_store import pbmc_counts

    env, _, store = export_to_temporary_store(run, "ri-serve-")
    env = {**env, "SCIMILARITY_LORA_REFERENCE": str(index_dir), "SCIMILARITY_LORA_ACCESS_LOG": "0"}
    port = free_port()
    proc = serve(env, port, tmp / "serve.log")
    cells = pbmc_counts(200, seed=7)
    genes = np.asarray(cells.var_names)
    bodies = [json.dumps({"expression": dict(zip(genes[r.indices].tolist(), r.data.tolist())), "k": K}).encode()
              for r in cells.X.tocsr()]
    url = f"http://127.0.0.1:{port}/v1/search"
    rows = []
    try:
        for concurrency in (1, 16):
            latencies: list[float] = []
            stop_at = time.time() + seconds

            def worker(i: int) -> None:
                session = requests.Session()
                j = i
                while time.time() < stop_at:
                    t = time.perf_counter()
                    r = session.post(url, data=bodies[j % len(bodies)], headers={"content-type": "application/json"},
                                     timeout=60)
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - t)
                    j += concurrency

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(worker, range(concurrency)))
            ms = np.array(latencies) * 1000
            rows.append({"concurrency": concurrency, "requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                         "p99_ms": round(float(np.percentile(ms, 99)), 1),
                         "requests_per_s": round(len(ms) / seconds, 1)})
    finally:
        stop(proc)
        shutil.rmtree(store, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="a training run directory (its model/ builds the index)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--efs", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--search-seconds", type=float, default=20)
    p.add_argument("--workdir", default=None, help="where stores and indices go (default: a temporary dir)")
    p.add_argument("--out", default="benchmarks/results/reference_index.json")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="reference-index-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.run) / "model"
    z = query_embeddings(model_dir, args.queries)
    builds, queries = [], []
    for n in args.sizes:
        store, index = work / f"store_{n}", work / f"index_{n}"
        if not store.exists():
            subprocess.run([sys.executable, "-m", "scimilarity_lora.data.soma_store", str(store), "--n-cells", str(n)],
                           cwd=REPO, check=True, capture_output=True)
        shutil.rmtree(index, ignore_errors=True)
        wall, rss, _ = timed([sys.executable, "-m", "scimilarity_lora.inference.reference", "build", args.run,
                              str(store), "--out", str(index), "--label-key", "cell_type",
                              "--keep-obs", "donor_id,dataset_id", "--no-progress"])
        manifest = json.loads((index / "manifest.json").read_text())
        builds.append({"n_cells": n, "wall_s": round(wall, 1), "cells_per_s": round(n / wall, 1),
                       "peak_rss_mb": round(rss), "index_mb": round(sum(f.stat().st_size for f in index.iterdir()) / 1e6),
                       "novelty_threshold": round(manifest["novelty"]["threshold"], 4)})
        print(json.dumps(builds[-1]))
        for row in measure_queries(index, z, tuple(args.efs)):
            queries.append({"n_cells": n, **row})
            print(json.dumps(queries[-1]))
    latency = search_latency(args.run, work / f"index_{args.sizes[-1]}", args.search_seconds, work)
    for row in latency:
        print(json.dumps(row))
    import hnswlib  # noqa: F401 - recorded below
    from importlib.metadata import version

    write_result({"benchmark": "reference_index", "model": str(model_dir), "k": K, "n_queries": len(z),
                  "hnswlib": version("hnswlib"), "hnsw": {"M": 16, "ef_construction": 200},
                  "builds": builds, "queries": queries,
                  "search_latency": {"n_cells": args.sizes[-1], "seconds_per_level": args.search_seconds,
                                     "rows": latency}}, args.out)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
