"""Running training the way users do: composed Hydra configs in-process, or `python train.py` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from scimilarity_lora.api import compose

REPO = Path(__file__).resolve().parents[1]
FAST = ["model=tiny", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    return compose_run("train", overrides, output_dir)


def compose_pretrain(overrides: list[str], output_dir: Path) -> DictConfig:
    return compose_run("pretrain", overrides, output_dir)


def compose_run(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """A config composed as ``python <config_name>.py`` would, with its run dir set to ``output_dir`` (the notebook
    API's own composition: tests and ``sl.fit`` build configs one way)."""
    return compose(config_name, overrides, output_dir)


def run_train_cli(args: list[str], timeout: int = 600, env: dict | None = None,
                  script: str = "train.py") -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


def run_train_clis(*jobs: dict) -> list[subprocess.CompletedProcess]:
    """Several independent CLI runs at once (each a dict of ``run_train_cli``'s keyword arguments): a resume test's
    uninterrupted and killed runs share nothing, and each spends most of its time starting up."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: run_train_cli(**job), jobs))


def make_predictor(n_genes_or_genes, latent: int = 8, hidden: list[int] | None = None, classes: list[str] | None = None,
                   gene_aliases: bool = True, seed: int = 0):
    """A predictor around a small random classifier (for tests of the inference and serving layers)."""
    from scimilarity_lora.inference.artifact import ModelSpec
    from scimilarity_lora.inference.predictor import CellTypePredictor
    from scimilarity_lora.model.classifier import CellClassifier
    from scimilarity_lora.model.encoder import EncoderConfig
    from scimilarity_lora.preprocess import Preprocessing

    genes = (list(n_genes_or_genes) if not isinstance(n_genes_or_genes, int)
             else [f"g{i}" for i in range(n_genes_or_genes)])
    classes = classes or list("abc")
    config = EncoderConfig(len(genes), latent, tuple(hidden or [16]))
    spec = ModelSpec(encoder=config, genes=genes, classes=classes, preprocessing=Preprocessing(),
                     finetune={"mode": "full"}, gene_aliases=gene_aliases)
    import torch

    torch.manual_seed(seed)
    return CellTypePredictor(CellClassifier.build(config, len(classes)), spec)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_bentoml(env: dict, log_path: Path, timeout_s: float = 120) -> tuple[subprocess.Popen, str, int]:
    """A real ``bentoml serve`` on 127.0.0.1 from the repository root; returns (process, base URL, port) once
    /readyz answers, or raises with the end of its log."""
    import signal
    import time

    import requests

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, port
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        if proc.poll() is not None:
            raise RuntimeError(Path(log_path).read_text()[-3000:])
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("bentoml serve did not become ready:\n" + Path(log_path).read_text()[-3000:])


def stop_bentoml(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
