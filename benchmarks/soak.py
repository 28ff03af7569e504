"""Soak the served model: single-cell and batch requests mixed, 32 concurrent clients for a bounded time, sampling
the server's memory (all its processes). Prints one JSON line.

    python benchmarks/soak.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import pbmc_request_bodies, write_result  # noqa: E402
from serve_load import REPO, free_port, load, start_server  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc] + proc.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--single-clients", type=int, default=28)
    p.add_argument("--batch-clients", type=int, default=4)
    p.add_argument("--batch-cells", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    run_dir = work / "run"
    subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"],
                   cwd=REPO, check=True, capture_output=True)
    singles, batches = pbmc_request_bodies(args.batch_cells)

    port = free_port()
    proc = start_server(run_dir, work, port)
    url = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((round(time.perf_counter() - t0, 1), round(tree_rss_mb(proc.pid), 1)))
            stop.wait(2)

    async def mixed():
        return await asyncio.gather(load(url, singles, args.single_clients, args.seconds, "/predict"),
                                    load(url, batches, args.batch_clients, args.seconds, "/predict_batch",
                                         args.batch_cells))

    try:
        asyncio.run(load(url, singles, 8, 5, "/predict"))  # warm-up
        rss_after_warmup = tree_rss_mb(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        single, batch = asyncio.run(mixed())
        stop.set()
        sampler.join()
        rss_end = tree_rss_mb(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    rss = [r for _, r in samples]
    half = len(rss) // 2
    result = {
        "benchmark": "soak", "seconds": args.seconds,
        "clients": {"single": args.single_clients, "batch": args.batch_clients, "batch_cells": args.batch_cells},
        "single": single, "batch": batch, "total_errors": single["errors"] + batch["errors"],
        "server_rss_mb": {"after_warmup": round(rss_after_warmup, 1), "end": round(rss_end, 1), "max": max(rss),
                          "mean_first_half": round(float(np.mean(rss[:half])), 1),
                          "mean_second_half": round(float(np.mean(rss[half:])), 1)},
        "rss_growth_mb_after_warmup": round(rss_end - rss_after_warmup, 1),
        "rss_samples": samples,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
