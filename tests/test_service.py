"""A real `bentoml serve` on 127.0.0.1, driven over HTTP, with a model trained in this test session."""

import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from helpers import FAST, REPO, compose_train, start_bentoml, stop_bentoml
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.training.run import run

BODY_CAP = 300_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run(compose_train(FAST + ["trainer.max_epochs=3"], root / "run"))
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "SCIMILARITY_LORA_MAX_BODY_BYTES": str(BODY_CAP), "SCIMILARITY_LORA_MAX_CELLS": "500",
           "SCIMILARITY_LORA_BODY_TIMEOUT_S": "3"}
    tag = subprocess.run([sys.executable, "-m", "scimilarity_lora.serving.export", str(root / "run")], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    # a reference index of the bundled PBMCs (raw counts, Census columns) built with the run's adapter (#24)
    from scimilarity_lora.data.soma_store import pbmc_counts
    from scimilarity_lora.inference.reference import build_index

    pbmc_counts().write_h5ad(root / "reference.h5ad")
    index = build_index(root / "run" / "model", str(root / "reference.h5ad"), root / "index", label_key="cell_type",
                        keep_obs=["donor_id"], progress=False)
    return {"root": root, "env": {**env, "SCIMILARITY_LORA_MODEL": tag, "SCIMILARITY_LORA_REFERENCE": str(index)},
            "tag": tag, "index": index}


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def served(exported, request):
    """Every test of the contract runs against one worker and against two (#23: workers must not differ)."""
    root, log = exported["root"], exported["root"] / f"serve-{request.param}.log"
    env = {**exported["env"], "SCIMILARITY_LORA_WORKERS": str(request.param), "SCIMILARITY_LORA_TORCH_THREADS": "1"}
    proc, url, port = start_bentoml(env, log)
    yield {"url": url, "tag": exported["tag"], "predictor": CellTypePredictor.load(root / "run" / "model"),
           "port": port, "log": log, "workers": request.param, "index": exported["index"]}
    stop_bentoml(proc)


def post(served, route, payload=None, data=None, timeout=30):
    return requests.post(f"{served['url']}{route}", json=payload, data=data, timeout=timeout,
                         headers={"content-type": "application/json"})


def error_text(response) -> str:
    body = response.json()
    body = body[0] if isinstance(body, list) else body  # BentoML wraps InvalidArgument messages in a list
    return json.dumps(body)


def test_the_seeds_curl_example(served):
    r = post(served, "/predict", {"expression": {"CD3D": 1.2, "GNLY": 0.1, "MS4A1": 3.4, "CD14": 0.0}})
    assert r.status_code == 200, r.text
    body = r.json()
    classes = served["predictor"].classes
    assert body["best_guess"] in classes and 0 < body["confidence"] <= 1
    assert body["cell_type"] == (body["best_guess"] if body["status"] == "ok" else "unknown")
    probs = [t["probability"] for t in body["top_k"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and body["top_k"][0]["cell_type"] == body["best_guess"]
    assert body["genes_used"] == 3 and body["genes_unknown"] == ["CD14"]  # CD14 is not among the 765 genes
    assert body["values"] == "counts"


def test_curl_without_a_content_type_is_read_as_json(served):
    r = requests.post(f"{served['url']}/predict", data='{"expression": {"CD3D": 1.2, "MS4A1": 3.4}}',
                      headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["genes_used"] == 2


def _cells(pbmc, n=12):
    X = pbmc.raw.X[:n].tocsr()
    genes = np.asarray(pbmc.raw.var_names)
    return X, [dict(zip(genes[row.indices].tolist(), row.data.tolist())) for row in X]


def test_predictions_equal_the_in_process_model(served, pbmc):
    X, cells = _cells(pbmc)
    expected, _ = served["predictor"].predict(X, list(pbmc.raw.var_names), input_is_log1p=True)
    classes = served["predictor"].classes
    for i, expression in enumerate(cells):
        body = post(served, "/predict", {"expression": expression, "values": "log1p", "top_k": 1}).json()
        assert body["best_guess"] == classes[int(expected[i].argmax())]
        forced = post(served, "/predict", {"expression": expression, "values": "log1p", "force_label": True}).json()
        assert forced["cell_type"] == body["best_guess"]
        assert body["confidence"] == pytest.approx(float(expected[i].max()), abs=1e-5)
    batch = post(served, "/predict_batch", {"cells": [{"expression": e} for e in cells], "values": "log1p"}).json()
    assert [p["best_guess"] for p in batch["predictions"]] == [classes[int(i)] for i in expected.argmax(1)]
    # the same answers as annotate: a class, a coarse Cell Ontology term, or "unknown", with the CL id beside it
    pred = served["predictor"]
    labels, terms = pred.answer_with_terms(expected, pred.predict_cells(X, list(pbmc.raw.var_names),
                                                                        input_is_log1p=True).status)
    assert [p["cell_type"] for p in batch["predictions"]] == labels
    assert [p.get("cell_type_ontology_term_id") for p in batch["predictions"]] == terms
    assert any(t is not None for t in terms)  # the demo's classes carry CL ids
    sparse = {"genes": list(pbmc.raw.var_names), "indptr": X.indptr.tolist(), "indices": X.indices.tolist(),
              "data": X.data.tolist()}
    compact = post(served, "/predict_batch", {"sparse": sparse, "values": "log1p", "top_k": 10}).json()
    assert compact["n_cells"] == len(cells)
    for p, e in zip(compact["predictions"], expected):
        assert {t["cell_type"]: t["probability"] for t in p["top_k"]} == pytest.approx(
            dict(zip(classes, e.tolist())), abs=1e-5)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_binary_batch_equals_the_json_batch(served, pbmc):
    X, cells = _cells(pbmc)
    genes = np.asarray(pbmc.raw.var_names).astype(str)
    body = _npz(genes=genes, indptr=X.indptr, indices=X.indices, data=X.data, values=np.str_("log1p"), top_k=10)
    r = requests.post(f"{served['url']}/v1/predict_batch_npz", data=body, timeout=30,
                      headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    expected, _ = served["predictor"].predict(X, list(genes), input_is_log1p=True)
    classes = served["predictor"].classes
    for p, e in zip(r.json()["predictions"], expected):
        assert {t["cell_type"]: t["probability"] for t in p["top_k"]} == pytest.approx(
            dict(zip(classes, e.tolist())), abs=1e-5)


@pytest.mark.parametrize("body, message", [
    (b"not an npz", "body is not an .npz file"),
    (_npz(genes=np.array(["CD3D"]), indptr=np.array([0, 1]), indices=np.array([0])), "data"),
    (_npz(genes=np.array(["CD3D"]), indptr=np.array([0, 2]), indices=np.array([0]), data=np.array([1.0])), "indptr"),
    (_npz(genes=np.array(["CD3D"]), indptr=np.array([0, 1]), indices=np.array([0]), data=np.array([-1.0])),
     "cell 0: negative"),
    (_npz(genes=np.array(["CD3D"]), indptr=np.array([0, 1]), indices=np.array([0]), data=np.array([np.nan])), "NaN"),
    (_npz(genes=np.array(["NOPE"]), indptr=np.array([0, 1]), indices=np.array([0]), data=np.array([1.0])), "none of"),
    (_npz(genes=np.array([1, 2]), indptr=np.array([0, 1]), indices=np.array([0]), data=np.array([1.0])), "strings"),
])
def test_binary_batch_bad_input(served, body, message):
    r = requests.post(f"{served['url']}/v1/predict_batch_npz", data=body, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_embed_matches_the_in_process_encoder(served, pbmc):
    X, cells = _cells(pbmc, 3)
    _, expected = served["predictor"].predict(X, list(pbmc.raw.var_names), input_is_log1p=True)
    for e, want in zip(cells, expected):
        body = post(served, "/embed", {"expression": e, "values": "log1p"}).json()
        assert body["dim"] == len(want) == 16
        np.testing.assert_allclose(body["embedding"], want, atol=1e-5)
        assert np.linalg.norm(body["embedding"]) == pytest.approx(1, abs=1e-5)


def _reference_cells(n=8):
    from scimilarity_lora.data.soma_store import pbmc_counts

    cells = pbmc_counts()[:n]
    genes = np.asarray(cells.var_names)
    X = cells.X.tocsr()
    return cells, X, [dict(zip(genes[r.indices].tolist(), r.data.tolist())) for r in X]


def test_search_answers_the_nearest_reference_cells(served):
    """/v1/search over HTTP equals the index searched in-process with the run's encoder (#24)."""
    from scimilarity_lora.inference.reference import ReferenceEncoder, ReferenceIndex

    cells, X, expressions = _reference_cells()
    index = ReferenceIndex(served["index"])
    encoder = ReferenceEncoder.load(served["index"].parent / "run" / "model")
    z, _ = encoder.embed(X, encoder.alignment(list(cells.var_names)))
    pos, dist = index.search(z, 5)
    for i, expression in enumerate(expressions):
        r = post(served, "/v1/search", {"expression": expression, "k": 5})
        assert r.status_code == 200, r.text
        neighbors = r.json()["neighbors"]
        assert [n["cell_id"] for n in neighbors] == index.cell_ids[pos[i]].tolist()
        assert neighbors[0]["cell_id"] == cells.obs_names[i]  # a reference cell finds itself first
        assert [n["distance"] for n in neighbors] == pytest.approx(dist[i].tolist(), abs=1e-4)
        assert [n["label"] for n in neighbors] == index.cells["cell_type"].iloc[pos[i]].tolist()
        assert [n["donor_id"] for n in neighbors] == index.cells["donor_id"].iloc[pos[i]].tolist()
    sparse = {"genes": list(cells.var_names), "indptr": X.indptr.tolist(), "indices": X.indices.tolist(),
              "data": X.data.tolist()}
    batch = post(served, "/v1/search_batch", {"sparse": sparse, "k": 3}).json()
    assert batch["n_cells"] == len(expressions)
    assert [[n["cell_id"] for n in row] for row in batch["neighbors"]] == index.cell_ids[pos[:, :3]].tolist()


def test_knn_method_answers_the_index_vote(served):
    from scimilarity_lora.inference.reference import ReferenceEncoder, ReferenceIndex

    cells, X, expressions = _reference_cells()
    index = ReferenceIndex(served["index"])
    encoder = ReferenceEncoder.load(served["index"].parent / "run" / "model")
    z, _ = encoder.embed(X, encoder.alignment(list(cells.var_names)))
    knn = index.annotate(z, 15)
    one = post(served, "/predict", {"expression": expressions[0], "method": "knn"}).json()
    assert one["best_guess"] == index.classes[int(knn.best[0])] == cells.obs["cell_type"].iloc[0]
    assert one["confidence"] == pytest.approx(float(knn.fraction[0]), abs=1e-4)
    assert one["nearest_distance"] == pytest.approx(float(knn.nearest[0]), abs=1e-4) and one["status"] == "ok"
    batch = post(served, "/predict_batch", {"cells": [{"expression": e} for e in expressions], "method": "knn",
                                            "top_k": 2}).json()
    assert [p["best_guess"] for p in batch["predictions"]] == [index.classes[int(b)] for b in knn.best]
    assert all(len(p["top_k"]) == 2 for p in batch["predictions"])
    head = post(served, "/predict", {"expression": expressions[0]}).json()
    assert head["best_guess"] in served["predictor"].classes and "nearest_distance" not in head


@pytest.mark.parametrize("route, payload, status, message", [
    ("/v1/search", {"expression": {"CD3D": 1.0}, "k": 0}, 400, "greater than or equal to 1"),
    ("/v1/search", {"expression": {"CD3D": 1.0}, "k": 101}, 400, "less than or equal to 100"),
    ("/v1/search", {"expression": {"CD3D": -1.0}}, 400, "greater than or equal to 0"),
    ("/v1/search", {"expression": {"NOT_A_GENE": 1.0}}, 400, "none of the 1 genes"),
    ("/v1/search", {"expression": {"CD3D": 1.0}, "model": "nope"}, 404, "unknown model 'nope'"),
    ("/v1/search", '{"expression": {"CD3D": 1.0', 400, "Invalid JSON"),
    ("/v1/search", '{"expression": {"CD3D": 1.0}, "k": 2, "k": 3}', 400, "duplicate JSON key"),
    ("/v1/search", "", 400, "Invalid JSON"),
    ("/v1/search_batch", {"k": 2}, 400, "exactly one of"),
    ("/v1/search_batch", {"cells": [{"expression": {"CD3D": 1.0}}, {"expression": {"XYZ": 1.0}}]}, 400, "cell 1:"),
    ("/predict", {"expression": {"CD3D": 1.0}, "method": "vote"}, 400, "'head' or 'knn'"),
    ("/predict", {"expression": {"CD3D": 1.0}, "method": "knn", "k": 0}, 400, "greater than or equal to 1"),
])
def test_search_bad_input_is_a_4xx_with_a_message(served, route, payload, status, message):
    r = post(served, route, data=payload) if isinstance(payload, str) else post(served, route, payload)
    assert r.status_code == status, r.text
    assert message in error_text(r)


def test_metadata_and_health(served):
    meta = requests.get(f"{served['url']}/v1/metadata", timeout=10).json()
    assert meta["model_tag"] == served["tag"] and meta["n_genes"] == 765
    assert meta["classes"] == served["predictor"].classes and "val/macro_f1" in meta["training_metrics"]
    reference = meta["references"][served["tag"].split(":")[0]]
    assert reference["n_cells"] == 700 and reference["kept_obs"] == ["cell_type", "donor_id"]
    assert requests.get(f"{served['url']}/healthz", timeout=10).status_code == 200


def test_openapi_describes_the_real_contract(served):
    spec = requests.get(f"{served['url']}/docs.json", timeout=10).json()
    assert {"/predict", "/predict_batch", "/embed", "/v1/predict_batch_npz", "/v1/metadata", "/v1/search",
            "/v1/search_batch"} <= set(spec["paths"])
    search = spec["paths"]["/v1/search"]["post"]
    assert search["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("SearchRequest")
    assert {"200", "400", "404", "409"} <= set(search["responses"])
    text = json.dumps(spec)
    for word in ("expression", "log1p", "indptr", "top_k", "force_label"):
        assert word in text
    assert "propertyNames" not in text and spec["info"]["version"] not in ("None", "")
    predict = spec["paths"]["/predict"]["post"]
    assert {"200", "400", "408", "413", "415"} <= set(predict["responses"])
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("PredictResponse")
    assert predict["requestBody"]["content"]["application/json"]["example"]["expression"]["CD3D"] == 1.2
    props = spec["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"cell_type", "status", "best_guess", "confidence", "top_k"} <= set(props)
    assert '"minimum": 0' in text  # expression values


BAD = [
    ("/predict", {"expression": {}}, "at least 1 item"),
    ("/predict", {"expression": {"NOT_A_GENE": 3.0}}, "none of the 1 genes"),
    ("/predict", '{"expression": {"CD3D": NaN}}', "finite number"),
    ("/predict", '{"expression": {"CD3D": Infinity}}', "finite number"),
    ("/predict", {"expression": {"CD3D": -2.0}}, "expression.CD3D: Input should be greater than or equal to 0"),
    ("/predict", {"expression": {"CD3D": "lots"}}, "valid number"),
    ("/predict", {"expression": [["CD3D", 1.0]]}, "Input should be an object"),
    ("/predict", {"expression": {"CD3D": 1.0}, "species": "human"}, "Extra inputs are not permitted"),
    ("/predict", {"expression": {"CD3D": 1.0}, "values": "tpm"}, "counts"),
    ("/predict", {"expression": {"CD3D": 1.0}, "top_k": 0}, "greater than or equal to 1"),
    ("/predict", {"expression": {"CD3D": 500.0}, "values": "log1p"}, "look like raw counts"),
    ("/predict", '{"expression": {"CD3D": 1.0', "Invalid JSON"),
    ("/predict", "[]", "Input should be an object"),
    ("/embed", {"expression": {"CD3D": -1}}, "greater than or equal to 0"),
    ("/predict_batch", {"cells": [{"expression": {"CD3D": 1.0}}, {"expression": {"CD3D": 2.0}},
                                  {"expression": {"CD3D": -3.0}}]}, "cells.2.expression.CD3D: "),
    ("/predict_batch", {"cells": [{"expression": {"CD3D": 1.0}}, {"expression": {"XYZ": 2.0}}]}, "cell 1: none"),
    ("/predict_batch", {}, "exactly one of"),
    ("/predict_batch", {"cells": []}, "at least 1 item"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D"], "indptr": [0, 2], "indices": [0], "data": [1.0]}}, "indptr"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D"], "indptr": [0, 1], "indices": [4], "data": [1.0]}}, "cell 0"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D", "GNLY"], "indptr": [0, 1, 2], "indices": [0, 1],
                                   "data": [1.0, -1.0]}}, "sparse.data.1: Input should be greater than or equal to 0"),
    ("/predict_batch", {"cells": [{"expression": {"CD3D": 1.0}}] * 501}, "at most 500"),
]


@pytest.mark.parametrize("route, payload, message", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_a_message(served, route, payload, message):
    r = post(served, route, data=payload) if isinstance(payload, str) else post(served, route, payload)
    assert r.status_code == 400, r.text
    assert message in error_text(r)


def test_oversized_payload_is_refused(served):
    expression = {f"GENE{i}": 1.0 for i in range(20_000)}  # ~350 kB > the 300 kB cap set for this server
    r = post(served, "/predict", {"expression": expression})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert post(served, "/predict", {"expression": {"CD3D": 1.0}}).status_code == 200  # still serving


def test_concurrent_single_cell_requests_all_succeed(served, pbmc):
    from concurrent.futures import ThreadPoolExecutor

    _, cells = _cells(pbmc, 64)
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda e: post(served, "/predict", {"expression": e, "values": "log1p"}).status_code,
                              cells * 2))
    assert codes == [200] * 128


# -- hostile input, each found by a fuzzer or by hand (issue #12): a correct answer or a 4xx, never NaN or a 5xx --
def _finite_answer(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert "NaN" not in r.text and "null" not in r.text and "Infinity" not in r.text
    return body


@pytest.mark.parametrize("route", ["/predict", "/embed"])
def test_extreme_totals_are_normalised_in_float64(served, route):
    """1e-40 underflowed and 2 x 2e38 overflowed float32 totals: NaN, or a confident label for a zeroed cell."""
    ref = _finite_answer(post(served, route, {"expression": {"CD3D": 1.0, "GNLY": 1.0}}))
    tiny = _finite_answer(post(served, route, {"expression": {"CD3D": 1e-40, "GNLY": 1e-40}}))
    huge = _finite_answer(post(served, route, {"expression": {"CD3D": 2e38, "GNLY": 2e38}}))
    key = "embedding" if route == "/embed" else "top_k"
    for other in (tiny, huge):  # normalize_total is scale-free: the same cell, the same answer
        assert json.dumps(other[key]) == json.dumps(ref[key]) or np.allclose(
            [t["probability"] for t in other[key]] if key == "top_k" else other[key],
            [t["probability"] for t in ref[key]] if key == "top_k" else ref[key], atol=1e-5)
    batch = post(served, "/predict_batch", {"cells": [{"expression": {"CD3D": 1.4e-45}}]})
    assert _finite_answer(batch)["n_cells"] == 1
    npz = requests.post(f"{served['url']}/v1/predict_batch_npz", timeout=30, data=_npz(
        genes=np.array(["CD3D"]), indptr=np.array([0, 1]), indices=np.array([0]), data=np.array([1e-40])))
    assert _finite_answer(npz)["n_cells"] == 1


@pytest.mark.parametrize("route, payload, message", [
    ("/predict", {"expression": {"CD3D": 0}}, "no expression in the model's genes"),
    ("/embed", {"expression": {"CD3D": 0.0, "NOT_A_GENE": 5.0}}, "no expression in the model's genes"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D"], "indptr": [0, 1, 1], "indices": [0], "data": [2.0]}},
     "cell 1: no expression"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D"], "indptr": [0, 1], "indices": [1317404674655810748416],
                                   "data": [1.0]}}, "less than or equal to"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D"], "indptr": [0, 2 ** 63], "indices": [0], "data": [1.0]}},
     "less than or equal to"),
    ("/predict_batch", {"sparse": {"genes": ["CD3D", "GNLY"], "indptr": [0, 2], "indices": [0, 0],
                                   "data": [1.0, 2.0]}}, "cell 0: a gene index appears twice"),
    ("/predict", {"expression": {"CD3D": "1.5"}}, "valid number"),
    ("/predict", {"expression": {"CD3D": True}}, "valid number"),
    ("/predict", {"expression": {"CD3D": 1e308}}, "less than or equal to 3402823466"),
    ("/predict", {"expression": {"CD3D": 1.0}, "top_k": 2.0}, "valid integer"),
])
def test_hostile_values_get_a_clear_400(served, route, payload, message):
    r = post(served, route, payload)
    assert r.status_code == 400, r.text
    assert message in error_text(r)
    assert not any(word in r.text for word in ("CellRequest", "BatchRequest", "EmbedRequest", "SparseCells",
                                               "pydantic", "Traceback"))


@pytest.mark.parametrize("route, body, key", [
    ("/predict", '{"expression": {"CD3D": 1.0, "CD3D": 9.0}}', "CD3D"),
    # /predict_batch checks keys in its own reader (fast_json): both of its decoders' paths
    ("/predict_batch", '{"cells": [{"expression": {"CD3D": 1.0, "CD3D": 9.0}}]}', "CD3D"),
    ("/predict_batch", '{"sparse": {"genes": ["CD3D"], "indptr": [0, 1], "indices": [0], "data": [1], "data": [9]}}',
     "data"),
    ("/predict_batch", '{"top_k": 1, "sparse": {"genes": ["CD3D"], "indptr": [0, 1], "indices": [0], "data": [1]}, '
                       '"\\u0074op_k": 2}', "top_k"),
])
def test_duplicate_json_keys_are_refused(served, route, body, key):
    r = post(served, route, data=body)
    assert r.status_code == 400 and f"duplicate JSON key '{key}'" in r.text, r.text


@pytest.mark.parametrize("route", ["/predict", "/embed", "/predict_batch"])
def test_multipart_without_a_boundary_is_415_not_500(served, route):
    r = requests.post(f"{served['url']}{route}", data=b"--x\r\n", timeout=10,
                      headers={"content-type": "multipart/form-data"})
    assert r.status_code == 415 and "takes application/json" in r.json()["error"]


@pytest.mark.parametrize("route", ["/predict", "/v1/predict_batch_npz"])
def test_chunked_body_over_the_cap_is_413(served, route):
    def chunks():
        for _ in range(40):
            yield b"0" * 10_000  # 400 kB > the 300 kB cap, with no Content-Length

    r = requests.post(f"{served['url']}{route}", data=chunks(), timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "larger than" in r.json()["error"]


def test_npz_with_a_0d_genes_array_is_400(served):
    body = _npz(genes=np.array("CD3D"), indptr=np.array([0, 1]), indices=np.array([0]), data=np.array([1.0]))
    r = requests.post(f"{served['url']}/v1/predict_batch_npz", data=body, timeout=10)
    assert r.status_code == 400 and "1-d array of strings" in r.json()["error"]


def test_npz_decompression_bomb_is_refused_before_inflating(served):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z, z.open("data.npy", "w", force_zip64=True) as f:
        block = bytes(16 * 2**20)
        for _ in range(16):  # 256 MiB of zeros, ~250 kB compressed
            f.write(block)
    assert len(buf.getvalue()) < BODY_CAP
    t = time.perf_counter()
    r = requests.post(f"{served['url']}/v1/predict_batch_npz", data=buf.getvalue(), timeout=30)
    assert r.status_code == 400 and "declares" in r.json()["error"], r.text
    assert time.perf_counter() - t < 2.0


def test_something_else_than_npz_says_so(served):
    r = requests.post(f"{served['url']}/v1/predict_batch_npz", data=b'{"genes": []}', timeout=10)
    assert r.status_code == 400 and "not an .npz file" in r.json()["error"] and "allow_pickle" not in r.text


def test_a_trickling_client_gets_408_and_the_server_stays_responsive(served):
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        t = time.perf_counter()
        s.settimeout(10)
        reply = b""
        try:
            for _ in range(8):  # one byte every 0.5 s: would hold the connection for 50 s
                assert requests.get(f"{served['url']}/livez", timeout=2).status_code == 200
                s.sendall(b" ")
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.perf_counter() - t < 6


def test_thousands_of_bad_cells_get_a_short_answer(served):
    cells = [{"expression": {"CD3D": -1.0}} for _ in range(500)]
    r = post(served, "/predict_batch", {"cells": cells})
    assert r.status_code == 400 and len(r.content) < 5_000, len(r.content)
    body = r.json()
    assert body["n_errors"] == 500 and len(body["detail"]) == 10


def test_refused_requests_are_logged_as_one_line_not_a_traceback(served):
    assert post(served, "/predict", {"expression": {"CD3D": 0}}).status_code == 400
    assert post(served, "/predict", {"expression": {"CD3D": -1}}).status_code == 400
    log = served["log"].read_text()
    assert "Traceback" not in log and "[ERROR]" not in log
    assert "refused (the cell: no expression" in log


# -- property-based fuzzing: whatever arrives, the answer is 200 or a 4xx with a message, never a 5xx or a hang --
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GENES = ["CD3D", "GNLY", "MS4A1", "CD79A", "LYZ", "NKG7", "FCER1A", "PPBP", "NOT_A_GENE", "", "ENSG00000167286"]
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**12),
                    st.floats(min_value=0, max_value=1e4))
