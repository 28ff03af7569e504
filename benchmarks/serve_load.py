"""Load on a real `bentoml serve` (127.0.0.1): single-cell /predict at several concurrencies for a bounded time,
batch /predict_batch throughput, and the in-process model as the ceiling, all in one run. Prints one JSON line.

    python benchmarks/serve_load.py                       # trains the default demo model first (~15 s)
    python benchmarks/serve_load.py --run-dir outputs/runs/<date>/<time> --seconds 20

The load client runs on the same 2 cores as the server, so absolute numbers are a floor for a real deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, free_port, pbmc_request_bodies, serve, write_result  # noqa: E402


def start_server(run_dir: Path, home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    tag = subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", str(run_dir)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    env["SCIMILARITY_LORA_MODEL"] = tag
    return serve(env, port, home / "serve.log", timeout_s=120)


async def load(url: str, payloads: list[bytes], concurrency: int, seconds: float, route: str,
               cells_per_request: int = 1, server_log: Path | None = None) -> dict:
    """Bodies are JSON-encoded once up front: the client must not eat the server's CPU on every request.

    aiohttp, not httpx: on 2 shared cores httpx's client overhead dominated at 64 connections.
    """
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    cells = 0
    deadline = time.perf_counter() + seconds
    log_start = len(server_log.read_text().splitlines()) if server_log else 0
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60),
                                     headers={"content-type": "application/json"}) as client:
        async def worker(k: int) -> None:
            nonlocal cells
            i = k
            while time.perf_counter() < deadline:
                body = payloads[i % len(payloads)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    async with client.post(route, data=body) as r:
                        await r.read()
                        code = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    code = type(e).__name__
                latencies.append(time.perf_counter() - t0)
                if code == 200:
                    cells += cells_per_request
                else:
                    errors[str(code)] = errors.get(str(code), 0) + 1

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    lat = np.asarray(latencies) * 1000
    out = {"concurrency": concurrency, "requests": len(lat), "errors": sum(errors.values()), "error_codes": errors,
           "req_per_s": round(len(lat) / elapsed, 1), "cells_per_s": round(cells / elapsed, 1),
           "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}
    if server_log:  # BentoML's access log: time spent inside the server, without the client's share
        time.sleep(0.5)
        lines = server_log.read_text().splitlines()[log_start:]
        ms = [float(m.group(1)) for line in lines if f"path={route}," in line
              and (m := re.search(r"\) ([0-9.]+)ms", line))]
        if ms:
            out["server_p50_ms"] = round(float(np.percentile(ms, 50)), 2)
            out["server_p99_ms"] = round(float(np.percentile(ms, 99)), 2)
    return out


async def mixed_load(url: str, singles: list[bytes], big: bytes, big_cells: int, seconds: float) -> dict:
    """Single-cell /predict (2 clients) and /livez probes (every 100 ms) while one client keeps sending
    ``big_cells``-cell /predict_batch bodies: do health and small requests stay fast behind big batches?"""
    import aiohttp

    lat: dict[str, list[float]] = {"single": [], "livez": [], "big": []}
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=120),
                                     headers={"content-type": "application/json"}) as client:
        async def call(kind: str, method: str, route: str, body: bytes | None = None) -> None:
            t0 = time.perf_counter()
            try:
                async with client.request(method, route, data=body) as r:
                    await r.read()
                    code = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                code = type(e).__name__
            lat[kind].append(time.perf_counter() - t0)
            if code != 200:
                errors[f"{kind}:{code}"] = errors.get(f"{kind}:{code}", 0) + 1

        async def single(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                await call("single", "POST", "/predict", singles[i % len(singles)])
                i += 2

        async def livez() -> None:
            while time.perf_counter() < deadline:
                await call("livez", "GET", "/livez")
                await asyncio.sleep(0.1)

        async def batches() -> None:
            while time.perf_counter() < deadline:
                await call("big", "POST", "/predict_batch", big)

        await asyncio.gather(single(0), single(1), livez(), batches())
    out = {"seconds": seconds, "big_batch_cells": big_cells, "big_batch_bytes": len(big), "errors": errors}
    for kind, values in lat.items():
        ms = np.asarray(values) * 1000
        out[kind] = {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                     "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}
    return out


def big_batch_body(n_cells: int) -> bytes:
    """A valid ``n_cells``-cell /predict_batch body in the list form (one expression dict per cell, raw counts):
    the form whose JSON validation costs most."""
    from scimilarity_lora.data.soma_store import pbmc_counts

    counts = pbmc_counts()
    X = counts.X.tocsr()
    genes = np.asarray(counts.var["feature_name"])
    cells = [{"expression": dict(zip(genes[X[i % X.shape[0]].indices].tolist(),
                                     X[i % X.shape[0]].data.astype(int).tolist()))} for i in range(n_cells)]
    return json.dumps({"cells": cells, "top_k": 1}).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=None)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--batch-cells", type=int, default=256)
    p.add_argument("--big-batch-cells", type=int, default=10_000)
    p.add_argument("--mixed-only", action="store_true", help="only the health-under-big-batches scenario")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    run_dir = Path(args.run_dir) if args.run_dir else work / "run"
    if not args.run_dir:
        subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"],
                       cwd=REPO, check=True, capture_output=True)

    import torch

    from scimilarity_lora.data.soma_store import pbmc_counts
    from scimilarity_lora.inference.predictor import CellTypePredictor

    singles, batches = pbmc_request_bodies(args.batch_cells, top_k=1)
    _, npz_batches = pbmc_request_bodies(args.batch_cells, top_k=1, npz=True)
    counts = pbmc_counts()
    X = counts.X.tocsr()
    genes = np.asarray(counts.var["feature_name"])

    # the ceiling: the same exported model in process, forward only and featurise + forward
    predictor = CellTypePredictor.load(run_dir / "model")
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    alignment = predictor.alignment(list(genes))
    x = predictor.featurize(X[: args.batch_cells], alignment)
    for _ in range(3):
        predictor.forward(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3:
        predictor.forward(x)
        n += x.shape[0]
    forward_cps = n / (time.perf_counter() - t0)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3:
        predictor.forward(predictor.featurize(X[: args.batch_cells], alignment))
        n += args.batch_cells
    featurize_forward_cps = n / (time.perf_counter() - t0)

    port = free_port()
    proc = start_server(run_dir, work, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(load(url, singles[:50], 4, 2, "/predict"))  # warm-up
        mixed = asyncio.run(mixed_load(url, singles, big_batch_body(args.big_batch_cells), args.big_batch_cells,
                                       args.seconds * 2))
        if args.mixed_only:
            write_result({"benchmark": "serve_load_mixed", "model_genes": len(predictor.genes), "mixed": mixed},
                         args.out)
            return
        log = work / "serve.log"
        single = [asyncio.run(load(url, singles, int(c), args.seconds, "/predict", server_log=log))
                  for c in args.concurrency.split(",")]
        batch = asyncio.run(load(url, batches, 2, args.seconds, "/predict_batch", args.batch_cells, server_log=log))
        batch_npz = asyncio.run(load(url, npz_batches, 2, args.seconds, "/v1/predict_batch_npz", args.batch_cells))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    result = {
        "benchmark": "serve_load", "model_genes": len(predictor.genes), "classes": len(predictor.classes),
        "seconds_per_level": args.seconds, "single": single, "batch": batch, "batch_npz": batch_npz,
        "mixed": mixed,
        "in_process_forward_cells_per_s": round(forward_cps), "in_process_featurize_forward_cells_per_s":
            round(featurize_forward_cps),
        "served_batch_over_in_process_forward": round(batch["cells_per_s"] / forward_cps, 3),
        "served_batch_over_in_process_featurize_forward": round(batch["cells_per_s"] / featurize_forward_cps, 3),
        "served_npz_batch_over_in_process_forward": round(batch_npz["cells_per_s"] / forward_cps, 3),
        "total_errors": sum(s["errors"] for s in single) + batch["errors"] + batch_npz["errors"],
        "server_env": {k: os.environ[k] for k in ("SCIMILARITY_LORA_WORKERS", "SCIMILARITY_LORA_TORCH_THREADS")
                       if k in os.environ},
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
