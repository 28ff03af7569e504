"""Labels that travel between studies: CL ids per class, matching another study's labels, ontology-aware scoring,
coarse answers instead of "unknown", majority voting, and the query evaluation end to end."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers import FAST, REPO, compose_train
from scimilarity_lora.data.ontology import OntologyError, coarse_terms, ontology_record, read_label_map
from scimilarity_lora.evaluation.label_matching import coarse_correct, match_labels, ontology_correct
from scimilarity_lora.inference.calibration import Calibration
from scimilarity_lora.inference.coarse import CoarseTerms
from scimilarity_lora.inference.majority import expression_clusters, leiden_resolution, majority_vote

# real CL ids: naive CD4 T, memory CD4 T, CD8 T, naive CD8 T, B cell
NAIVE_CD4, MEMORY_CD4, CD8, NAIVE_CD8, B = "CL:0000895", "CL:0000897", "CL:0000625", "CL:0000900", "CL:0000236"
CD4_T, T_CELL, PLATELET, MONOCYTE, CD14_MONO = "CL:0000624", "CL:0000084", "CL:0000233", "CL:0000576", "CL:0001054"
CLASSES = ["B", "CD4 memory", "CD4 naive", "CD8", "CD8 naive"]
TERMS = {"B": B, "CD4 memory": MEMORY_CD4, "CD4 naive": NAIVE_CD4, "CD8": CD8, "CD8 naive": NAIVE_CD8}


# -- matching another study's labels --------------------------------------------------------------------------------
def test_labels_match_exactly_through_the_map_and_through_the_ontology():
    counts = {"B": 5, "Naive CD4 T": 4, "helper": 3, "T cell": 6, "Platelet": 2, "odd": 1, "gone": 2, "CD8 T": 3}
    m = match_labels(counts, CLASSES, TERMS,
                     label_map={"helper": "CD4 memory", "gone": "", "CD8 T": CD8},
                     query_terms={"Naive CD4 T": NAIVE_CD4, "T cell": T_CELL, "Platelet": PLATELET})
    assert (m["B"].kind, m["B"].target, m["B"].term) == ("exact", "B", B)
    assert (m["helper"].kind, m["helper"].target) == ("mapped", "CD4 memory")
    assert (m["Naive CD4 T"].kind, m["Naive CD4 T"].target) == ("ontology", "CD4 naive")
    assert (m["CD8 T"].kind, m["CD8 T"].target) == ("ontology", "CD8")  # a CL id in the map; CD8 naive is under it
    # an ancestor of several classes: no single right class, every class under it is right ontology-aware
    assert m["T cell"].kind == "ancestor" and m["T cell"].covers == ["CD4 memory", "CD4 naive", "CD8", "CD8 naive"]
    assert m["Platelet"].kind == "novel" and m["gone"].kind == "novel"  # related to no class / declared unknowable
    assert m["odd"].kind == "unmapped" and m["odd"].n_cells == 1  # listed, never silently dropped


def test_a_query_type_finer_than_the_models_classes_matches_the_most_specific_class_above_it():
    m = match_labels({"CD14 mono": 3}, ["mono", "T"], {"mono": MONOCYTE, "T": T_CELL},
                     query_terms={"CD14 mono": CD14_MONO})
    assert (m["CD14 mono"].kind, m["CD14 mono"].target) == ("ontology", "mono")


def test_a_map_entry_that_names_neither_a_class_nor_a_cl_id_is_refused():
    with pytest.raises(ValueError, match=r"maps 'x' to 'CD4 T', which is neither a model class nor a CL id"):
        match_labels({"x": 1}, CLASSES, TERMS, label_map={"x": "CD4 T"})
    with pytest.raises(OntologyError, match=r"'CL:9999999' is not a Cell Ontology id"):
        match_labels({"x": 1}, CLASSES, TERMS, label_map={"x": "CL:9999999"})


def test_ontology_aware_correctness_counts_at_the_level_the_labels_share():
    m = match_labels({"T cell": 1, "CD8 T": 1}, CLASSES, TERMS, query_terms={"T cell": T_CELL, "CD8 T": CD8})
    assert ontology_correct(m["T cell"], "CD8 naive", TERMS) and ontology_correct(m["T cell"], "CD4 memory", TERMS)
    assert not ontology_correct(m["T cell"], "B", TERMS)
    assert ontology_correct(m["CD8 T"], "CD8 naive", TERMS)   # more specific than the truth: right at CD8 T's level
    assert ontology_correct(m["CD8 T"], "CD8", TERMS) and not ontology_correct(m["CD8 T"], "CD4 naive", TERMS)
    assert coarse_correct(m["CD8 T"], T_CELL) and not coarse_correct(m["CD8 T"], CD4_T)


def test_label_maps_read_from_csv_and_packaged(tmp_path):
    csv = tmp_path / "map.csv"
    csv.write_text("query_label,model_label\nNaive CD4 T,CD4 naive\nDC,\n")
    assert read_label_map(csv, (("query_label", "model_label"),)) == {"Naive CD4 T": "CD4 naive", "DC": ""}
    bulk = read_label_map("packaged:pbmc68k_bulk_labels")
    assert len(bulk) == 10 and bulk["CD4+/CD45RA+/CD25- Naive T"] == NAIVE_CD4
    with pytest.raises(OntologyError, match="needs columns label,cl_id"):
        read_label_map(csv)
    with pytest.raises(OntologyError, match="no packaged label mapping 'nope'"):
        read_label_map("packaged:nope")


# -- coarse answers -----------------------------------------------------------------------------------------------
def _calibration(threshold=0.9, coarse=True, n_classes=len(CLASSES), latent=4, coarse_novelty=np.inf):
    centroids = np.eye(n_classes, latent, dtype=np.float32)
    return Calibration(1.0, threshold, novelty_threshold=0.5, centroids=centroids, coarse=coarse,
                       coarse_novelty_threshold=coarse_novelty)


def _predictor(calibration, terms=TERMS, classes=CLASSES):
    from dataclasses import replace

    from helpers import make_predictor
    from scimilarity_lora.inference.predictor import CellTypePredictor

    p = make_predictor(6, latent=4, classes=classes)
    spec = replace(p.spec, ontology=ontology_record(terms, classes) if terms else {})
    return CellTypePredictor(p.classifier, spec, calibration=calibration)


def test_coarse_terms_are_ancestors_of_some_classes_but_not_all_and_never_uninformative_roots():
    terms = coarse_terms(TERMS, CLASSES)
    by_label = {t["label"]: t["classes"] for t in terms}
    assert by_label["CD4-positive, alpha-beta T cell"] == [1, 2]
    assert by_label["T cell"] == [1, 2, 3, 4]  # the most general of the terms over the same four classes
    assert "alpha-beta T cell" not in by_label and "mature T cell" not in by_label
    assert not any(len(c) == len(CLASSES) for c in by_label.values())  # "lymphocyte" covers all five: dropped
    assert "cell" not in by_label


def test_two_sibling_classes_at_half_and_045_answer_their_parent():
    probs = np.array([[0.05, 0.50, 0.45, 0.0, 0.0],    # CD4 memory vs naive -> CD4 alpha-beta T
                      [0.02, 0.30, 0.28, 0.40, 0.0],   # all T subsets -> T cell
                      [0.95, 0.05, 0.0, 0.0, 0.0],     # confident: B
                      [0.50, 0.45, 0.05, 0.0, 0.0]])   # B vs CD4 memory: nothing under both passes -> unknown
    z = np.tile(np.eye(5, 4, k=0, dtype=np.float32)[[1]], (4, 1))  # at a centroid: not novel
    pred = _predictor(_calibration())
    status = pred.status(probs, z)
    labels, terms = pred.answer_with_terms(probs, status)
    assert list(status) == ["coarse", "coarse", "ok", "low_confidence"]
    assert labels == ["CD4-positive, alpha-beta T cell", "T cell", "B", "unknown"]
    assert terms == [CD4_T, T_CELL, B, None]
    forced = pred.answer_with_terms(probs, status, force_label=True)
    assert forced == (["CD4 memory", "CD8", "B", "B"], [MEMORY_CD4, CD8, B, B])
    assert list(pred.status(probs, z, coarse=False)) == ["low_confidence", "low_confidence", "ok", "low_confidence"]


def test_novel_or_atypical_cells_and_models_without_cl_ids_never_answer_coarsely():
    probs = np.array([[0.05, 0.50, 0.45, 0.0, 0.0]])
    far = np.array([[0.0, 0.0, 0.0, 1.0]], dtype=np.float32) * -1  # unlike every centroid
    assert list(_predictor(_calibration()).status(probs, far)) == ["novel"]
    edge = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)  # inside the novelty threshold, past the coarse one
    assert list(_predictor(_calibration(coarse_novelty=0.05)).status(probs, edge)) == ["low_confidence"]
    assert list(_predictor(_calibration(coarse_novelty=0.5)).status(probs, edge)) == ["coarse"]
    near = np.eye(5, 4, dtype=np.float32)[[1]]
    assert list(_predictor(_calibration(), terms=None).status(probs, near)) == ["low_confidence"]
    assert list(_predictor(_calibration(coarse=False)).status(probs, near)) == ["low_confidence"]


def test_coarse_choice_prefers_the_most_specific_term_then_the_larger_mass():
    ct = CoarseTerms(("A", "B", "C"), ("a", "b", "c"), np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]], bool))
    probs = np.array([[0.40, 0.45, 0.15, 0.0], [0.10, 0.45, 0.40, 0.05], [0.3, 0.35, 0.3, 0.05], [0.5, 0.0, 0.0, 0.5]])
    assert list(ct.choose(probs, 0.8)) == [0, 1, 2, -1]


# -- majority voting ------------------------------------------------------------------------------------------------
def test_majority_voting_equals_a_hand_computed_vote_on_fixed_clusters():
    labels = np.array(["a", "a", "b", "b", "b", "c", None, "a", "b"], dtype=object)
    clusters = np.array(["1", "1", "1", "2", "2", "2", "2", "3", "3"], dtype=object)
    majority, frequency = majority_vote(labels, clusters)
    # cluster 1: a a b -> a (2/3); cluster 2: b b c (+ an unlabelled cell, which does not vote) -> b (2/3);
    # cluster 3: a b -> tie, alphabetically first: a (1/2)
    assert list(majority) == ["a", "a", "a", "b", "b", "b", "b", "a", "a"]
    np.testing.assert_allclose(frequency, [2 / 3] * 3 + [2 / 3] * 4 + [0.5] * 2)
    assert leiden_resolution(700) == 5 and leiden_resolution(50_000) == 20 and leiden_resolution(10**6) == 30


def test_expression_clusters_follow_the_cell_types_and_leave_empty_cells_out(pbmc):
    X = sp.csr_matrix(pbmc.raw.X, dtype=np.float32, copy=True)
    X[:2] = 0
    X.eliminate_zeros()
    clusters = expression_clusters(X, input_is_log1p=True)
    assert clusters[0] is None and clusters[1] is None
    assert 10 < len(set(clusters[2:])) < 100  # over-clustered at CellTypist's resolution for 700 cells
    table = pd.crosstab(clusters[2:], pbmc.obs["bulk_labels"].to_numpy()[2:])
    assert table.max(axis=1).sum() / table.values.sum() > 0.7  # clusters mostly hold one labelled type
    assert list(expression_clusters(X, input_is_log1p=True)) == list(clusters)  # seeded: the same every time
    # counts are depth-normalised first: scaling each cell's counts by its own factor changes no cluster
    counts = X.copy()
    counts.data = np.expm1(counts.data)
    deeper = sp.diags(np.random.default_rng(0).uniform(0.2, 5.0, X.shape[0])) @ counts
    assert list(expression_clusters(deeper, input_is_log1p=False)) == list(
        expression_clusters(counts, input_is_log1p=False))


# -- a trained model on another labelled dataset ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The demo data with the packaged bulk-label -> CL mapping, on the tiny encoder."""
    from scimilarity_lora.training.run import run

    out = tmp_path_factory.mktemp("cross") / "run"
    run(compose_train(FAST + ["trainer.max_epochs=3"], out))
    return out


