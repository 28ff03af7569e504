"""Score a trained model on another study's labelled cells: ``python evaluate.py run_dir=<run> query.path=<.h5ad>
query.label_key=<col>``.

The query's labels meet the model's classes through :mod:`.label_matching` (by name, through ``query.label_map``,
or through the Cell Ontology). Reported, over the cells whose label has one right class, with every cell given its
best class (the way peers such as CellTypist are scored): ``accuracy``, ``macro_f1`` (over the classes present in
the query's matched labels, as scikit-learn's ``f1_score(labels=<those>, average="macro")``), ``balanced_accuracy``
and per-class figures; ``ontology_aware_accuracy`` (also over labels that are an ancestor of model classes); under
``with_unknown`` the coverage and accuracy when "unknown" and coarse answers apply; the rejection rate of labels the
model cannot know (``novel_types``); per-cell and majority-voted figures; labels that matched nothing
(``unmapped_labels``). Written to ``<run>/evaluation/query/<file stem>/{report.json, report.md, metrics.json,
confusion_matrix.png}``; ``metrics.json`` holds flat ``query/<stem>/...`` keys that ``summarize`` ranks by.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scimilarity_lora.data.io import DataError, expression_matrix, gene_names, read_anndata, validate_matrix
from scimilarity_lora.data.ontology import read_label_map
from scimilarity_lora.evaluation.label_matching import (MATCHED, LabelMatch, coarse_correct, match_labels,
                                                        ontology_correct)
from scimilarity_lora.evaluation.metrics import classification_report
from scimilarity_lora.evaluation.plots import plot_confusion_matrix
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.runs import MODEL_DIR

log = logging.getLogger(__name__)

QUERY_DIR = "query"
#: query.label_map: query_label -> a class or CL id ("" = a type the model cannot know); or a label,cl_id table
MAP_COLUMNS = (("query_label", "model_label"), ("label", "cl_id"))
#: the figures copied into metrics.json as query/<stem>/<key>
FLAT_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "ontology_aware_accuracy", "rejection_rate",
             "majority_voting/accuracy", "majority_voting/macro_f1", "majority_voting_expression/accuracy",
             "majority_voting_expression/macro_f1", "with_unknown/head/coverage",
             "with_unknown/head/accuracy", "with_unknown/coarse/coverage", "with_unknown/coarse/accuracy",
             "knn/accuracy", "knn/macro_f1", "knn/balanced_accuracy", "knn/rejection_rate", "knn/with_unknown/coverage",
             "knn/with_unknown/accuracy")


def query_name(path: str) -> str:
    """The query's name in reports and metric keys: its file stem (or the bundled dataset's name)."""
    return Path(str(path)).name.removesuffix(".h5ad")


def read_query_labels(adata, label_key: str, ontology_key: str | None) -> tuple[np.ndarray, dict[str, str]]:
    if label_key not in adata.obs.columns:
        raise DataError(f"query label column {label_key!r} not in obs; available columns: {list(adata.obs.columns)}")
    labels = adata.obs[label_key].astype("string").to_numpy(dtype=object, na_value=None)
    terms: dict[str, str] = {}
    if ontology_key:
        if ontology_key not in adata.obs.columns:
            raise DataError(f"query ontology column {ontology_key!r} not in obs; columns: {list(adata.obs.columns)}")
        from scimilarity_lora.data.ontology import observed_terms

        terms = observed_terms(labels, adata.obs[ontology_key].astype("string"))
    return labels, terms


def evaluate_query(model: str | Path | CellTypePredictor, path: str, label_key: str = "cell_type", *,
                   layer: str | None = "X", input_is_log1p: bool = False, ontology_key: str | None = None,
                   label_map: str | dict | None = None, gene_symbols_key: str | None = None,
                   min_gene_overlap: int = 50, majority_voting: bool = True, expression_voting: bool = True,
                   batch_size: int = 4096, seed: int = 0, reference: "str | Path | None" = None,
                   k: int = 15) -> dict[str, Any]:
    """The report (a dict) of ``model`` on the labelled query at ``path`` (see the module docstring); with
    ``reference`` (an index directory) also the kNN labels of that index under ``knn``. ``majority_voting`` votes
    over clusters of the embedding, ``expression_voting`` over clusters of the query's own expression
    (CellTypist's over-clustering, :func:`~scimilarity_lora.inference.majority.expression_clusters`)."""
    predictor = model if isinstance(model, CellTypePredictor) else CellTypePredictor.load(model)
    index = None
    if reference is not None:
        from scimilarity_lora.inference.reference.query import open_reference

        index = open_reference(reference)
    adata = read_anndata(str(path)) if isinstance(path, (str, Path)) else path  # a file, or an AnnData in memory
    if not isinstance(path, (str, Path)):
        path = f"in-memory AnnData ({adata.n_obs} cells)"
    labels, query_terms = read_query_labels(adata, label_key, ontology_key)
    mapping = read_label_map(label_map, columns=MAP_COLUMNS)
    X, var_names, var = expression_matrix(adata, layer)
    validate_matrix(X, replace(predictor.preprocessing, input_is_log1p=input_is_log1p), f"query {path}")
    genes = gene_names(var_names, var, gene_symbols_key)
    result = predictor.predict_cells(X, genes, input_is_log1p=input_is_log1p, batch_size=batch_size,
                                     min_overlap=min_gene_overlap, progress=False)
    alignment = predictor.alignment(genes, None, min_gene_overlap)

    has_label = np.array([x is not None for x in labels])
    counts = Counter(labels[has_label & result.expressed])
    matches = match_labels(counts, predictor.classes, predictor.class_terms, mapping, query_terms)
    if not any(m.kind in MATCHED for m in matches.values()):
        raise DataError(f"no query label matches a model class (by name, through query.label_map or through the Cell "
                        f"Ontology): query labels {sorted(counts)[:20]}; model classes {predictor.classes}; "
                        "give query.label_map=<csv query_label,model_label> or query.ontology_key=<obs column of CL ids>")
    clusters = None
    if expression_voting:
        from scimilarity_lora.inference.majority import expression_clusters

        clusters = expression_clusters(X, input_is_log1p, seed=seed)
    report = score(predictor, labels, result, matches, seed=seed, majority_voting=majority_voting,
                   expression_clusters=clusters)
    report.update(query=str(path), label_key=label_key, layer=layer, input_is_log1p=bool(input_is_log1p),
                  gene_overlap={k: v for k, v in alignment.summary().items() if k != "rescued_by_alias"},
                  n_cells_in_file=int(adata.n_obs), n_cells_unlabelled=int((~has_label).sum()),
                  n_cells_without_expression=int((has_label & ~result.expressed).sum()))
    if index is not None:
        from scimilarity_lora.inference.reference.query import index_embeddings

        z = index_embeddings(index, predictor, result.embeddings, X, genes, None, input_is_log1p, min_gene_overlap,
                             batch_size)
        knn = index.annotate(z[result.expressed], k)
        report["knn"] = score_knn(index.classes, {c: predictor.class_terms.get(c) for c in index.classes}, labels,
                                  result.expressed, knn, mapping, query_terms)
        report["knn"].update(reference=str(index.path), k=int(k), novelty_threshold=index.novelty_threshold,
                             encoder_kind=index.identity["kind"])
    return report


def score_knn(classes: list[str], class_terms: dict, labels: np.ndarray, expressed: np.ndarray, knn,
              mapping: dict | None, query_terms: dict) -> dict[str, Any]:
    """The kNN labels scored like the head: every matched cell its voted class; with "unknown" beyond the
    index's distance threshold (coverage, accuracy); the rejection rate of types the reference does not hold."""
    has = np.array([x is not None for x in labels]) & expressed
    matches = match_labels(Counter(labels[has]), classes, class_terms, mapping, query_terms)
    best = np.full(len(labels), -1)
    status = np.full(len(labels), "no_expression", dtype=object)
    best[expressed], status[expressed] = knn.best, knn.status
    kind = np.array([matches[x].kind if h else "" for x, h in zip(labels, has)], dtype=object)
    matched = np.isin(kind, MATCHED)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[matches[x].target] for x in labels[matched]], dtype=np.int64)
    out: dict[str, Any] = {"classes": list(classes), "n_cells_scored": int(matched.sum())}
    if matched.any():
        out.update(_head_metrics(classification_report(y, best[matched], classes), per_class=False))
        ok = status[matched] == "ok"
        out["with_unknown"] = {"coverage": round(float(ok.mean()), 4),
                               "accuracy": round(float((best[matched] == y)[ok].mean()), 4) if ok.any() else None}
    novel = kind == "novel"
    out["rejection_rate"] = round(float((status[novel] == "novel").mean()), 4) if novel.any() else None
    out["n_cells_novel_types"] = int(novel.sum())
    return out


