"""One `bentoml serve` answering for several adapters (different label sets) over one base, driven over HTTP."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

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
    env.update(SCIMILARITY_LORA_MODEL=base, SCIMILARITY_LORA_ADAPTERS=",".join(RUNS), SCIMILARITY_LORA_ADMIN_TOKEN=TOKEN)
    proc, url, _ = start_bentoml(env, root / "serve.log")
    yield {"url": url, "predictors": {n: CellTypePredictor.load(root / n / "model") for n in {**RUNS, **LATER}}}
    stop_bentoml(proc)


def cell(pbmc, i: int) -> dict:
    row = pbmc.raw.X[i].toarray().ravel() if hasattr(pbmc.raw.X, "toarray") else pbmc.raw.X[i]
    genes = np.asarray(pbmc.raw.var_names)
    return {g: round(float(v), 5) for g, v in zip(genes, row) if v > 0}


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
    assert requests.post(admin, json={"model": "no_such_model"}, headers=auth, timeout=30).status_code == 400
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
