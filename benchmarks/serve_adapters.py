"""One `bentoml serve` for many adapters, over HTTP, on a full-size base (SCimilarity's architecture over 28,231
genes): RSS of the server with 1, 10 and 50 LoRA r=8 adapters loaded, against one merged-model server times the same
count; throughput of 10 concurrent 32-cell requests naming 10 different adapters (mixed in the micro-batcher)
against the same requests on one merged model; single-cell p50 with 10 adapters loaded against 1.

    python benchmarks/serve_adapters.py         # ~5 min on 2 cores

One adapter is trained (1 epoch on the bundled PBMCs over a random full-size base); the others copy its
configuration with random LoRA weights (speed and memory depend on shapes only). RSS is the sum over the server's
processes (`bentoml serve` and all its descendants, psutil) once the server is ready.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, free_port, pbmc_request_bodies, serve, stop, write_result  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    """Sum of RSS over the server and all its descendants (bentoml's arbiter and its worker processes)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def make_adapters(home: Path, run: Path, n: int) -> str:
    """Export the trained run as adapter a0 (its base stored once) and n-1 copies with random LoRA weights."""
    import bentoml
    import torch
    from safetensors.torch import load_file, save_file

    os.environ["BENTOML_HOME"] = str(home)
    from scimilarity_lora.serving.export import export_adapter

    _, base = export_adapter(run, "a0")
    src = Path(bentoml.models.get("a0:latest").path)
    weights = load_file(src / "adapter" / "adapter_model.safetensors")  # an adapter model holds its run's model/
    g = torch.Generator().manual_seed(0)
    for k in range(1, n):
        with bentoml.models.create(f"a{k}", labels={"kind": "adapter", "base": base.split(":")[1]},
                                   metadata=bentoml.models.get("a0:latest").info.metadata) as model:
            shutil.copytree(src, model.path, dirs_exist_ok=True)
            save_file({key: torch.randn(v.shape, generator=g) * 0.01 for key, v in weights.items()},
                      str(Path(model.path) / "adapter" / "adapter_model.safetensors"))
    return base


def timed_posts(url: str, bodies: list[tuple[str, dict]], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        codes = list(pool.map(lambda rb: requests.post(url + rb[0], json=rb[1], timeout=120).status_code, bodies))
        elapsed = time.perf_counter() - t
    assert set(codes) == {200}, codes
    return elapsed


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50],
                   help="adapters per server for the RSS rows (1 and 10 also give the latency and mixing rows)")
    p.add_argument("--repeats", type=int, default=200, help="single-cell requests per p50")
    p.add_argument("--out", default="benchmarks/results/serve_adapters.json")
    args = p.parse_args()
    out, counts = args.out, sorted(set(args.counts) | {1, 10})
    singles, _ = pbmc_request_bodies(32)
    cells = [json.loads(b)["expression"] for b in singles[:320]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "SCIMILARITY_LORA_ACCESS_LOG": "0"}
        subprocess.run([sys.executable, "train.py", "model=scimilarity_full", "trainer.max_epochs=1",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp / 'run'}"], cwd=REPO, env=env,
                       check=True, capture_output=True)
        base = make_adapters(tmp / "bentoml", tmp / "run", max(counts))
        merged = subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", str(tmp / "run"), "--name",
                                 "merged"], cwd=REPO, env=env, check=True, capture_output=True, text=True
                                ).stdout.strip().splitlines()[-1]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        result: dict = {"base": "SCimilarity architecture, 28,231 genes (random)", "adapter": "LoRA r=8, all 4 Linears"}

        proc = serve({**env, "SCIMILARITY_LORA_MODEL": merged}, port, tmp / "merged.log")
        merged_rss = tree_rss_mb(proc.pid)
        batch = [("/predict_batch", {"cells": [{"expression": c} for c in cells[32 * i:32 * (i + 1)]]})
                 for i in range(10)]
        merged_s = statistics.median(timed_posts(url, batch, 10) for _ in range(5))
        stop(proc)

        rss, p50 = {}, {}
        for n in counts:
            names = ",".join(f"a{k}" for k in range(n))
            proc = serve({**env, "SCIMILARITY_LORA_MODEL": base, "SCIMILARITY_LORA_ADAPTERS": names}, port,
                         tmp / f"a{n}.log")
            rss[n] = {"one_server_mb": round(tree_rss_mb(proc.pid), 1), "merged_servers_mb": round(merged_rss * n, 1)}
            if n in (1, 10):
                body = {"expression": cells[0], "model": f"a{n - 1}"}
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    assert requests.post(f"{url}/predict", json=body, timeout=30).status_code == 200
                    times.append(time.perf_counter() - t)
                p50[n] = statistics.median(times[len(times) // 10:]) * 1e3
            if n == 10:
                mixed = [(route, {**b, "model": f"a{i}"}) for i, (route, b) in enumerate(batch)]
                mixed_s = statistics.median(timed_posts(url, mixed, 10) for _ in range(5))
            stop(proc)
        result.update({
            "rss": rss,
            "throughput_cells_per_s": {"10_requests_10_adapters": round(320 / mixed_s),
                                       "same_requests_one_merged_model": round(320 / merged_s),
                                       "ratio": round(merged_s / mixed_s, 3)},
            "single_cell_p50_ms": {"10_adapters_loaded": round(p50[10], 2), "1_adapter_loaded": round(p50[1], 2),
                                   "ratio": round(p50[10] / p50[1], 3)},
        })
    write_result(result, out)


if __name__ == "__main__":
    main()