def score(predictor: CellTypePredictor, labels: np.ndarray, result, matches: dict[str, LabelMatch], *,
          seed: int = 0, majority_voting: bool = True,
          expression_clusters: np.ndarray | None = None) -> dict[str, Any]:
    """Every figure of the report from per-cell predictions and label matches (pure: tested on built cases).
    ``majority_voting``: also vote over Leiden clusters of the embedding; ``expression_clusters`` (one cluster per
    cell, None for none): also vote over them (``majority_voting_expression``)."""
    classes = list(predictor.classes)
    index = {c: i for i, c in enumerate(classes)}
    scored = np.array([x is not None for x in labels]) & result.expressed
    kind = np.array([matches[x].kind if s else "" for x, s in zip(labels, scored)], dtype=object)
    best = np.asarray(classes, dtype=object)[result.probs.argmax(axis=1)]
    matched = np.isin(kind, MATCHED)
    y = np.array([index[matches[x].target] for x in labels[matched]], dtype=np.int64)
    pred = result.probs[matched].argmax(axis=1)
    report: dict[str, Any] = {"classes": classes, "n_cells_scored": int(matched.sum())}
    report.update(_head_metrics(classification_report(y, pred, classes)))

    related = matched | (kind == "ancestor")
    onto = [ontology_correct(matches[x], p, predictor.class_terms) for x, p in zip(labels[related], best[related])]
    report["ontology_aware_accuracy"] = round(float(np.mean(onto)), 4) if onto else None
    report["n_cells_ontology_aware"] = int(related.sum())

    answers, terms = predictor.answer_with_terms(result.probs, result.status)
    report["with_unknown"] = _with_unknown(labels, matched, result.status, answers, terms, best, matches)
    report["novel_types"] = _rejection(labels, kind, result.status)
    report["rejection_rate"] = report["novel_types"]["rejection_rate"]
    report["labels"] = {k: m.to_dict() for k, m in sorted(matches.items())}
    report["unmapped_labels"] = {k: m.n_cells for k, m in sorted(matches.items()) if m.kind == "unmapped"}
    if report["unmapped_labels"]:
        log.warning("query labels matched to nothing (give them in query.label_map, empty model_label for a type "
                    "the model cannot know): %s", report["unmapped_labels"])
    report["crosstab"] = _crosstab(labels[scored], best[scored], classes)
    if majority_voting and matched.sum() >= 3:
        from scimilarity_lora.inference.majority import over_cluster

        clusters = over_cluster(np.where(result.expressed[:, None], result.embeddings, np.nan), seed=seed)
        report["majority_voting"] = _voted(y, best, result.expressed, matched, clusters, classes)
    if expression_clusters is not None and matched.sum() >= 3:
        report["majority_voting_expression"] = _voted(y, best, result.expressed, matched, expression_clusters,
                                                      classes)
    return report