json_scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
expressions = st.dictionaries(st.one_of(st.sampled_from(GENES), st.text(max_size=15)),
                              st.one_of(numbers, json_scalars), max_size=12)
cell_payloads = st.fixed_dictionaries(
    {"expression": st.one_of(expressions, json_values)},
    optional={"values": st.one_of(st.sampled_from(["counts", "log1p"]), json_scalars),
              "top_k": st.one_of(st.integers(-5, 200), json_scalars),
              "extra": json_scalars},
)
valid_cells = st.fixed_dictionaries(  # well-formed requests, so the success path is fuzzed as much as rejections
    {"expression": st.dictionaries(st.sampled_from(GENES[:8]), st.floats(0, 1e4), min_size=1)},
    optional={"values": st.just("counts"), "top_k": st.integers(1, 10)},
)
batch_payloads = st.one_of(
    st.fixed_dictionaries({"cells": st.lists(valid_cells.map(lambda c: {"expression": c["expression"]}),
                                             min_size=1, max_size=5)}),
    st.fixed_dictionaries({"cells": st.lists(st.fixed_dictionaries({"expression": expressions}), max_size=5)}),
    st.fixed_dictionaries({"sparse": st.fixed_dictionaries({
        "genes": st.lists(st.sampled_from(GENES), max_size=5),
        "indptr": st.lists(st.integers(-2, 8), max_size=5),
        "indices": st.lists(st.integers(-2, 8), max_size=8),
        "data": st.lists(numbers, max_size=8)})}),
    json_values,
)


