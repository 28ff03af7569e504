"""Start-up cost of the inference and serving layers: import time (fresh processes, median of N) and the time from
`bentoml serve` to its first 200 on /readyz, with a tiny trained model. Prints one JSON line.

    python benchmarks/startup.py                                   # this checkout
    python benchmarks/startup.py --repo /path/to/other/checkout \\
        --predictor scimilarity_lora.predictor --service scimilarity_lora.service --export scimilarity_lora.export \\
        --out benchmarks/results/startup_before.json               # e.g. the commit before the layer split

Each measurement runs the given checkout's own code (PYTHONPATH=<repo>/src, commands run from <repo>).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from serve_load import free_port  # noqa: E402


def import_seconds(repo: Path, module: str, repeats: int) -> dict:
    code = (f"import time, sys; t = time.perf_counter(); import {module}; "
            "print(time.perf_counter() - t, int('lightning' in sys.modules), int('torchmetrics' in sys.modules))")
    times, flags = [], None
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env_for(repo), capture_output=True,
                             text=True, check=True).stdout.split()
        times.append(float(out[0]))
        flags = {"loads_lightning": bool(int(out[1])), "loads_torchmetrics": bool(int(out[2]))}
    return {"median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times], **flags}


def env_for(repo: Path, **extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(repo / "src"), "WANDB_MODE": "offline", "BENTOML_DO_NOT_TRACK": "true",
            **extra}


def serve_ready_seconds(repo: Path, export_module: str, repeats: int) -> dict:
    import requests

    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    run_dir = work / "run"
    subprocess.run([sys.executable, "train.py", "model=tiny", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={run_dir}"], cwd=repo, env=env_for(repo), check=True, capture_output=True)
    env = env_for(repo, BENTOML_HOME=str(work / "bentoml"))
    tag = subprocess.run([sys.executable, "-m", export_module, str(run_dir)], cwd=repo, env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    env["SCIMILARITY_LORA_MODEL"] = tag
    times = []
    for _ in range(repeats):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while time.perf_counter() - t0 < 180:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        times.append(time.perf_counter() - t0)
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.05)
        finally:  # SIGTERM lets bentoml stop its workers (they leave the process group); then make sure
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--predictor", default="scimilarity_lora.inference.predictor")
    p.add_argument("--service", default="scimilarity_lora.serving.service")
    p.add_argument("--export", default="scimilarity_lora.serving.export")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "startup.json"))
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    write_result({"benchmark": "startup", "repo": str(repo),
                  # the floors: what the predictor imports that is not this project's (same fresh-process method)
                  "import_torch": {"module": "torch", **import_seconds(repo, "torch", args.repeats)},
                  "import_torch_scipy_sparse": {"module": "torch, scipy.sparse",
                                                **import_seconds(repo, "torch, scipy.sparse", args.repeats)},
                  "import_predictor": {"module": args.predictor, **import_seconds(repo, args.predictor, args.repeats)},
                  "import_service": {"module": args.service, **import_seconds(repo, args.service, args.repeats)},
                  "bentoml_serve_to_ready": serve_ready_seconds(repo, args.export, max(1, args.repeats // 2 + 1))},
                 args.out)


if __name__ == "__main__":
    main()