def test_training_records_each_class_cl_id_and_the_release(tiny_run):
    spec = json.loads((tiny_run / "model" / "model_config.json").read_text())["ontology"]
    assert spec["class_terms"]["CD4+/CD45RA+/CD25- Naive T"] == NAIVE_CD4 and spec["unmapped_classes"] == []
    assert spec["release"]["cl_version"].startswith("v20")
    assert {"T cell", "CD4-positive, alpha-beta T cell"} <= {t["label"] for t in spec["coarse_terms"]}
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["ontology"]["class_terms"] == spec["class_terms"]
    v = metrics["gene_visibility"]
    assert v["n_expressed_data_genes"] == 765 and 0.9 < v["count_fraction_seen"] <= 1.0


def test_a_query_is_scored_through_the_ontology_and_written_into_the_run(tiny_run, pbmc, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    from scimilarity_lora.evaluation.query import evaluate_query_run
    from scimilarity_lora.inference.predictor import CellTypePredictor

    # another "study": the same cells under other names; some through CL ids, one unknowable, one unmapped
    query = ad.AnnData(pbmc.raw.X.copy(), obs=pbmc.obs[["bulk_labels"]].copy(), var=pbmc.raw.var.copy())
    rename = {"CD14+ Monocyte": "Mono CD14", "CD19+ B": "B", "CD56+ NK": "NK", "Dendritic": "DC", "CD34+": "HSPC"}
    query.obs["study_label"] = query.obs["bulk_labels"].astype(str).replace(rename)
    path = tmp_path / "other_study.h5ad"
    query.write_h5ad(path)
    label_map = tmp_path / "map.csv"
    pd.DataFrame({"query_label": ["Mono CD14", "B", "NK", "DC"],
                  "model_label": [CD14_MONO, "CD19+ B", "CL:0000623", ""]}).to_csv(label_map, index=False)
    report = evaluate_query_run(tiny_run, {"path": str(path), "label_key": "study_label", "input_is_log1p": True,
                                           "label_map": str(label_map), "min_gene_overlap": 50})
    kinds = {k: v["kind"] for k, v in report["labels"].items()}
    assert kinds["Mono CD14"] == "ontology" and kinds["B"] == "mapped" and kinds["NK"] == "ontology"
    assert kinds["DC"] == "novel" and kinds["HSPC"] == "unmapped" and kinds["CD8+ Cytotoxic T"] == "exact"
    assert report["unmapped_labels"] == {"HSPC": int((query.obs.study_label == "HSPC").sum())}

    # the figures equal scikit-learn's on the matched cells, every cell given its best class
    pred = CellTypePredictor.load(tiny_run / "model")
    probs, _ = pred.predict(query.X, list(query.var_names), input_is_log1p=True)
    truth = query.obs["bulk_labels"].astype(str).to_numpy()
    keep = ~np.isin(truth, ["Dendritic", "CD34+"])
    best = np.asarray(pred.classes)[probs.argmax(1)]
    present = sorted(set(truth[keep]))
    assert report["n_cells_scored"] == keep.sum()
    assert report["accuracy"] == pytest.approx(accuracy_score(truth[keep], best[keep]), abs=1e-4)
    assert report["macro_f1"] == pytest.approx(f1_score(truth[keep], best[keep], labels=present, average="macro"),
                                               abs=1e-4)
    dc = truth == "Dendritic"
    status = pred.predict_cells(query.X, list(query.var_names), input_is_log1p=True).status
    assert report["novel_types"]["per_label"]["DC"]["rejected"] == pytest.approx(
        np.isin(status[dc], ["low_confidence", "novel"]).mean(), abs=1e-4)
    assert report["majority_voting"]["n_clusters"] > 1 and 0 <= report["majority_voting"]["accuracy"] <= 1
    # voting over the query's own expression clusters: the hand-computed vote of the best classes, scored
    expr = expression_clusters(query.X, input_is_log1p=True)
    voted, _ = majority_vote(best, expr)
    assert report["majority_voting_expression"]["n_clusters"] == len(set(expr))
    assert report["majority_voting_expression"]["accuracy"] == pytest.approx(
        accuracy_score(truth[keep], voted[keep].astype(str)), abs=1e-4)
    assert report["majority_voting_expression"]["macro_f1"] == pytest.approx(
        f1_score(truth[keep], voted[keep].astype(str), labels=present, average="macro"), abs=1e-4)
    wu = report["with_unknown"]
    assert wu["coarse"]["coverage"] >= wu["head"]["coverage"]

    out = tiny_run / "evaluation" / "query" / "other_study"
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "metrics.json", "confusion_matrix.png"}
    flat = json.loads((out / "metrics.json").read_text())
    assert flat["query/other_study/macro_f1"] == report["macro_f1"]
    assert "| HSPC | unmapped |" in (out / "report.md").read_text()


