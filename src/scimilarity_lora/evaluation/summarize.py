"""Turn a multirun directory into a table (CSV + markdown) and a plot, and name the best run.

    python -m scimilarity_lora.evaluation.summarize outputs/multiruns/<date>/<time>
    python -m scimilarity_lora.evaluation.summarize <multirun> --metric query/pbmc3k_seurat/macro_f1

Each job's overrides (``.hydra/overrides.yaml``), its ``metrics.json`` and, if ``evaluate`` ran, its
``evaluation/report.json`` (baselines, forgetting, calibration) and the figures of every query it was scored on
(``evaluate.py ... query.path=...``: ``query/<name>/accuracy``, ``.../macro_f1``, ...) become one row. When the sweep varies ``seed``,
a second table averages every other setting over seeds (mean and standard deviation).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from scimilarity_lora.inference.runs import SELECT_METRIC, best_run, run_metrics

log = logging.getLogger(__name__)

METRICS = ["test/accuracy", "test/macro_f1", "val/macro_f1", "trainable_params", "total_params", "train_seconds"]


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def collect(multirun_dir: Path) -> pd.DataFrame:
    rows, override_keys = [], []
    for metrics_file in sorted(multirun_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name)
                               if p.parent.name.isdigit() else 0):
        job = metrics_file.parent
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row = {"job": job.name}
        for o in overrides:
            key, _, value = str(o).lstrip("+~").partition("=")
            row[key] = value
            if key not in override_keys:
                override_keys.append(key)
        metrics = run_metrics(job)
        row.update({k: metrics.get(k) for k in METRICS})
        row.update({k: v for k, v in metrics.items() if k.startswith("query/") and k.count("/") == 2})
        row["finetune"] = metrics.get("finetune", {}).get("mode")
        report_file = job / "evaluation" / "report.json"
        if report_file.is_file():
            report = json.loads(report_file.read_text())
            row.update({f"forgetting/{k}": report["forgetting"][k] for k in ("mean_cosine", "knn_agreement", "linear_cka")})
            for name, b in report.get("baselines", {}).items():
                row[f"{name}/macro_f1"] = b["macro_f1"]
                row[f"{name}/accuracy"] = b["accuracy"]
            row["ece_after"] = report["calibration"]["ece_after"]
        rows.append(row)
    if not rows:
        raise ValueError(f"no finished runs (metrics.json) under {multirun_dir}")
    df = pd.DataFrame(rows)
    df.attrs["override_keys"] = override_keys
    return df


def over_seeds(df: pd.DataFrame) -> pd.DataFrame | None:
    if "seed" not in df.columns or df["seed"].nunique() < 2:
        return None
    # every swept setting except the seed (a sweep's own overrides); 'finetune' is also a metrics column
    keys = [k for k in df.attrs.get("override_keys", []) if k != "seed" and df[k].nunique() > 1] or ["finetune"]
    numeric = [c for c in df.columns if c not in keys + ["job", "seed"] and pd.api.types.is_numeric_dtype(df[c])]
    grouped = df.groupby(keys, dropna=False)[numeric].agg(["mean", "std"])
    grouped.columns = [f"{a} {b}" for a, b in grouped.columns]
    grouped.insert(0, "n_seeds", df.groupby(keys, dropna=False).size())
    return grouped.reset_index()


def plot(df: pd.DataFrame, path: Path) -> Path | None:
    from scimilarity_lora.evaluation.plots import headless_pyplot

    plt = headless_pyplot()

    x_key = "lora.r" if "lora.r" in df.columns else "trainable_params"
    x = pd.to_numeric(df[x_key], errors="coerce")
    if x.isna().all():
        x_key, x = "trainable_params", df["trainable_params"]
    has_forgetting = "forgetting/linear_cka" in df.columns
    fig, axes = plt.subplots(1, 2 if has_forgetting else 1, figsize=(11 if has_forgetting else 6, 4), squeeze=False)
    groups = df["lora.target_modules"] if "lora.target_modules" in df.columns else df["finetune"]
    for name in sorted(groups.dropna().unique()):
        m = groups == name
        axes[0, 0].scatter(x[m], df.loc[m, "test/macro_f1"], label=str(name))
        if has_forgetting:
            axes[0, 1].scatter(x[m], df.loc[m, "forgetting/linear_cka"], label=str(name))
    for ax, ylabel in zip(axes[0], ["test macro-F1", "linear CKA base vs adapted (1 = no forgetting)"]):
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        if x_key in ("lora.r", "trainable_params"):
            ax.set_xscale("log")
        if x_key == "lora.r":
            ticks = sorted(x.dropna().unique())
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(multirun_dir: str | Path, metric: str = SELECT_METRIC) -> dict:
    multirun_dir = Path(multirun_dir)
    df = collect(multirun_dir)
    df.to_csv(multirun_dir / "summary.csv", index=False)
    best = best_run(multirun_dir, metric)
    parts = [f"# Sweep summary: `{multirun_dir}`", "", f"Best run by {metric}: `{best}`", "",
             markdown_table(df)]
    seeds = over_seeds(df)
    if seeds is not None:
        seeds.to_csv(multirun_dir / "summary_over_seeds.csv", index=False)
        parts += ["", "## Mean and standard deviation over seeds", "", markdown_table(seeds, 3)]
    plot(df, multirun_dir / "summary.png")
    (multirun_dir / "summary.md").write_text("\n".join(parts) + "\n")
    return {"best_run": str(best), "metric": metric, "n_runs": len(df), "table": str(multirun_dir / "summary.csv")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Summarize a Hydra multirun directory.")
    p.add_argument("multirun_dir")
    p.add_argument("--metric", default=SELECT_METRIC,
                   help="rank runs by this key (default val/macro_f1; e.g. query/<query name>/macro_f1 after "
                        "evaluate.py ... query.path=...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(summarize(args.multirun_dir, args.metric)))


if __name__ == "__main__":
    main()