def _voted(y: np.ndarray, best: np.ndarray, expressed: np.ndarray, matched: np.ndarray, clusters: np.ndarray,
           classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and balanced accuracy of the per-cluster majority of the head's best classes."""
    from scimilarity_lora.inference.majority import majority_vote

    index = {c: i for i, c in enumerate(classes)}
    voted, frequency = majority_vote(np.where(expressed, best, None), clusters)
    pred = np.array([index[v] if v is not None else -1 for v in voted[matched]], dtype=np.int64)
    return {**_head_metrics(classification_report(y, pred, classes), per_class=False),
            "n_clusters": int(len({c for c in clusters if c is not None})),
            "mean_frequency": round(float(np.nanmean(frequency[matched])), 4)}


def _head_metrics(r: dict, per_class: bool = True) -> dict:
    out = {k: round(r[k], 4) for k in ("accuracy", "macro_f1", "balanced_accuracy")}
    if per_class:
        out["per_class"] = {c: v for c, v in r["per_class"].items() if v["support"] > 0 or v["precision"] > 0}
        out["confusion_matrix"] = r["confusion_matrix"]
    return out


def _with_unknown(labels, matched, status, answers, terms, best, matches) -> dict:
    """Coverage and accuracy on the matched cells: the head alone ("unknown" for every status but ok), and with
    coarse answers (right when the answered term is the label's CL id or an ancestor of it)."""
    st = np.asarray(status, dtype=object)[matched]
    ok, coarse = st == "ok", st == "coarse"
    lab, bst = labels[matched], best[matched]
    right_ok = np.array([bst[i] == matches[lab[i]].target for i in range(len(lab))], dtype=bool)
    terms_m = np.asarray(terms, dtype=object)[matched]
    right_coarse = np.array([bool(coarse[i]) and coarse_correct(matches[lab[i]], terms_m[i]) for i in range(len(lab))],
                            dtype=bool)
    n = max(len(lab), 1)
    covered = ok | coarse
    return {
        "head": {"coverage": round(float(ok.sum() / n), 4),
                 "accuracy": round(float(right_ok[ok].mean()), 4) if ok.any() else None},
        "coarse": {"coverage": round(float(covered.sum() / n), 4),
                   "accuracy": round(float((right_ok & ok | right_coarse)[covered].mean()), 4) if covered.any() else None,
                   "fraction_coarse": round(float(coarse.sum() / n), 4),
                   "coarse_accuracy": round(float(right_coarse[coarse].mean()), 4) if coarse.any() else None,
                   "answers": dict(Counter(np.asarray(answers, dtype=object)[matched][coarse]).most_common())},
        "neither_class_nor_ancestor": round(float(1 - covered.sum() / n), 4),
        "status_counts": dict(Counter(st)),
    }


def _rejection(labels, kind, status) -> dict:
    """Cells of labels the model cannot know: the share answered "unknown" (not a class, not a coarse term), per
    label and overall; also without coarse answers (every status but ok)."""
    novel = kind == "novel"
    st = np.asarray(status, dtype=object)
    per_label = {}
    for label in sorted({str(x) for x in labels[novel]}):
        rows = novel & (labels == label)
        per_label[label] = {"n_cells": int(rows.sum()),
                            "rejected": round(float(np.isin(st[rows], ("low_confidence", "novel")).mean()), 4),
                            "rejected_without_coarse": round(float((st[rows] != "ok").mean()), 4)}
    return {"n_cells": int(novel.sum()),
            "rejection_rate": round(float(np.isin(st[novel], ("low_confidence", "novel")).mean()), 4) if novel.any()
            else None,
            "rejection_rate_without_coarse": round(float((st[novel] != "ok").mean()), 4) if novel.any() else None,
            "per_label": per_label}


def _crosstab(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    table = pd.crosstab(pd.Series(labels, name="query"), pd.Series(predicted, name="predicted"))
    return {str(r): {c: int(table.loc[r, c]) for c in classes if c in table.columns and table.loc[r, c] > 0}
            for r in table.index}


def flat_metrics(report: dict, name: str) -> dict[str, float | None]:
    """``query/<name>/<key>`` for sweeps (``summarize`` ranks runs by them) and W&B."""
    out = {}
    for key in FLAT_KEYS:
        value: Any = report
        for part in key.split("/"):
            value = value.get(part) if isinstance(value, dict) else None
        out[f"query/{name}/{key}"] = value
    return out


def write_query_report(run_dir: str | Path, report: dict, name: str) -> Path:
    """``<run>/evaluation/query/<name>/``: report.json, metrics.json, report.md, confusion_matrix.png."""
    out = Path(run_dir) / "evaluation" / QUERY_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "metrics.json").write_text(json.dumps(flat_metrics(report, name), indent=2))
    rows = sorted(report["crosstab"])
    table = [[report["crosstab"][r].get(c, 0) for c in report["classes"]] for r in rows]
    kinds = {r: report["labels"].get(r, {}).get("kind", "") for r in rows}
    plot_confusion_matrix(table, report["classes"], out / "confusion_matrix.png", row_labels=[
        f"{r} [{kinds[r]}]" for r in rows], ylabel=f"query label ({report['label_key']})",
        title=f"{name}: query labels x predicted class (row-normalised)")
    (out / "report.md").write_text(render_query_markdown(report, name))
    return out


def render_query_markdown(r: dict, name: str) -> str:
    def f(v: Any) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    u, c = r["with_unknown"]["head"], r["with_unknown"]["coarse"]
    lines = [f"# `{name}` scored by this model", "",
             f"Query `{r['query']}` (`{r['label_key']}`): {r['n_cells_scored']} cells with a matching class, of "
             f"{r['n_cells_in_file']}; genes used {r['gene_overlap']['n_overlap']} of the model's "
             f"{r['gene_overlap']['n_model_genes']}.", "",
             "| figure | value |", "|---|---|",
             f"| accuracy (every cell its best class) | {f(r['accuracy'])} |",
             f"| macro-F1 (classes present in the query) | {f(r['macro_f1'])} |",
             f"| balanced accuracy | {f(r['balanced_accuracy'])} |",
             f"| ontology-aware accuracy ({r['n_cells_ontology_aware']} cells) | {f(r['ontology_aware_accuracy'])} |",
             f"| with 'unknown': coverage / accuracy | {f(u['coverage'])} / {f(u['accuracy'])} |",
             f"| with coarse answers: coverage / accuracy | {f(c['coverage'])} / {f(c['accuracy'])} |",
             f"| rejection rate of types the model cannot know | {f(r['rejection_rate'])} |"]
    for key, over in (("majority_voting", "the embedding"), ("majority_voting_expression", "the query's expression")):
        if key in r:
            mv = r[key]
            lines.append(f"| majority voting over {mv['n_clusters']} clusters of {over}: accuracy / macro-F1 | "
                         f"{f(mv['accuracy'])} / {f(mv['macro_f1'])} |")
    if "knn" in r:
        kn = r["knn"]
        lines.append(f"| kNN on the reference index (k={kn['k']}, {kn['encoder_kind']}): accuracy / macro-F1 / "
                     f"balanced accuracy | {f(kn.get('accuracy'))} / {f(kn.get('macro_f1'))} / "
                     f"{f(kn.get('balanced_accuracy'))} |")
        wu = kn.get("with_unknown") or {}
        lines.append(f"| kNN with 'unknown' beyond distance {kn['novelty_threshold']:.4f}: coverage / accuracy | "
                     f"{f(wu.get('coverage'))} / {f(wu.get('accuracy'))} |")
        lines.append(f"| kNN rejection rate of types the reference does not hold | {f(kn.get('rejection_rate'))} |")
    lines += ["", "## Query labels", "", "| label | matched as | class | CL id | cells |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {m['kind']} | {m.get('target') or ', '.join(m.get('covers', []))} | {m.get('term', '')} | "
              f"{m['n_cells']} |" for k, m in r["labels"].items()]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for k, v in r["per_class"].items()]
    if r["novel_types"]["per_label"]:
        lines += ["", "## Types the model cannot know", "", "| label | cells | answered unknown |", "|---|---|---|"]
        lines += [f"| {k} | {v['n_cells']} | {v['rejected']:.3f} |" for k, v in r["novel_types"]["per_label"].items()]
    lines += ["", "![query labels x predicted class](confusion_matrix.png)", ""]
    return "\n".join(lines)


