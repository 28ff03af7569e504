"""Shared by the benchmark (and demo) scripts: writing the result JSON, real PBMC request bodies for the service,
and starting / stopping a real `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_result(result: dict, out: str | Path) -> None:
    """Save the result (with the command that produced it) and print it as one JSON line."""
    result["command"] = " ".join(["python", *sys.argv])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_samples", "results")})[:2000])


def pbmc_request_bodies(batch_cells: int, top_k: int | None = None,
                        npz: bool = False) -> tuple[list[bytes], list[bytes]]:
    """The bundled PBMCs as raw integer counts (what clients send), encoded once: single-cell /predict bodies and
    CSR-like /predict_batch bodies of ``batch_cells`` cells (JSON, or .npz for /v1/predict_batch_npz)."""
    from scimilarity_lora.data.soma_store import pbmc_counts

    counts = pbmc_counts()
    X = counts.X.tocsr()
    genes = np.asarray(counts.var["feature_name"])
    singles = [json.dumps({"expression": dict(zip(genes[r.indices].tolist(), r.data.astype(int).tolist()))}).encode()
               for r in X]
    batches = []
    for s in range(0, X.shape[0] - batch_cells + 1, batch_cells):
        B = X[s:s + batch_cells]
        if npz:
            import io

            buf = io.BytesIO()
            np.savez(buf, genes=genes.astype(str), indptr=B.indptr, indices=B.indices, data=B.data,
                     top_k=top_k or 3)
            batches.append(buf.getvalue())
            continue
        body = {"sparse": {"genes": genes.tolist(), "indptr": B.indptr.tolist(), "indices": B.indices.tolist(),
                           "data": B.data.astype(int).tolist()}}
        if top_k is not None:
            body["top_k"] = top_k
        batches.append(json.dumps(body).encode())
    return singles, batches


REPO = Path(__file__).resolve().parents[1]


def export_to_temporary_store(run: str, prefix: str) -> tuple[dict, str, Path]:
    """Export a training run into a fresh temporary BentoML store: (environment for serving it, model tag, folder)."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "SCIMILARITY_LORA_TORCH_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", run], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True)
    tag = out.stdout.strip().splitlines()[-1]
    return {**env, "SCIMILARITY_LORA_MODEL": tag}, tag, tmp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(env: dict, port: int, log: Path, timeout_s: float = 300) -> subprocess.Popen:
    """`bentoml serve` from the repo root in its own process group, returned once ``/readyz`` answers 200."""
    import requests

    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                time.sleep(2)
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise RuntimeError(Path(log).read_text()[-3000:])
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not become ready: " + Path(log).read_text()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