def test_a_query_evaluation_is_logged_to_wandb_offline(tiny_run, monkeypatch):
    import wandb

    from scimilarity_lora.evaluation.query import evaluate_query_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    evaluate_query_run(tiny_run, {"path": "pbmc68k_reduced", "label_key": "bulk_labels", "layer": "raw",
                                  "input_is_log1p": True, "majority_voting": False, "name": "self"},
                       wandb_project="scimilarity-lora-test")
    wandb.teardown()  # wait for wandb-core to close the run file (see test_evaluate)
    (offline,) = (tiny_run / "evaluation" / "query" / "self" / "wandb").glob("offline-run-*")
    record = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"query/self/macro_f1" in record and b"query/self/ontology_aware_accuracy" in record
    assert list(offline.glob("files/media/images/query/self/confusion_matrix*.png"))


def test_summarize_ranks_runs_by_a_querys_macro_f1(tmp_path):
    from scimilarity_lora.evaluation.summarize import summarize

    for job, (val, query) in enumerate([(0.9, 0.4), (0.5, 0.7)]):
        d = tmp_path / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- lora.r={job + 1}\n")
        (d / "metrics.json").write_text(json.dumps({"val/macro_f1": val, "test/macro_f1": val}))
        (d / "evaluation" / "query" / "pbmc3k").mkdir(parents=True)
        (d / "evaluation" / "query" / "pbmc3k" / "metrics.json").write_text(
            json.dumps({"query/pbmc3k/macro_f1": query}))
    assert summarize(tmp_path)["best_run"].endswith("/0")
    assert summarize(tmp_path, "query/pbmc3k/macro_f1")["best_run"].endswith("/1")
    assert "query/pbmc3k/macro_f1" in pd.read_csv(tmp_path / "summary.csv").columns