def evaluate_query_run(run_dir: str | Path, query: dict[str, Any], wandb_project: str | None = None) -> dict:
    """``evaluate.py run_dir=... query.path=...``: the report for one query, written into the run."""
    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_DIR if (run_dir / MODEL_DIR).is_dir() else run_dir
    if not (model_dir / "model_config.json").is_file():
        raise DataError(f"{run_dir} is neither a finished training run (with model/) nor a model directory")
    name = query.get("name") or query_name(query["path"])
    report = evaluate_query(model_dir, query["path"], query.get("label_key") or "cell_type",
                            layer=query.get("layer", "X"), input_is_log1p=bool(query.get("input_is_log1p", False)),
                            ontology_key=query.get("ontology_key"), label_map=query.get("label_map"),
                            gene_symbols_key=query.get("gene_symbols_key"),
                            min_gene_overlap=int(query.get("min_gene_overlap", 50)),
                            majority_voting=bool(query.get("majority_voting", True)),
                            expression_voting=bool(query.get("expression_voting", True)),
                            reference=query.get("reference"), k=int(query.get("k", 15)))
    out = write_query_report(run_dir, report, name)
    log.info("%s: accuracy %.3f, macro-F1 %.3f, ontology-aware accuracy %s on %d cells -> %s", name,
             report["accuracy"], report["macro_f1"], report["ontology_aware_accuracy"], report["n_cells_scored"], out)
    if wandb_project:
        _log_query_to_wandb(run_dir, out, report, name, wandb_project)
    return report


def _log_query_to_wandb(run_dir: Path, out: Path, report: dict, name: str, project: str) -> None:
    import wandb

    metrics_file = run_dir / "metrics.json"
    group = json.loads(metrics_file.read_text()).get("wandb_group") if metrics_file.is_file() else None
    run = wandb.init(project=project, group=group or str(run_dir), job_type="evaluate-query",
                     name=f"query-{name}-{run_dir.name}", dir=str(out), reinit="finish_previous",
                     config={"run_dir": str(run_dir), "query": report["query"]})
    run.log({**{k: v for k, v in flat_metrics(report, name).items() if v is not None},
             f"query/{name}/confusion_matrix": wandb.Image(str(out / "confusion_matrix.png"))})
    run.finish()
