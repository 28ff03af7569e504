"""Tables and the plot of Study 3 from ``experiments/cross_study/study3/results.jsonl`` (written by study3.py):
``study3_results.json``, ``study3_table.md`` and ``in_vs_cross_macro_f1.png`` in experiments/cross_study/."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "study3" / "results.jsonl"
FIGURES = ("accuracy", "macro_f1", "balanced_accuracy", "ontology_aware_accuracy", "rejection_rate",
           "coverage_with_unknown", "accuracy_with_unknown")
IN_DISTRIBUTION = "within-pbmc3k"


def mean_sd(values: list) -> dict | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else 0.0,
            "n": len(v)}


def summarise(rows: list[dict]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"])].append(r)
    out: dict = {}
    for (task, method), rs in sorted(groups.items()):
        entry = {f: mean_sd([r.get(f) for r in rs]) for f in FIGURES}
        entry["n_cells_scored"] = rs[0].get("n_cells_scored")
        entry["seeds"] = sorted(r["seed"] for r in rs)
        entry["wall_s"] = mean_sd([sum((r.get(k) or {}).get("wall_s", 0) for k in ("train", "index_build", "evaluate"))
                                   for r in rs])
        entry["peak_rss_mb"] = max(max((r.get(k) or {}).get("peak_rss_mb") or 0 for k in ("train", "index_build",
                                                                                          "evaluate")) for r in rs)
        out.setdefault(task, {})[method] = entry
    return out


def fmt(x: dict | None) -> str:
    if x is None:
        return ""
    return f"{x['mean']:.3f}" + (f" ± {x['sd']:.3f}" if x["n"] > 1 else "")


def table(summary: dict) -> str:
    lines = []
    for task, methods in summary.items():
        n = next(iter(methods.values()))["n_cells_scored"]
        lines += [f"### {task} ({n} matched query cells)", "",
                  "| method | accuracy | macro-F1 | balanced acc. | ontology-aware | rejection of absent types | "
                  "coverage / acc. with unknown | wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        order = sorted(methods, key=lambda m: -(methods[m]["macro_f1"] or {"mean": 0})["mean"])
        for m in order:
            e = methods[m]
            cov = (f"{fmt(e['coverage_with_unknown'])} / {fmt(e['accuracy_with_unknown'])}"
                   if e["coverage_with_unknown"] else "")
            lines.append(f"| {m} | {fmt(e['accuracy'])} | {fmt(e['macro_f1'])} | {fmt(e['balanced_accuracy'])} | "
                         f"{fmt(e['ontology_aware_accuracy'])} | {fmt(e['rejection_rate'])} | {cov} | "
                         f"{fmt(e['wall_s'])} | {e['peak_rss_mb'] or ''} |")
        lines.append("")
    return "\n".join(lines)


#: the compact table: this project's recipes, then each peer at its best setting per task (the full table has all)
COMPACT_OURS = ("lora_default", "lora_default+majority_voting_expression", "lora_default+knn", "lora_epochs10",
               "lora_epochs10+majority_voting_expression", "lora_epochs20", "lora_panel",
               "lora_panel+majority_voting_expression", "lora_markers", "lora_augment",
               "lora_augment+majority_voting_expression",
               "lora_all_genes", "lora_all_genes+majority_voting_expression", "lora_pretrained_28k", "full_finetune",
               "probe")
COMPACT_PEERS = {"CellTypist (best setting)": ("celltypist", "celltypist_fs", "celltypist+majority_voting",
                                                "celltypist_fs+majority_voting"),
                 "SingleR": ("singler",), "scANVI": ("scanvi",),
                 "logistic regression (best)": ("logreg", "logreg_748", "logreg_l1")}


def compact(summary: dict) -> str:
    """One row per method family and task: accuracy / macro-F1 (mean ± sd over seeds, seeds in brackets)."""
    tasks = list(summary)
    cross = [t for t in tasks if t != IN_DISTRIBUTION]
    lines = ["| method | " + " | ".join(tasks) + " | mean cross-study macro-F1 |", "|---|" + "---|" * (len(tasks) + 1)]

    def mean_cross(entries: list[dict | None]) -> str:
        """The mean over the cross-study tasks of each task's mean macro-F1 (only when every task ran)."""
        f1 = [e["macro_f1"]["mean"] for t, e in zip(tasks, entries) if t in cross and e and e["macro_f1"]]
        return f"{np.mean(f1):.3f}" if len(f1) == len(cross) else ""

    def cell(e: dict | None, name: str = "") -> str:
        if not e or not e["macro_f1"]:
            return "not run"
        seeds = f" [{len(e['seeds'])}]" if len(e["seeds"]) > 1 else ""
        return f"{fmt(e['accuracy'])} / {fmt(e['macro_f1'])}{seeds}" + (f" ({name})" if name else "")

    for m in COMPACT_OURS:
        if any(m in summary[t] for t in tasks):
            entries = [summary[t].get(m) for t in tasks]
            lines.append(f"| {m} | " + " | ".join(cell(e) for e in entries) + f" | {mean_cross(entries)} |")
    for label, options in COMPACT_PEERS.items():
        row, entries = [], []
        for t in tasks:
            present = [o for o in options if o in summary[t] and summary[t][o]["macro_f1"]]
            best = max(present, key=lambda o: summary[t][o]["macro_f1"]["mean"]) if present else None
            row.append(cell(summary[t].get(best), best if len(options) > 1 else "") if best else "not run")
            entries.append(summary[t].get(best) if best else None)
        lines.append(f"| {label} | " + " | ".join(row) + f" | {mean_cross(entries)} |")
    return "\n".join(lines) + "\n"