def _raw(payload) -> str:
    return json.dumps(payload, allow_nan=True)  # NaN/Infinity tokens on purpose


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/predict", "/embed"]), payload=st.one_of(valid_cells, cell_payloads, json_values))
def test_fuzz_single_cell_endpoints(served, route, payload):
    r = post(served, route, data=_raw(payload), timeout=20)
    assert r.status_code in (200, 400, 413), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert error_text(r) and "error" in error_text(r)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=batch_payloads)
def test_fuzz_batch_endpoint(served, payload):
    r = post(served, "/predict_batch", data=_raw(payload), timeout=20)
    assert r.status_code in (200, 400, 413), (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert r.json()["n_cells"] == len(r.json()["predictions"])
    else:
        assert "error" in error_text(r)


small_ints = st.lists(st.integers(-3, 10), max_size=8).map(lambda v: np.array(v, dtype=np.int64))
npz_bodies = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda genes, indptr, indices, data: _npz(genes=np.array(genes, dtype=str), indptr=indptr,
                                                         indices=indices, data=np.array(data, dtype=np.float32)),
              st.lists(st.sampled_from(GENES[:8]), min_size=1, max_size=5, unique=True), small_ints, small_ints,
              st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=8)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=npz_bodies)
def test_fuzz_binary_batch_endpoint(served, body):
    r = requests.post(f"{served['url']}/v1/predict_batch_npz", data=body, timeout=20)
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    if r.status_code == 400:
        assert r.json()["error"]
    else:
        assert r.json()["n_cells"] == len(r.json()["predictions"])


