"""The evaluation report as Markdown (report.md beside report.json)."""

from __future__ import annotations

import json


def render_markdown(report: dict, train_metrics: dict) -> str:
    m = report["model"]
    lines = [f"# Evaluation of `{report['run_dir']}`", "",
             f"Fine-tuning: `{json.dumps(train_metrics.get('finetune'))}`; base: "
             f"`{train_metrics.get('base_model', {}).get('source')}`; test cells: {report['n_cells']['test']}.", "",
             "| model | accuracy | macro-F1 | balanced accuracy |", "|---|---|---|---|",
             f"| this model | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['balanced_accuracy']:.3f} |"]
    for name, b in report.get("baselines", {}).items():
        lines.append(f"| {name} | {b['accuracy']:.3f} | {b['macro_f1']:.3f} | {b['balanced_accuracy']:.3f} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for c, v in m["per_class"].items()]
    lines += ["", "## Most confused pairs", "", "| true | predicted | cells | share of true class |", "|---|---|---|---|"]
    lines += [f"| {t['true']} | {t['predicted']} | {t['count']} | {t['fraction_of_true']:.2f} |"
              for t in report["top_confusions"]]
    f = report["forgetting"]
    c = report["calibration"]
    u = c["unknown_threshold"]
    lines += ["", "## Forgetting (base vs adapted embeddings, held-out test cells)", "",
              f"mean cosine {f['mean_cosine']:.3f}; kNN label agreement (k={f['k']}) {f['knn_agreement']:.3f}; "
              f"linear CKA {f['linear_cka']:.3f}", "",
              "## Calibration", "",
              f"temperature {c['temperature']} (fitted on validation); ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}; "
              f"'unknown' below confidence {u['threshold']:.2f} (validation accuracy >= {u['target_val_accuracy']}): "
              f"test coverage {u['test_coverage']:.2f} at accuracy {u['test_accuracy']:.3f}", "",
              "![confusion matrix](confusion_matrix.png)", "", "![embeddings: base vs adapted](embeddings.png)", ""]
    return "\n".join(lines)
