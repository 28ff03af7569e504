"""Study 3 (#22): label another study's cells, this project against the tools users pick instead, on real tasks.

    python experiments/cross_study/study3.py [--seeds 0 1 2] [--tasks ...] [--methods ...]   (run.sh calls it)

Every method sees the same reference cells (100% of the reference file: peers train on all of it, and so does this
project, whose own validation split is carved from those cells) and is scored on the same query cells by the same
label matching and metrics (``evaluate.py query.path=...`` for this project, ``score_predictions.py`` for the
peers). Each command runs under ``/usr/bin/time -v``: wall time and peak RSS are measured from outside. Results
accumulate in ``experiments/cross_study/study3/results.jsonl`` (one line per task, method and seed; a finished line
is not run again; committed, because runs are long and ``outputs/`` is not kept) and are summarised by
``summarize_study3.py``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MAPS = HERE / "label_maps"
PEERS = REPO / ".venv-peers" / "bin" / "python"
OUT = REPO / "outputs" / "cross_study" / "study3"
RESULTS = HERE / "study3" / "results.jsonl"


def datasets(real: Path) -> dict[str, dict]:
    """Each dataset: its file, label column, layer, whether that layer is log1p, and its label -> CL id table."""
    return {
        "sorted": {"path": str(real / "mudan_sorted_pbmc.h5ad"), "label": "cell_type", "layer": "X", "log1p": False,
                   "map": str(MAPS / "mudan_sorted_pbmc.csv")},
        "pbmc3k": {"path": str(real / "pbmc3k_seurat.h5ad"), "label": "cell_type", "layer": "X", "log1p": False,
                   "map": str(MAPS / "pbmc3k_seurat.csv")},
        "pbmc68k": {"path": "pbmc68k_reduced", "label": "bulk_labels", "layer": "raw", "log1p": True,
                    "map": "packaged:pbmc68k_bulk_labels"},
    }


def within_split(real: Path, seed: int = 0) -> tuple[dict, dict]:
    """pbmc3k split 80/20 at random (stratified by label): the in-distribution reference point."""
    import anndata as ad
    import numpy as np

    d = datasets(real)["pbmc3k"]
    folder = OUT / "data"
    ref, query = folder / "pbmc3k_ref80.h5ad", folder / "pbmc3k_query20.h5ad"
    if not query.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        a = ad.read_h5ad(d["path"])
        rng = np.random.default_rng(seed)
        is_query = np.zeros(a.n_obs, dtype=bool)
        for label in a.obs[d["label"]].astype(str).unique():
            rows = np.flatnonzero(a.obs[d["label"]].astype(str).to_numpy() == label)
            is_query[rng.choice(rows, max(1, round(0.2 * len(rows))), replace=False)] = True
        a[~is_query].write_h5ad(ref)
        a[is_query].write_h5ad(query)
    return {**d, "path": str(ref)}, {**d, "path": str(query)}


TASKS = {  # name: (reference, query)
    "sorted->pbmc3k": ("sorted", "pbmc3k"),
    "sorted->pbmc68k": ("sorted", "pbmc68k"),
    "pbmc3k->pbmc68k": ("pbmc3k", "pbmc68k"),
    "pbmc68k->pbmc3k": ("pbmc68k", "pbmc3k"),
    "within-pbmc3k": ("pbmc3k_ref80", "pbmc3k_query20"),
}
#: the base pretrained here over SCimilarity's 28,231 genes (experiments/pretrained_base; pbmc3k never entered it)
PRETRAINED_28K = REPO / "outputs" / "pretrained_base_real" / "model"
AUGMENT = ["data.augment.downsample_fraction=0.5", "data.augment.downsample_min=0.3", "data.augment.gene_dropout=0.1"]
#: every gene, no augmentation: what the recipes measured before issue #22's change of data=h5ad's defaults add
ALL_GENES = ["data.gene_panel=null"]
NO_AUGMENT = ["data.augment.downsample_fraction=0", "data.augment.gene_dropout=0"]
#: this project's recipes (train.py overrides on top of data=h5ad) and the peers
OURS = {
    "lora_default": [],        # data=h5ad's defaults: LoRA r=8 on a random stand-in over the 28,231 genes, seeing
                               # the reference's 2,000 most variable genes, trained on thinned cells with gene dropout
    "lora_panel": NO_AUGMENT,                       # the gene panel alone
    "lora_markers": ["data.gene_panel_method=markers"],  # the default with a marker panel (SingleR's pairs)
    "lora_panel1000": ["data.gene_panel=1000"],           # the default with a smaller panel
    "lora_dropout03": ["data.augment.gene_dropout=0.3"],  # the default with stronger gene dropout
    "lora_train84": ["data.test_fraction=0.01"],          # the default training on 84% of the reference, not 70%
    "lora_r32": ["lora.r=32", "lora.alpha=64"],           # the default with rank 32 adapters (alpha/r kept at 2)
    "lora_r2": ["lora.r=2", "lora.alpha=4"],              # the default with rank 2 adapters (r32 lost: less capacity?)
    "lora_epochs10": ["trainer.max_epochs=10"],           # the default trained 10 epochs, not up to 60 (how long)
    "lora_epochs20": ["trainer.max_epochs=20"],           # 20 epochs: 10 scattered on the 700-cell reference
    "lora_wd01": ["model.classifier.optimizer.weight_decay=0.1"],  # the default with 10x the weight decay
    "lora_smooth01": ["model.classifier.label_smoothing=0.1"],    # the default with label smoothing 0.1
    # "lora_bn" (the default on a stand-in whose BatchNorm statistics came from the training cells): ran at commit
    # c9526b8, whose model.calibrate_batchnorm was removed after it lost (README, screens)
    "lora_all_genes": [*ALL_GENES, *NO_AUGMENT],    # every gene, no augmentation (the default before #22's change)
    "lora_augment": ALL_GENES,                      # augmentation alone (every gene)
    "full_finetune": ["finetune=full", *ALL_GENES, *NO_AUGMENT],
    "probe": ["finetune=frozen", *ALL_GENES, *NO_AUGMENT],              # the linear probe on the frozen base
    "lora_packaged_base": ["model=demo_base", *ALL_GENES, *NO_AUGMENT],  # the pretrained 748-gene demo base
    "lora_pretrained_28k": [f"model.pretrained_dir={PRETRAINED_28K}", *ALL_GENES, *NO_AUGMENT],  # pretrained, full order
    "full_augment": ["finetune=full", *AUGMENT, *ALL_GENES],
    "lora_pretrained_28k_augment": [f"model.pretrained_dir={PRETRAINED_28K}", *AUGMENT, *ALL_GENES],
}
#: the methods whose base's own embedding gets a kNN row (one per distinct base)
BASE_KNN = {"lora_all_genes", "lora_packaged_base", "lora_pretrained_28k"}
PEER_METHODS = ("celltypist", "celltypist_fs", "logreg", "logreg_l1", "logreg_748", "scanvi", "singler")
SEEDED = {*OURS, "logreg", "logreg_l1", "logreg_748", "scanvi", "celltypist_fs"}
DEMO_GENES = HERE.parent / "pretrained_base" / "demo_gene_order.tsv"


def timed(cmd: list[str], log: Path) -> dict:
    t = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed; see {log}:\n{text[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None}


def run_ours(task: str, method: str, seed: int, ref: dict, query: dict, work: Path) -> list[dict]:
    run_dir = work / "run"
    cost = timed([sys.executable, "train.py", "data=h5ad", f"data.path={ref['path']}", f"data.label_key={ref['label']}",
                  f"data.layer={ref['layer']}", f"data.input_is_log1p={str(ref['log1p']).lower()}",
                  f"data.label_to_ontology={ref['map']}", f"seed={seed}", *OURS[method],
                  "trainer.enable_progress_bar=false", "logger=csv", f"hydra.run.dir={run_dir}"], work / "train.log")
    def build(index: Path, *extra: str) -> dict:
        return timed([sys.executable, "-m", "scimilarity_lora.inference.reference", "build", str(run_dir), ref["path"],
                      "--out", str(index), "--label-key", ref["label"], "--layer", ref["layer"], "--no-progress",
                      *(["--log1p"] if ref["log1p"] else []), *extra], work / f"{index.name}.log")

    def evaluate(index: Path, name: str, *extra: str) -> dict:
        return timed([sys.executable, "evaluate.py", f"run_dir={run_dir}", f"query.path={query['path']}",
                      f"query.label_key={query['label']}", f"query.layer={query['layer']}",
                      f"query.input_is_log1p={str(query['log1p']).lower()}", f"query.label_map={query['map']}",
                      f"query.reference={index}", f"query.name={name}", "baselines=false", *extra],
                     work / f"evaluate_{name}.log")

    index_cost = build(work / "index")
    evaluate_cost = evaluate(work / "index", "query")
    base_rows = []
    if method in BASE_KNN:  # one row per base: methods on the same base share its embedding (the probe's is it)
        build(work / "index_base", "--base")
        evaluate(work / "index_base", "query_base", "query.majority_voting=false")
        kb = json.loads((run_dir / "evaluation" / "query" / "query_base" / "report.json").read_text())["knn"]
        base_rows.append({"task": task, "seed": seed, "method": f"{method}+knn_base_embedding",
                          **{k: kb.get(k) for k in ("accuracy", "macro_f1", "balanced_accuracy", "rejection_rate",
                                                    "n_cells_scored")}})
    r = json.loads((run_dir / "evaluation" / "query" / "query" / "report.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keep = ("accuracy", "macro_f1", "balanced_accuracy", "ontology_aware_accuracy", "rejection_rate", "n_cells_scored")
    head = {k: r[k] for k in keep}
    head.update(coverage_with_unknown=r["with_unknown"]["coarse"]["coverage"],
                accuracy_with_unknown=r["with_unknown"]["coarse"]["accuracy"],
                own_test_macro_f1=metrics.get("test/macro_f1"), own_test_accuracy=metrics.get("test/accuracy"))
    mv = r.get("majority_voting") or {}
    mve = r.get("majority_voting_expression") or {}
    knn = r["knn"]
    base = {"task": task, "seed": seed, "train": cost, "index_build": index_cost, "evaluate": evaluate_cost}
    return [{**base, "method": method, **head},
            {**base, "method": f"{method}+majority_voting", "accuracy": mv.get("accuracy"),
             "macro_f1": mv.get("macro_f1"), "balanced_accuracy": mv.get("balanced_accuracy")},
            {**base, "method": f"{method}+majority_voting_expression", "accuracy": mve.get("accuracy"),
             "macro_f1": mve.get("macro_f1"), "balanced_accuracy": mve.get("balanced_accuracy")},
            {**base, "method": f"{method}+knn", **{k: knn.get(k) for k in ("accuracy", "macro_f1", "balanced_accuracy",
                                                                           "rejection_rate", "n_cells_scored")},
             "coverage_with_unknown": (knn.get("with_unknown") or {}).get("coverage"),
             "accuracy_with_unknown": (knn.get("with_unknown") or {}).get("accuracy")}, *base_rows]


def run_peer(task: str, method: str, seed: int, ref: dict, query: dict, work: Path) -> list[dict]:
    pred = work / "predictions.csv"
    args = [ref["path"], ref["label"], query["path"], str(pred), "--ref-layer", ref["layer"], "--query-layer",
            query["layer"], *(["--ref-log1p"] if ref["log1p"] else []), *(["--query-log1p"] if query["log1p"] else [])]
    script = {"celltypist": "celltypist_run.py", "celltypist_fs": "celltypist_run.py", "scanvi": "scanvi_run.py",
              "singler": "singler_run.py"}.get(method, "logreg_run.py")
    extra = {"celltypist": ["--majority-voting"], "celltypist_fs": ["--feature-selection", "--majority-voting"],
             "logreg_748": ["--genes", str(DEMO_GENES)], "logreg_l1": ["--l1"]}.get(method, [])
    cost = timed([str(PEERS), str(HERE / "peers" / script), *args, *extra, "--seed", str(seed)], work / "peer.log")
    rows = []
    columns = ["predicted_labels"] + (["majority_voting"] if method.startswith("celltypist") else [])
    for column in columns:
        out = subprocess.run([sys.executable, str(HERE / "score_predictions.py"), str(pred), query["path"],
                              query["label"], "--classes-map", ref["map"], "--query-map", query["map"],
                              "--column", column], cwd=REPO, capture_output=True, text=True, check=True).stdout
        scored = json.loads(out)
        meta = json.loads(pred.with_suffix(".json").read_text())
        rows.append({"task": task, "seed": seed, "method": method + ("+majority_voting" if column != "predicted_labels"
                                                                     else ""),
                     "train": cost, **{k: v for k, v in scored.items() if k != "labels"},
                     "tool": {k: v for k, v in meta.items() if k not in ("wall_seconds", "peak_rss_mb")}})
    return rows


def _same_run(row: dict, task: str, method: str, seed: int) -> bool:
    """A line of this task, seed and method (its +knn, +majority_voting... rows included)."""
    return row["task"] == task and row["seed"] == seed and row["method"].split("+")[0] == method


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "real"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--methods", nargs="+", default=[*OURS, *PEER_METHODS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--redo", action="store_true",
                   help="run finished (task, method, seed) again and replace their lines (e.g. for a new figure)")
    a = p.parse_args()
    real = Path(a.real)
    if not (real / "pbmc3k_seurat.h5ad").is_file():
        sys.exit(f"the real PBMC data is not at {real} (set --real)")
    data = datasets(real)
    data["pbmc3k_ref80"], data["pbmc3k_query20"] = within_split(real)
    results = RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["method"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()
    for task in a.tasks:
        ref, query = (data[n] for n in TASKS[task])
        for method in a.methods:
            if "pretrained_28k" in method and not PRETRAINED_28K.is_dir():
                print(f"{method}: no base at {PRETRAINED_28K} (experiments/pretrained_base/README.md builds it)")
                continue
            for seed in (a.seeds if method in SEEDED else a.seeds[:1]):
                if (task, method, seed) in done and not a.redo:
                    continue
                work = OUT / "work" / task.replace(">", "") / method / f"seed{seed}"
                work.mkdir(parents=True, exist_ok=True)
                print(f"{task} {method} seed {seed}", flush=True)
                try:
                    rows = (run_ours if method in OURS else run_peer)(task, method, seed, ref, query, work)
                except RuntimeError as e:
                    print(f"  failed: {str(e)[:300]}", flush=True)
                    continue
                with open(results.with_suffix(".lock"), "w") as lock:  # several study3.py may share the file
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    kept = [line for line in (results.read_text().splitlines() if results.is_file() else [])
                            if not _same_run(json.loads(line), task, method, seed)]
                    results.write_text("".join(line + "\n" for line in kept + [json.dumps(row) for row in rows]))
                print("  " + ", ".join(f"{r['method']} {r.get('accuracy')}/{r.get('macro_f1')}" for r in rows),
                      flush=True)


if __name__ == "__main__":
    main()