# -- schemathesis against the live OpenAPI schema: generated valid and invalid requests for every operation ------
@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(served, tmp_path):
    """Property-based API fuzzing from the service's own /docs.json: generated valid and invalid requests for every
    operation, every check but one (a schema-valid gene name may still be one the model lacks, so schema-valid
    requests may rightly be refused): any 5xx, undocumented status, response off its schema, wrong content type or
    a hang fails the test."""
    report = tmp_path / "st.json"
    # one worker fuzzed deeply; the two-worker server (the same handlers behind another process model) lighter
    examples = 800 if served["workers"] == 1 else 250
    res = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{served['url']}/docs.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance",
         "--max-examples", str(examples), "--request-timeout", "20", "--seed", "1", "--generation-deterministic",
         "--report", "ndjson", "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=400, cwd=REPO)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-4000:]
    import re

    generated = int(re.search(r"(\d+) generated", output).group(1))
    print(f"schemathesis: {generated} generated")
    assert generated >= 1.25 * examples and f"{generated} generated, {generated} passed" in output


def test_the_list_form_is_featurised_together_exactly_as_cell_by_cell(exported):
    """/predict_batch's list form goes through one alignment and one normalisation over the union of the cells'
    genes (10,000 per-cell passes held the GIL for seconds); the inputs and genes_used must be those of the per-cell
    path, and a union whose alias rescue could differ from a cell's own falls back to it."""
    import scipy.sparse as sp
    import torch

    from scimilarity_lora.genes import symbol_aliases
    from scimilarity_lora.serving.service import SCimilarityLoRA

    pred = CellTypePredictor.load(exported["root"] / "run" / "model")
    together = SCimilarityLoRA.inner._cells_together
    rng = np.random.default_rng(0)
    panel = list(pred.genes)[:80] + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    cells = [{str(g): float(rng.integers(0, 9)) for g in rng.choice(panel, size=int(rng.integers(3, 25)), replace=False)}
             for _ in range(60)]
    cells = [{**c, pred.genes[i]: 2.0} for i, c in enumerate(cells)]  # every cell has a model gene with a count

    def one_by_one(expression):
        alignment = pred.alignment(list(expression), min_overlap=1)
        x = pred.featurize(sp.csr_matrix(np.asarray([list(expression.values())], dtype=np.float32)), alignment)
        return x, alignment.n_overlap

    x, used = together(cells, "counts", pred)
    expected = [one_by_one(c) for c in cells]
    # and the service takes that path: the per-cell one is never reached for such a batch
    service = SCimilarityLoRA.inner.__new__(SCimilarityLoRA.inner)
    service._single, service.adapters = pred, None
    service._one_cell = lambda *args: pytest.fail("a union-safe list-form batch went cell by cell")
    x_served, used_served = service._prepare_batch([{"expression": c} for c in cells], None, "counts")
    torch.testing.assert_close(x_served, x)
    assert used_served == used
    torch.testing.assert_close(x, torch.cat([e[0] for e in expected]))
    assert used == [e[1] for e in expected] and min(used) >= 1
    # where the per-cell path must answer: a cell the model knows nothing of, an unknown gene the alias table knows
    assert together([*cells, {"NOT_A_GENE_1": 1.0}], "counts", pred) is None
    assert pred.spec.gene_aliases
    provided, free = set(pred.genes[:80]), set(pred.genes[80:])
    aliases = [(a, t) for a, t in symbol_aliases().items() if a not in pred.genes]
    blocked = next(a for a, t in aliases if t in provided)  # another cell names its model gene: not rescued here
    assert together([*cells, {blocked: 1.0, pred.genes[0]: 1.0}], "counts", pred) is None
    rescued = next(a for a, t in aliases if t in free)  # rescued in the union, hence in its own cell too
    more = [*cells, {rescued: 4.0, pred.genes[0]: 1.0}]
    x, used = together(more, "counts", pred)
    torch.testing.assert_close(x[-1:], one_by_one(more[-1])[0])
    assert used[-1] == one_by_one(more[-1])[1] == 2
