"""The adapter lifecycle attacked the way users' tools will (issue #23), against a real `bentoml serve` with 1 and with
2 workers: replacing an adapter, a failed add, deleting while requests are in flight, changes reaching every worker
and surviving a restart, a broken adapter in the store, malformed tags and headers."""

import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from helpers import REPO, compose_train, start_bentoml, stop_bentoml
from scimilarity_lora.training.run import run

pytestmark = pytest.mark.slow
TOKEN = "lifecycle-token"
RUNS = {"bulk": ["lora.r=4", "data.label_key=bulk_labels"],            # 10 classes: served as "pbmc" first
        "louvain": ["lora.r=4", "data.label_key=louvain"],             # 11 classes: the new version of "pbmc"
        "other": ["lora.r=2", "data.label_key=bulk_labels", "seed=1"],  # a second adapter: "other"
        "misfit": ["model=tiny", "data.label_key=bulk_labels"]}         # trained on another base


def _export(run_dir: Path, name: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", str(run_dir), "--adapter", "--name",
                          name], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    for name, overrides in RUNS.items():
        run(compose_train(overrides + ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"], root / name))
    env = {**os.environ, "BENTOML_HOME": str(root / "store"), "BENTOML_DO_NOT_TRACK": "true"}
    line = _export(root / "bulk", "pbmc", env)
    base = line.split("(base ")[1].rstrip(")")
    _export(root / "other", "other", env)
    _export(root / "bulk", "broken", env)       # its calibration.json is spoilt below
    _export(root / "bulk", "nocentroids", env)  # its centroids file is removed below
    _export(root / "misfit", "misfit", env)
    store = root / "store" / "models"
    for version in (store / "broken").iterdir():
        if version.is_dir():
            (version / "calibration.json").write_text("{not json")
    for version in (store / "nocentroids").iterdir():
        if version.is_dir():
            (version / "centroids.safetensors").unlink()
    return {"root": root, "base": base, "store": root / "store"}


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(runs, request):
    workers = request.param
    home = runs["root"] / f"store-{workers}"
    shutil.copytree(runs["store"], home)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
           "SCIMILARITY_LORA_MODEL": runs["base"], "SCIMILARITY_LORA_ADMIN_TOKEN": TOKEN,
           "SCIMILARITY_LORA_DEFAULT_MODEL": "pbmc", "SCIMILARITY_LORA_WORKERS": str(workers),
           "SCIMILARITY_LORA_TORCH_THREADS": "1"}
    log = runs["root"] / f"serve-{workers}.log"
    proc, url, _ = start_bentoml(env, log, timeout_s=180)
    state = {"proc": proc, "url": url, "env": env, "log": log, "workers": workers}
    yield state
    stop_bentoml(state["proc"])


AUTH = {"authorization": f"Bearer {TOKEN}"}


def cell(pbmc, i: int) -> dict:
    row = pbmc.raw.X[i].toarray().ravel() if hasattr(pbmc.raw.X, "toarray") else pbmc.raw.X[i]
    return {g: round(float(v), 5) for g, v in zip(pbmc.raw.var_names, row) if v > 0}


def predict(url, pbmc, i, model=None, timeout=60):
    body = {"expression": cell(pbmc, i), "values": "log1p", "top_k": 1, **({"model": model} if model else {})}
    return requests.post(f"{url}/predict", json=body, timeout=timeout)


def served_names(url):
    return sorted(m["name"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"])


def test_a_broken_adapter_in_the_store_is_skipped_with_one_line_and_the_rest_serve(server):
    assert served_names(server["url"]) == ["other", "pbmc"]
    text = server["log"].read_text()
    assert "skipping adapter broken:" in text and "skipping adapter nocentroids:" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("body, says", [
    ({"model": "pbmc:"}, "must be a model tag"), ({"model": ":"}, "must be a model tag"),
    ({"model": ["pbmc"]}, "must be a model tag"), ({"model": {"a": 1}}, "must be a model tag"), ([1, 2], "must be"),
    ({"model": "nocentroids"}, "cannot add 'nocentroids'"), ({"model": "broken"}, "cannot add 'broken'"),
])
def test_malformed_adapter_tags_and_files_are_400s_with_one_line(server, body, says):
    r = requests.post(f"{server['url']}/v1/admin/adapters", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400 and says in r.text and "Traceback" not in r.text and len(r.text) < 2000


def test_a_non_ascii_authorization_header_is_a_401_not_a_500(server):
    r = requests.post(f"{server['url']}/v1/admin/adapters", json={"model": "other"},
                      headers={"authorization": "Bearer sécret".encode("utf-8")}, timeout=30)
    assert r.status_code == 401


def test_a_failed_add_leaves_nothing_registered_and_breaks_no_ones_requests(server, pbmc):
    url = server["url"]
    r = requests.post(f"{url}/v1/admin/adapters", json={"model": "misfit"}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and "not on the served base" in r.text
    assert served_names(url) == ["other", "pbmc"]
    r = predict(url, pbmc, 0, "misfit")
    assert r.status_code == 404 and "misfit" not in r.json()["error"].split("served:")[1]
    assert requests.delete(f"{url}/v1/admin/adapters/misfit", headers=AUTH, timeout=30).status_code == 404
    with ThreadPoolExecutor(16) as pool:  # a burst of mixed requests for the adapters that are served
        codes = list(pool.map(lambda i: predict(url, pbmc, i % 50, ["pbmc", "other"][i % 2]).status_code, range(80)))
    assert codes == [200] * 80


def _npz(pbmc, rows):
    import scipy.sparse as sp

    X = sp.csr_matrix(pbmc.raw.X[rows])
    buf = io.BytesIO()
    np.savez(buf, genes=np.asarray(pbmc.raw.var_names, dtype=str), indptr=X.indptr, indices=X.indices, data=X.data,
             values=np.asarray("log1p"), top_k=np.asarray(1))
    return buf.getvalue()


def test_replacing_an_adapter_switches_every_route_at_once(server, runs, pbmc):
    url, env = server["url"], server["env"]
    before = requests.get(f"{url}/v1/metadata", timeout=30).json()
    assert len(before["classes"]) == 10
    _export(runs["root"] / "louvain", "pbmc", env)  # a new version of the served name: 11 Louvain clusters
    r = requests.post(f"{url}/v1/admin/adapters", json={"model": "pbmc"}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    for _ in range(3 * server["workers"]):  # every worker, whichever answers
        meta = requests.get(f"{url}/v1/metadata", timeout=30).json()
        assert len(meta["classes"]) == 11 and meta["model_tag"] == r.json()["tag"]
        one = predict(url, pbmc, 5)
        assert one.status_code == 200 and one.json()["best_guess"] in meta["classes"]
        npz = requests.post(f"{url}/v1/predict_batch_npz", data=_npz(pbmc, [5]), timeout=60,
                            headers={"content-type": "application/octet-stream"})
        assert npz.status_code == 200, npz.text
        assert npz.json()["predictions"][0]["best_guess"] == one.json()["best_guess"]
        assert npz.json()["predictions"][0]["confidence"] == pytest.approx(one.json()["confidence"], abs=1e-5)


def test_deleting_an_adapter_while_its_requests_are_in_flight_gives_404s_never_500s(server, pbmc):
    url = server["url"]
    assert requests.post(f"{url}/v1/admin/adapters", json={"model": "other"}, headers=AUTH, timeout=60).ok

    def ask(i):
        if i == 40:
            return "delete", requests.delete(f"{url}/v1/admin/adapters/other", headers=AUTH, timeout=60).status_code
        model = "other" if i % 2 else "pbmc"
        return model, predict(url, pbmc, i % 50, model, timeout=120).status_code

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, range(120)))
    codes = {}
    for who, code in answers:
        codes.setdefault(who, set()).add(code)
    assert codes["delete"] == {200}
    assert codes["pbmc"] == {200}
    assert codes["other"] <= {200, 404}
    assert "other" not in served_names(url)
    # put it back for the tests after this one
    assert requests.post(f"{url}/v1/admin/adapters", json={"model": "other"}, headers=AUTH, timeout=60).ok


def test_an_added_adapter_reaches_every_worker_and_survives_a_restart(server, runs, pbmc):
    url = server["url"]
    _export(runs["root"] / "other", "later", server["env"])
    r = requests.post(f"{url}/v1/admin/adapters", json={"model": "later"}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: predict(url, pbmc, i % 50, "later").status_code, range(40)))
    assert codes == [200] * 40
    stop_bentoml(server["proc"])
    server["proc"], server["url"], _ = start_bentoml(server["env"], server["log"], timeout_s=180)
    assert served_names(server["url"]) == ["later", "other", "pbmc"]
    meta = requests.get(f"{server['url']}/v1/metadata", timeout=30).json()
    assert len(meta["classes"]) == 11  # the replacement of "pbmc" survived too
    assert json.loads(next(Path(server["env"]["BENTOML_HOME"], "scimilarity_lora_served").glob("*.json"))
                      .read_text())["adapters"][0].startswith("later:")


def test_with_two_workers_a_killed_worker_costs_no_request(server, pbmc):
    """#23.8: with one worker nothing accepts connections until BentoML respawns it (benchmarks/worker_kill.py);
    with two, the shared socket goes to the living worker: every request and probe is answered, quickly."""
    import signal
    import time

    import psutil

    if server["workers"] < 2:
        pytest.skip("one worker: requests wait for the respawn (measured in benchmarks/worker_kill.py, README)")
    workers = [p for p in psutil.Process(server["proc"].pid).children(recursive=True)
               if "--worker-id" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGTERM)
    time.sleep(0.2)
    for i in range(20):
        assert requests.get(f"{server['url']}/readyz", timeout=2).status_code == 200
        assert predict(server["url"], pbmc, i, "pbmc", timeout=2).status_code == 200