#: recipes screened at one seed (0): read against the default's own seed-0 run, not its three-seed mean
SCREENS = ("lora_markers", "lora_panel1000", "lora_dropout03", "lora_train84", "lora_r32", "lora_r2", "lora_epochs10",
           "lora_wd01", "lora_smooth01", "lora_bn")


def screens(rows: list[dict], tasks: list[str]) -> str:
    """Macro-F1 per task at seed 0 of the default and each screened variant of it (same seed: same split)."""
    f1 = {(r["task"], r["method"]): r["macro_f1"] for r in rows if r.get("seed") == 0 and r.get("macro_f1") is not None}
    cross = [t for t in tasks if t != IN_DISTRIBUTION]
    lines = ["| recipe (seed 0, macro-F1) | " + " | ".join(tasks) + " | mean cross-study |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for m in ("lora_default", *SCREENS):
        if not all((t, m) in f1 for t in tasks):
            continue
        mean = np.mean([f1[(t, m)] for t in cross])
        lines.append(f"| {m} | " + " | ".join(f"{f1[(t, m)]:.3f}" for t in tasks) + f" | {mean:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if IN_DISTRIBUTION not in summary:
        return
    cross = [t for t in summary if t != IN_DISTRIBUTION]
    fig, ax = plt.subplots(figsize=(7, 6))
    for method, e in summary[IN_DISTRIBUTION].items():
        values = [summary[t][method]["macro_f1"]["mean"] for t in cross
                  if method in summary[t] and summary[t][method]["macro_f1"]]
        if not values or not e["macro_f1"]:
            continue
        ours = not method.startswith(("celltypist", "logreg", "scanvi", "singler"))
        ax.scatter(e["macro_f1"]["mean"], np.mean(values), marker="o" if ours else "s", color="C0" if ours else "C3")
        ax.annotate(method, (e["macro_f1"]["mean"], np.mean(values)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"in-distribution macro-F1 ({IN_DISTRIBUTION})")
    ax.set_ylabel(f"mean cross-study macro-F1 ({len(cross)} tasks)")
    ax.set_title("Study 3: in-distribution vs cross-study (circles: this project; squares: peers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    summary = summarise(rows)
    (HERE / "study3_results.json").write_text(json.dumps(
        {"command": "bash experiments/cross_study/run.sh", "summary": summary, "rows": rows}, indent=1))
    (HERE / "study3_table.md").write_text(
        "## Compact (accuracy / macro-F1)\n\n" + compact(summary) + "\n## Screens at seed 0\n\n"
        + screens(rows, list(summary)) + "\n" + table(summary))
    plot(summary, HERE / "in_vs_cross_macro_f1.png")
    print(compact(summary))
    print(screens(rows, list(summary)))


if __name__ == "__main__":
    main()
