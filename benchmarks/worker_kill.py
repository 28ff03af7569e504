"""What a client (or a load balancer) sees when a worker of `bentoml serve` dies (issue #23.8).

For 1 and for 2 workers: start the server on the demo model, SIGTERM one worker, and from 0.2 s later send one
`/predict` and one `/readyz` every 0.25 s for ``--seconds`` (each with a ``--timeout`` client timeout), recording
status and latency, and how long after the kill `/predict` answered again.

    python train.py hydra.run.dir=outputs/demo_kill
    python benchmarks/worker_kill.py --run outputs/demo_kill          # -> benchmarks/results/worker_kill.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import requests

from _common import export_to_temporary_store, free_port, pbmc_request_bodies, serve, stop, write_result


def workers_of(proc: subprocess.Popen) -> list[int]:
    return sorted(p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                  if "--worker-id" in " ".join(p.cmdline()))


def probe(url: str, body: bytes, seconds: float, timeout: float) -> list[dict]:
    rows, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for route, send in (("/predict", lambda: requests.post(f"{url}/predict", data=body, timeout=timeout,
                                                                headers={"content-type": "application/json"})),
                            ("/readyz", lambda: requests.get(f"{url}/readyz", timeout=timeout))):
            start = time.perf_counter()
            try:
                status = send().status_code
            except requests.RequestException as e:
                status = type(e).__name__
            rows.append({"t_s": round(start - t0, 3), "route": route, "status": status,
                         "latency_s": round(time.perf_counter() - start, 3)})
        time.sleep(0.25)
    return rows


def one(n_workers: int, env: dict, body: bytes, seconds: float, timeout: float, tmp: Path) -> dict:
    port = free_port()
    proc = serve({**env, "SCIMILARITY_LORA_WORKERS": str(n_workers)}, port, tmp / f"serve-{n_workers}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        before = workers_of(proc)
        killed = before[0]
        t_kill = time.perf_counter()
        os.kill(killed, signal.SIGTERM)
        time.sleep(0.2)
        rows = probe(url, body, seconds, timeout)
        for r in rows:
            r["t_s"] = round(r["t_s"] + 0.2, 3)  # since the kill
    finally:
        stop(proc)
    summary = {}
    for route in ("/predict", "/readyz"):
        r = [x for x in rows if x["route"] == route]
        summary[route] = {"n": len(r), "ok": sum(x["status"] == 200 for x in r),
                          "timeouts": sum(x["status"] in ("ReadTimeout", "ConnectTimeout") for x in r),
                          "max_latency_s": max(x["latency_s"] for x in r)}
    first_failure = next((r for r in rows if r["status"] != 200), None)
    answered = [r["t_s"] + r["latency_s"] for r in rows if r["route"] == "/predict" and r["status"] == 200
                and (first_failure is None or r["t_s"] > first_failure["t_s"])]
    return {"workers": n_workers, "summary": summary,
            # None: never failed; "not within the window": still failing when probing stopped
            "predict_answered_again_after_s": (None if first_failure is None else round(min(answered), 2) if answered
                                               else f"not within {seconds} s"),
            "probes": rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="a training run dir (exported to a temporary model store)")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--out", default="benchmarks/results/worker_kill.json")
    args = p.parse_args()
    env, _, tmp = export_to_temporary_store(args.run, "worker_kill_")
    singles, _ = pbmc_request_bodies(8)
    results = [one(n, env, singles[0], args.seconds, args.timeout, tmp) for n in (1, 2)]
    write_result({"client_timeout_s": args.timeout, "seconds": args.seconds,
                  "results": results}, args.out)
    print(json.dumps([{k: v for k, v in r.items() if k != "probes"} for r in results], indent=1))


if __name__ == "__main__":
    main()