def _evaluate_cli(run_dir, *overrides):
    return subprocess.run([sys.executable, "evaluate.py", f"run_dir={run_dir}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case, says", [
    ("label_column", "query label column 'no_such' not in obs; available columns:"),
    ("genes", "genes"),
    ("labels", "no query label matches a model class"),
])
def test_a_bad_query_fails_with_one_clear_line(tiny_run, pbmc, tmp_path, case, says):
    from scimilarity_lora.evaluation.query import evaluate_query_run

    query = ad.AnnData(pbmc.raw.X.copy(), obs=pbmc.obs[["bulk_labels"]].copy(), var=pbmc.raw.var.copy())
    spec = {"path": str(tmp_path / "q.h5ad"), "label_key": "bulk_labels", "input_is_log1p": True}
    if case == "label_column":
        spec["label_key"] = "no_such"
    elif case == "genes":
        query.var_names = [f"NOT_A_GENE_{i}" for i in range(query.n_vars)]
    else:
        query.obs["bulk_labels"] = [f"cluster {i % 3}" for i in range(query.n_obs)]
    query.write_h5ad(spec["path"])
    with pytest.raises(ValueError, match=says):
        evaluate_query_run(tiny_run, spec)
    if case == "labels":  # the command line: exit 2 and the one line, no traceback
        res = _evaluate_cli(tiny_run, f"query.path={spec['path']}", "query.label_key=bulk_labels",
                            "query.input_is_log1p=true")
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.startswith("error: no query label matches a model class")


def test_annotate_majority_voting_and_coarse_from_the_command_line(tiny_run, pbmc, tmp_path):
    src = tmp_path / "in.h5ad"
    ad.AnnData(pbmc.raw.X.copy(), obs=pbmc.obs[["louvain"]].copy(), var=pbmc.raw.var.copy()).write_h5ad(src)
    res = subprocess.run([sys.executable, "-m", "scimilarity_lora.inference.annotate", str(tiny_run), str(src),
                          str(tmp_path / "out.h5ad"), "--log1p", "--over-clustering", "louvain"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    obs = out.obs
    majority, frequency = majority_vote(obs["scimilarity_lora_label"].astype(object).to_numpy(),
                                        obs["louvain"].astype(str).to_numpy())
    assert list(obs["scimilarity_lora_majority_voting"].astype(str)) == [str(m) for m in majority]
    np.testing.assert_allclose(obs["scimilarity_lora_majority_frequency"], frequency)
    assert out.uns["scimilarity_lora"]["vote_on"] == "louvain"
    coarse = obs["scimilarity_lora_status"] == "coarse"
    coarse_labels = {t["label"] for t in json.loads((tiny_run / "model" / "model_config.json").read_text())
                     ["ontology"]["coarse_terms"]}
    assert set(obs.loc[coarse, "scimilarity_lora_label"].astype(str)) <= coarse_labels
    assert obs.loc[obs["scimilarity_lora_status"] == "ok", "scimilarity_lora_ontology_term_id"].notna().all()


def test_annotate_votes_over_the_cells_own_expression_in_memory_and_from_a_file_in_chunks(tiny_run, pbmc, tmp_path):
    from scimilarity_lora.inference.annotate import annotate

    src = tmp_path / "in.h5ad"
    ad.AnnData(sp.csr_matrix(pbmc.raw.X), var=pbmc.raw.var.copy()).write_h5ad(src)
    res = subprocess.run([sys.executable, "-m", "scimilarity_lora.inference.annotate", str(tiny_run), str(src),
                          str(tmp_path / "out.h5ad"), "--log1p", "--vote-on", "expression", "--chunk-cells", "256"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    expected = expression_clusters(sp.csr_matrix(pbmc.raw.X), input_is_log1p=True)  # the whole file, not a chunk
    assert list(out.obs["scimilarity_lora_over_clustering"].astype(str)) == list(expected)
    majority, _ = majority_vote(out.obs["scimilarity_lora_label"].astype(object).to_numpy(), expected)
    assert list(out.obs["scimilarity_lora_majority_voting"].astype(str)) == [str(m) for m in majority]
    assert out.uns["scimilarity_lora"]["vote_on"] == "expression"

    in_memory = annotate(ad.read_h5ad(src), tiny_run / "model", input_is_log1p=True, majority_voting=True,
                         vote_on="expression", progress=False)
    assert list(in_memory.obs["scimilarity_lora_majority_voting"].astype(str)) == [str(m) for m in majority]
    with pytest.raises(ValueError, match="vote_on must be one of"):
        annotate(ad.read_h5ad(src), tiny_run / "model", input_is_log1p=True, majority_voting=True, vote_on="genes")
    bad = subprocess.run([sys.executable, "-m", "scimilarity_lora.inference.annotate", str(tiny_run), str(src),
                          str(tmp_path / "o2.h5ad"), "--over-clustering", "nope"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: over-clustering column 'nope' not in obs" in bad.stderr


def test_training_takes_cl_ids_from_an_obs_column_and_reports_unmapped_classes(tmp_path, pbmc):
    from scimilarity_lora.training.run import run

    a = ad.AnnData(sp.csr_matrix(pbmc.raw.X), obs=pbmc.obs[["bulk_labels"]].copy(), var=pbmc.raw.var.copy())
    bulk = read_label_map("packaged:pbmc68k_bulk_labels")
    a.obs["cl"] = [bulk[x] if x != "Dendritic" else None for x in a.obs["bulk_labels"].astype(str)]
    path = tmp_path / "cells.h5ad"
    a.write_h5ad(path)
    out = tmp_path / "run"
    run(compose_train(FAST + ["data=h5ad", f"data.path={path}", "data.label_key=bulk_labels",
                              "data.input_is_log1p=true", "data.ontology_key=cl"], out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ontology"]["unmapped_classes"] == ["Dendritic"]
    assert metrics["ontology"]["class_terms"]["CD56+ NK"] == "CL:0000623"
    bad_map = tmp_path / "bad.csv"
    bad_map.write_text("label,cl_id\nCD56+ NK,CL:123\n")
    with pytest.raises(OntologyError, match="CL id of class 'CD56\\+ NK': 'CL:123' is not a Cell Ontology id"):
        run(compose_train(FAST + ["data=h5ad", f"data.path={path}", "data.label_key=bulk_labels",
                                  "data.input_is_log1p=true", f"data.label_to_ontology={bad_map}"], tmp_path / "bad"))
