"""What the label-free ablations share: Study 3's trained runs of one method, and their JSON written beside them.

Each ablation rescores ``outputs/cross_study/study3/work/<task>/<work-method>/seed*/`` (no training; the default's
runs kept the name of their run time, ``lora_panel_augment``) and writes ``<name>.json`` here
(``<name>_<work-method>.json`` for another method), with the command, the mean macro-F1 per task and way, and rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study3 import OUT, REPO, TASKS, datasets, within_split  # noqa: E402

DEFAULT_WORK = "lora_panel_augment"


def arguments(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--work-method", default=DEFAULT_WORK)
    p.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "real"))
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    return p.parse_args()


def runs(a: argparse.Namespace) -> Iterator[tuple[str, int, Path, dict, dict]]:
    """(task, seed, the seed's work folder, reference dataset, query dataset) of every finished run."""
    d = datasets(Path(a.real))
    d["pbmc3k_ref80"], d["pbmc3k_query20"] = within_split(Path(a.real))
    for task in a.tasks:
        reference, query = (d[name] for name in TASKS[task])
        for seed in (0, 1, 2):
            work = OUT / "work" / task.replace("->", "-") / a.work_method / f"seed{seed}"
            if (work / "run" / "model").is_dir():
                yield task, seed, work, reference, query


def write(name: str, a: argparse.Namespace, rows: list[dict], ways: tuple[str, ...]) -> dict:
    """Mean macro-F1 per task and way (and over the cross-study tasks), written with the rows and the command."""
    summary: dict = {}
    for task in a.tasks:
        rs = [r for r in rows if r["task"] == task]
        summary[task] = {w: round(float(np.mean([r[w]["macro_f1"] for r in rs])), 4) for w in ways} if rs else None
    cross = [t for t in a.tasks if not t.startswith("within") and summary[t]]
    if cross:
        summary["mean_cross_study"] = {w: round(float(np.mean([summary[t][w] for t in cross])), 4) for w in ways}
    other = a.work_method != DEFAULT_WORK
    (HERE / (f"{name}_{a.work_method}.json" if other else f"{name}.json")).write_text(json.dumps(
        {"command": f"python experiments/cross_study/ablations/{name}.py"
                    + (f" --work-method {a.work_method}" if other else ""),
         "mean_macro_f1": summary, "rows": rows}, indent=1))
    return summary


def with_probs(predictor, probs: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """A copy of ``predictor`` whose expressed cells' probabilities are ``probs(embeddings, probabilities)``: each
    way of labelling is scored by ``evaluate_query`` itself, so every ablation row meets the same label matching
    and metrics as Study 3's."""
    adapted = copy.copy(predictor)

    def predict_cells(*args, **kwargs):
        out = predictor.predict_cells(*args, **kwargs)
        e = out.expressed
        out.probs[e] = probs(out.embeddings[e], out.probs[e]).astype(np.float32)
        return out

    adapted.predict_cells = predict_cells
    return adapted


def rescore(predictor, query: dict) -> dict:
    """Accuracy and macro-F1 of the head of ``predictor`` on a query dataset (no voting)."""
    from scimilarity_lora.evaluation.query import evaluate_query

    r = evaluate_query(predictor, query["path"], query["label"], layer=query["layer"], input_is_log1p=query["log1p"],
                       label_map=query["map"], majority_voting=False, expression_voting=False)
    return {"accuracy": round(r["accuracy"], 4), "macro_f1": round(r["macro_f1"], 4)}
