"""Ablation (#22): an ensemble of the three seeds' adapters, their calibrated probabilities averaged per cell.

    python experiments/cross_study/ablations/seed_ensemble.py [--method lora_all_genes] [--tasks ...]

Reuses Study 3's runs (``outputs/cross_study/study3/work/<task>/<method>/seed{0,1,2}/run``, written by
``study3.py``): no training. Each seed's model predicts the task's query (every cell labelled, as ``evaluate``'s
head row does); the mean of the probabilities is the ensemble's answer, scored by ``score_predictions.py`` (the
same label matching and metrics as every row of the study). Also scores each seed alone through the same path, so
the comparison is side by side. Prints one JSON line per task and keeps them in ``seed_ensemble.json`` beside this
file (a task and method already there is replaced).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study3 import OUT, REPO, TASKS, datasets, within_split  # noqa: E402


def query_probs(model: Path, query: dict) -> tuple[np.ndarray, list[str], pd.Index]:
    from scimilarity_lora.data.io import expression_matrix, read_anndata
    from scimilarity_lora.inference.predictor import CellTypePredictor

    adata = read_anndata(query["path"])
    X, genes, _ = expression_matrix(adata, query["layer"])
    predictor = CellTypePredictor.load(model)
    out = predictor.predict_cells(X, list(genes), input_is_log1p=query["log1p"], batch_size=1024)
    return out.probs, predictor.classes, adata.obs_names


def scored(labels: np.ndarray, index: pd.Index, work: Path, name: str, ref: dict, query: dict) -> dict:
    pred = work / f"{name}.csv"
    pd.DataFrame({"predicted_labels": labels}, index=index).to_csv(pred)
    out = subprocess.run([sys.executable, str(HERE.parent / "score_predictions.py"), str(pred), query["path"],
                          query["label"], "--classes-map", ref["map"], "--query-map", query["map"]],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    return {k: r[k] for k in ("accuracy", "macro_f1", "balanced_accuracy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lora_all_genes")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "real"))
    a = p.parse_args()
    real = Path(a.real)
    data = datasets(real)
    data["pbmc3k_ref80"], data["pbmc3k_query20"] = within_split(real)
    for task in a.tasks:
        ref, query = (data[n] for n in TASKS[task])
        work = OUT / "ensembles" / task.replace(">", "") / a.method
        work.mkdir(parents=True, exist_ok=True)
        runs = [OUT / "work" / task.replace(">", "") / a.method / f"seed{s}" / "run" / "model" for s in a.seeds]
        if not all(r.is_dir() for r in runs):
            print(f"{task}: not every seed's run is on disk ({runs}); run study3.py first")
            continue
        probs, row = [], {"task": task, "method": f"{a.method}+seed_ensemble", "seeds": a.seeds}
        for seed, model in zip(a.seeds, runs):
            pr, classes, index = query_probs(model, query)
            probs.append(pr)
            row[f"seed{seed}"] = scored(np.asarray(classes, dtype=object)[pr.argmax(1)], index, work, f"seed{seed}",
                                        ref, query)
        mean = np.mean(probs, axis=0)
        row.update(scored(np.asarray(classes, dtype=object)[mean.argmax(1)], index, work, "ensemble", ref, query))
        row["command"] = " ".join(["python", *sys.argv])
        print(json.dumps(row), flush=True)
        save(row)


def save(row: dict) -> None:
    path = HERE / "seed_ensemble.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [r for r in rows if (r["task"], r["method"]) != (row["task"], row["method"])] + [row]
    path.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
