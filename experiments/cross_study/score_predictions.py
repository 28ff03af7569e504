"""Score any tool's per-cell predictions on a query exactly as `evaluate.py query.path=...` scores this project's:
the same label matching (by name, label map or Cell Ontology) and the same metrics, on the same matched cells.

    python experiments/cross_study/score_predictions.py PRED.csv QUERY.h5ad QUERY_LABEL \
        --classes-map REF_LABELS.csv --query-map QUERY_LABELS.csv [--column predicted_labels]

``--classes-map``: the reference's ``label,cl_id`` table (the classes the tool was trained on); ``--query-map``: the
query's ``label,cl_id`` table or a ``query_label,model_label`` map (``packaged:<name>`` works).
"""

import argparse
import json
from collections import Counter

import numpy as np
import pandas as pd

from scimilarity_lora.data.io import read_anndata
from scimilarity_lora.data.ontology import read_label_map
from scimilarity_lora.evaluation.label_matching import MATCHED, match_labels, ontology_correct
from scimilarity_lora.evaluation.metrics import classification_report
from scimilarity_lora.evaluation.query import MAP_COLUMNS


def score(pred: pd.Series, labels: pd.Series, class_terms: dict, query_map: dict) -> dict:
    classes = sorted(class_terms)
    counts = Counter(labels.dropna().astype(str))
    # a query map in label,cl_id form gives the query's own CL ids
    matches = match_labels(counts, classes, class_terms, label_map=query_map)
    lab = labels.astype(str).to_numpy()
    p = pred.reindex(labels.index).astype(str).to_numpy()
    kind = np.array([matches[x].kind if x in matches else "" for x in lab])
    m = np.isin(kind, MATCHED)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[matches[x].target] for x in lab[m]])
    yp = np.array([index.get(x, -1) for x in p[m]])
    known = yp >= 0
    r = classification_report(y[known], yp[known], classes) if known.all() else None
    related = m | (kind == "ancestor")
    onto = [ontology_correct(matches[x], q, class_terms) for x, q in zip(lab[related], p[related])]
    return {"n_cells_scored": int(m.sum()), "accuracy": round(r["accuracy"], 4), "macro_f1": round(r["macro_f1"], 4),
            "balanced_accuracy": round(r["balanced_accuracy"], 4),
            "ontology_aware_accuracy": round(float(np.mean(onto)), 4),
            "labels": {k: v.kind for k, v in sorted(matches.items())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("predictions"), ap.add_argument("query"), ap.add_argument("label_key")
    ap.add_argument("--classes-map", required=True), ap.add_argument("--query-map", required=True)
    ap.add_argument("--column", default="predicted_labels")
    ap.add_argument("--out", help="a JSON file to add this result to, under --name")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    pred = pd.read_csv(a.predictions, index_col=0)[a.column]
    pred.index = pred.index.astype(str)
    labels = read_anndata(a.query).obs[a.label_key]
    labels.index = labels.index.astype(str)
    out = score(pred, labels, read_label_map(a.classes_map), read_label_map(a.query_map, columns=MAP_COLUMNS))
    print(json.dumps(out, indent=1))
    if a.out:
        from pathlib import Path

        path = Path(a.out)
        table = json.loads(path.read_text()) if path.is_file() else {}
        meta = Path(a.predictions).with_suffix(".json")
        table[a.name or f"{Path(a.predictions).stem}:{a.column}"] = {
            **{k: v for k, v in out.items() if k != "labels"},
            **(json.loads(meta.read_text()) if meta.is_file() else {}), "column": a.column}
        path.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
