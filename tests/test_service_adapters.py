"""One `bentoml serve` answering for several adapters (different label sets) over one base, driven over HTTP."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import SHARED_REAL_DATA
from helpers import REPO, compose_train, start_bentoml, stop_bentoml
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.training.run import run

RUNS = {"pbmc_bulk": ["lora.r=4", "data.label_key=bulk_labels"],
        "pbmc_louvain": ["lora.r=8", "lora.target_modules=input", "data.label_key=louvain"]}
LATER = {"pbmc_frozen": ["finetune=frozen", "data.label_key=bulk_labels"]}  # added while the server runs
TOKEN = "s3cret-for-tests"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    base = None
    for name, overrides in {**RUNS, **LATER}.items():
        run(compose_train(overrides + ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"], root / name))
        out = subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", str(root / name), "--adapter",
                              "--name", name], env=env, cwd=REPO, capture_output=True, text=True, check=True)
        base = out.stdout.strip().splitlines()[-1].split("(base ")[1].rstrip(")")
    # one reference index, built with pbmc_bulk's adapter, named for both: pbmc_louvain's must be refused (#24)
    from scimilarity_lora.inference.reference import build_index

    index = build_index(root / "pbmc_bulk" / "model", "pbmc68k_reduced", root / "index", label_key="louvain",
                        layer="raw", input_is_log1p=True, progress=False)
    env.update(SCIMILARITY_LORA_MODEL=base, SCIMILARITY_LORA_ADAPTERS=",".join(RUNS), SCIMILARITY_LORA_ADMIN_TOKEN=TOKEN,
               SCIMILARITY_LORA_REFERENCE=f"pbmc_bulk={index},pbmc_louvain={index}")
    proc, url, _ = start_bentoml(env, root / "serve.log")
    yield {"url": url, "env": env, "log": root / "serve.log", "index": index,
           "predictors": {n: CellTypePredictor.load(root / n / "model") for n in {**RUNS, **LATER}}}
    stop_bentoml(proc)


def cell(pbmc, i: int) -> dict:
    row = pbmc.raw.X[i].toarray().ravel() if hasattr(pbmc.raw.X, "toarray") else pbmc.raw.X[i]
    genes = np.asarray(pbmc.raw.var_names)
    return {g: round(float(v), 5) for g, v in zip(genes, row) if v > 0}


def test_each_adapter_searches_only_an_index_its_own_encoder_built(served, pbmc):
    from scimilarity_lora.inference.reference import ReferenceIndex

    index = ReferenceIndex(served["index"])
    r = requests.post(f"{served['url']}/v1/search", json={"expression": cell(pbmc, 3), "values": "log1p", "k": 4,
                                                         "model": "pbmc_bulk"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["neighbors"][0]["cell_id"] == pbmc.obs_names[3]  # itself, in the adapter's own embedding
    assert [n["label"] for n in r.json()["neighbors"]][0] == str(pbmc.obs["louvain"].iloc[3])
    knn = requests.post(f"{served['url']}/predict", json={"expression": cell(pbmc, 3), "values": "log1p",
                                                         "method": "knn", "model": "pbmc_bulk"}, timeout=30).json()
    assert knn["best_guess"] in index.classes  # louvain clusters: the index's labels, not the head's bulk labels
    for route, extra in (("/v1/search", {}), ("/predict", {"method": "knn"})):
        r = requests.post(f"{served['url']}{route}", json={"expression": cell(pbmc, 3), "values": "log1p",
                                                          "model": "pbmc_louvain", **extra}, timeout=30)
        assert r.status_code == 404 and "'pbmc_louvain' has no reference index" in r.text, r.text
    log = served["log"].read_text()
    assert "no reference index for pbmc_louvain" in log and "was built with adapter" in log


def test_models_lists_each_adapter_with_its_classes(served):
    body = requests.get(f"{served['url']}/v1/models", timeout=10).json()
    assert body["default"] == "pbmc_bulk"  # the first by name
    listed = {m["name"]: m for m in body["models"]}
    assert set(listed) == set(RUNS)  # SCIMILARITY_LORA_ADAPTERS chose two of the three in the store
    for name in RUNS:
        predictor = served["predictors"][name]
        assert listed[name]["classes"] == predictor.classes and listed[name]["default"] == (name == "pbmc_bulk")


def test_each_request_is_answered_by_the_adapter_it_names(served, pbmc):
    """Concurrent requests for both adapters (mixed in the micro-batcher's forward passes) equal each run's model."""
    jobs = [(name, i) for i in range(12) for name in RUNS]

    def ask(job):
        name, i = job
        r = requests.post(f"{served['url']}/predict", json={"expression": cell(pbmc, i), "values": "log1p",
                                                            "model": name, "top_k": 1, "force_label": True}, timeout=30)
        return job, r

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, i), r in answers:
        assert r.status_code == 200, r.text
        predictor = served["predictors"][name]
        probs, _ = predictor.predict(pbmc.raw.X[i:i + 1], list(pbmc.raw.var_names), input_is_log1p=True)
        body = r.json()
        assert body["best_guess"] == predictor.classes[int(probs[0].argmax())]
        assert body["confidence"] == pytest.approx(float(probs[0].max()), abs=1e-4)
        assert body["cell_type"] in predictor.classes  # force_label: a label of this adapter's own set


def test_requests_without_a_model_go_to_the_default_and_unknown_names_get_404(served, pbmc):
    r = requests.post(f"{served['url']}/predict", json={"expression": cell(pbmc, 0), "values": "log1p"}, timeout=30)
    assert r.status_code == 200 and r.json()["best_guess"] in served["predictors"]["pbmc_bulk"].classes
    r = requests.post(f"{served['url']}/predict", json={"expression": cell(pbmc, 0), "model": "lung"}, timeout=30)
    assert r.status_code == 404
    assert "lung" in r.text and "pbmc_bulk" in r.text and "pbmc_louvain" in r.text


def test_adapters_are_added_and_removed_while_serving_with_the_admin_token(served, pbmc):
    url, admin = served["url"], f"{served['url']}/v1/admin/adapters"
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert requests.post(admin, json={"model": "pbmc_frozen"}, timeout=30).status_code == 401
    assert requests.post(admin, json={"model": "pbmc_frozen"}, headers={"authorization": "Bearer nope"},
                         timeout=30).status_code == 401
    assert requests.post(admin, json={"model": "no_such_model"}, headers=auth, timeout=30).status_code == 404
    r = requests.post(admin, json={"model": "pbmc_frozen"}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["models"] == ["pbmc_bulk", "pbmc_frozen", "pbmc_louvain"]
    r = requests.post(f"{url}/predict", json={"expression": cell(pbmc, 3), "values": "log1p", "model": "pbmc_frozen",
                                              "top_k": 1}, timeout=30)
    predictor = served["predictors"]["pbmc_frozen"]
    probs, _ = predictor.predict(pbmc.raw.X[3:4], list(pbmc.raw.var_names), input_is_log1p=True)
    assert r.status_code == 200 and r.json()["confidence"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert requests.delete(f"{admin}/pbmc_bulk", headers=auth, timeout=30).status_code == 409  # the default
    r = requests.delete(f"{admin}/pbmc_frozen", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["models"] == ["pbmc_bulk", "pbmc_louvain"]
    r = requests.post(f"{url}/predict", json={"expression": cell(pbmc, 3), "model": "pbmc_frozen"}, timeout=30)
    assert r.status_code == 404


@pytest.mark.skipif(not (SHARED_REAL_DATA / "mudan_sorted_pbmc.h5ad").is_file(),
                    reason=f"real PBMC data not at {SHARED_REAL_DATA} (see its README for where to get it)")
def test_an_adapter_for_the_sorted_pbmc_labels_joins_the_same_server(served, tmp_path):
    """A third label set from another dataset (Zheng et al.'s 9 FACS-sorted populations) over the same base, added
    while serving: its held-out cells, sent as raw counts, get that run's own test accuracy over HTTP."""
    import anndata as ad
    import pandas as pd

    sorted_pbmc = SHARED_REAL_DATA / "mudan_sorted_pbmc.h5ad"
    run(compose_train(["data=h5ad", "model=demo_base", f"data.path={sorted_pbmc}", "data.label_key=cell_type", "trainer.max_epochs=2",
                       "trainer.enable_progress_bar=false"], tmp_path / "run"))
    subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", str(tmp_path / "run"), "--adapter",
                    "--name", "pbmc_sorted"], env=served["env"], cwd=REPO, capture_output=True, text=True, check=True)
    admin, auth = f"{served['url']}/v1/admin/adapters", {"authorization": f"Bearer {TOKEN}"}
    assert requests.post(admin, json={"model": "pbmc_sorted"}, headers=auth, timeout=60).status_code == 200
    try:
        listed = {m["name"]: m for m in requests.get(f"{served['url']}/v1/models", timeout=10).json()["models"]}
        assert listed["pbmc_sorted"]["classes"] == ["bcells", "cytotoxict", "memoryt", "monocytes", "naivecytotoxic",
                                                    "naivet", "nk", "regulatoryt", "thelper"]
        adata = ad.read_h5ad(sorted_pbmc)
        splits = pd.read_csv(tmp_path / "run" / "splits.csv")
        cells = adata[adata.obs_names.isin(splits.loc[splits["split"] == "test", "cell_id"].astype(str))]
        X = cells.X.tocsr()
        body = {"sparse": {"genes": list(cells.var_names), "indptr": X.indptr.tolist(), "indices": X.indices.tolist(),
                           "data": X.data.astype(int).tolist()}, "force_label": True, "top_k": 1}
        answers = {}
        for name in ("pbmc_sorted", "pbmc_bulk"):
            r = requests.post(f"{served['url']}/predict_batch", json={**body, "model": name}, timeout=120)
            assert r.status_code == 200, r.text
            answers[name] = np.array([p["cell_type"] for p in r.json()["predictions"]])
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        truth = cells.obs["cell_type"].astype(str).to_numpy()
        assert float(np.mean(answers["pbmc_sorted"] == truth)) == pytest.approx(metrics["test/accuracy"], abs=1e-6)
        assert set(answers["pbmc_bulk"]) <= set(served["predictors"]["pbmc_bulk"].classes)  # the other label set
    finally:
        assert requests.delete(f"{admin}/pbmc_sorted", headers=auth, timeout=30).status_code == 200
