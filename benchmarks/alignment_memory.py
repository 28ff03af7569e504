"""Memory that clients control (issue #23.6): a server's RSS before and after requests that each name a different
gene list of the largest allowed size (``--genes`` names of 200 characters, a few real genes among them).

    python train.py hydra.run.dir=outputs/demo_mem
    python benchmarks/alignment_memory.py --run outputs/demo_mem      # -> benchmarks/results/alignment_memory.json

Before the byte-bounded shared cache, 40 such requests took a server from 622 to 1,260 MB (the issue's measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psutil
import requests

from _common import export_to_temporary_store, free_port, serve, stop, write_result


def tree_rss_mb(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return round(sum(p.memory_info().rss for p in procs) / 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--genes", type=int, default=40_000)
    p.add_argument("--out", default="benchmarks/results/alignment_memory.json")
    args = p.parse_args()
    env, _, tmp = export_to_temporary_store(args.run, "alignment_memory_")
    port = free_port()
    proc = serve(env, port, tmp / "serve.log")
    url = f"http://127.0.0.1:{port}"
    real = ["CD3D", "GNLY", "MS4A1", "LYZ", "NKG7"]
    try:
        warm = requests.post(f"{url}/predict", json={"expression": {g: 3 for g in real}}, timeout=60)
        assert warm.status_code == 200, warm.text
        time.sleep(1)
        before = tree_rss_mb(proc.pid)
        samples, codes = [], []
        for i in range(args.requests):
            names = {f"{i:04d}-{j:07d}-" + "x" * 187: 1.0 for j in range(args.genes - len(real))}
            names.update({g: 3.0 for g in real})
            r = requests.post(f"{url}/predict", data=json.dumps({"expression": names}), timeout=120,
                              headers={"content-type": "application/json"})
            codes.append(r.status_code)
            samples.append(tree_rss_mb(proc.pid))
        time.sleep(2)
        after = tree_rss_mb(proc.pid)
    finally:
        stop(proc)
    write_result({"requests": args.requests, "genes_per_request": args.genes, "name_length": 200,
                  "status_codes": sorted(set(codes)), "rss_before_mb": before, "rss_after_mb": after,
                  "rss_peak_mb": max(samples), "growth_mb": round(after - before, 1),
                  "cache_bound_mb": float(os.environ.get("SCIMILARITY_LORA_ALIGNMENT_CACHE_MB", "64")),
                  "rss_samples": samples}, args.out)


if __name__ == "__main__":
    main()
