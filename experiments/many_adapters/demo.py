"""One `bentoml serve`, one base, two adapters trained on different label sets: the bundled PBMCs' bulk labels and
the FACS-sorted PBMC populations of Zheng et al. 2017 (`mudan_sorted_pbmc.h5ad` in the real-data folder).

    python experiments/many_adapters/demo.py --real ../shared/data/real      # ~2 min on 2 cores

Runs the README's commands: trains both adapters over the packaged pretrained base (`python train.py ...`), exports
each with `--adapter` into a BentoML store of its own (`outputs/many_adapters/bentoml`), serves the base once with
both adapters, then asks the server over HTTP:
- `GET /v1/models`: both adapters, their classes and metrics;
- the sorted adapter's held-out test cells (raw counts, as a client sends them) to `pbmc_sorted`: accuracy over HTTP
  must equal the run's own test accuracy;
- the same cells to `pbmc_bulk`: what the other label set calls each sorted population.
Writes `experiments/many_adapters/results.json` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import free_port, serve, stop, write_result  # noqa: E402

OUT = REPO / "outputs" / "many_adapters"
SORTED = "mudan_sorted_pbmc.h5ad"


def sh(args: list[str], env: dict) -> str:
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def train_and_export(real: Path, env: dict) -> str:
    runs = {"pbmc_bulk": [],
            "pbmc_sorted": ["data=h5ad", "model=demo_base", f"data.path={real / SORTED}", "data.label_key=cell_type"]}
    base = ""
    for name, overrides in runs.items():
        sh([sys.executable, "train.py", *overrides, f"hydra.run.dir={OUT / name}", "trainer.enable_progress_bar=false"],
           env)
        printed = sh([sys.executable, "-m", "scimilarity_lora.serving.export", str(OUT / name), "--adapter",
                      "--name", name], env)
        base = printed.strip().splitlines()[-1].split("(base ")[1].rstrip(")")
    return base


def test_cells(real: Path) -> tuple[dict, list[str]]:
    """The sorted run's test split as one sparse /predict_batch body of raw counts, and the cells' true labels."""
    import anndata as ad

    adata = ad.read_h5ad(real / SORTED)
    splits = pd.read_csv(OUT / "pbmc_sorted" / "splits.csv")
    ids = splits.loc[splits["split"] == "test", "cell_id"].astype(str)
    cells = adata[adata.obs_names.isin(ids)]
    X = cells.X.tocsr() if hasattr(cells.X, "tocsr") else np.asarray(cells.X)
    body = {"sparse": {"genes": list(map(str, cells.var_names)), "indptr": X.indptr.tolist(),
                       "indices": X.indices.tolist(), "data": X.data.astype(int).tolist()},
            "top_k": 1, "force_label": True}
    return body, cells.obs["cell_type"].astype(str).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "real")
    p.add_argument("--out", default="experiments/many_adapters/results.json")
    args = p.parse_args()
    if not (args.real / SORTED).is_file():
        sys.exit(f"{SORTED} is not in {args.real}: pass --real <folder with the real PBMC data>")
    env = {**os.environ, "BENTOML_HOME": str(OUT / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", "WANDB_MODE": "offline"}
    base = train_and_export(args.real.resolve(), env)
    port = free_port()
    server = serve({**env, "SCIMILARITY_LORA_MODEL": base}, port, OUT / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        models = requests.get(f"{url}/v1/models", timeout=30).json()
        body, truth = test_cells(args.real)
        answers = {}
        for name in ("pbmc_sorted", "pbmc_bulk"):
            r = requests.post(f"{url}/predict_batch", json={**body, "model": name}, timeout=120)
            r.raise_for_status()
            answers[name] = [p["cell_type"] for p in r.json()["predictions"]]
    finally:
        stop(server)
    run_metrics = json.loads((OUT / "pbmc_sorted" / "metrics.json").read_text())
    http_accuracy = float(np.mean(np.array(answers["pbmc_sorted"]) == np.array(truth)))
    bulk_by_population = {
        population: {"cells": truth.count(population),
                     "answers": dict(Counter(a for a, t in zip(answers["pbmc_bulk"], truth) if t == population)
                                     .most_common())}
        for population in sorted(set(truth))}
    result = {
        "base": base,
        "models": [{k: m.get(k) for k in ("name", "classes", "metrics", "default")} for m in models["models"]],
        "default_model": models.get("default"),
        "sorted_test_cells": len(truth),
        "pbmc_sorted_accuracy_over_http": round(http_accuracy, 4),
        "pbmc_sorted_run_test_accuracy": round(run_metrics["test/accuracy"], 4),
        "pbmc_bulk_answers_per_sorted_population": bulk_by_population,
    }
    write_result(result, REPO / args.out)


if __name__ == "__main__":
    main()
