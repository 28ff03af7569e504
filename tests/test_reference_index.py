"""The reference index (#24): built with a trained adapter from an .h5ad and from a SOMA store, searched, voted,
checked against the encoder that built it, and used by annotate and evaluate."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from helpers import REPO, compose_train
from scimilarity_lora.data.soma_store import pbmc_counts, write_census_store
from scimilarity_lora.inference.annotate import annotate
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.reference import (IndexMismatchError, ReferenceIndex, ReferenceIndexError,
                                                  build_index, encoder_identity, exact_search, knn_vote)
from scimilarity_lora.training.run import run

HELD_OUT = "B cell"


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A LoRA run of the default recipe (the packaged pretrained base), and the bundled PBMCs as raw counts with
    Census columns: all of them, a reference without B cells, and a query of the others and the B cells."""
    root = tmp_path_factory.mktemp("reference")
    run(compose_train(["trainer.max_epochs=3", "trainer.enable_progress_bar=false"], root / "run"))
    cells = pbmc_counts()
    cells.write_h5ad(root / "cells.h5ad")
    rng = np.random.default_rng(0)
    known = np.flatnonzero(cells.obs["cell_type"] != HELD_OUT)
    query_known = rng.choice(known, len(known) // 5, replace=False)
    in_reference = np.setdiff1d(known, query_known)
    cells[in_reference].write_h5ad(root / "reference.h5ad")
    query = np.concatenate([query_known, np.flatnonzero(cells.obs["cell_type"] == HELD_OUT)])
    cells[query].write_h5ad(root / "query.h5ad")
    model = root / "run" / "model"
    index = build_index(model, str(root / "cells.h5ad"), root / "index", label_key="cell_type",
                        keep_obs=["donor_id", "dataset_id"], progress=False)
    return {"root": root, "model": model, "cells": cells, "index": index}


def test_index_files_and_manifest(setting):
    index = ReferenceIndex(setting["index"])
    n = setting["cells"].n_obs
    dim = CellTypePredictor.load(setting["model"]).latent_dim
    assert index.n_cells == n and index.embeddings.shape == (n, dim) and index.manifest["dim"] == dim
    assert isinstance(index.embeddings, np.memmap) and index.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    assert list(index.cells.columns) == ["cell_id", "cell_type", "donor_id", "dataset_id"]
    assert index.cell_ids.tolist() == setting["cells"].obs_names.tolist()
    m = index.manifest
    assert m["encoder"] == encoder_identity(setting["model"]) and m["encoder"]["kind"] == "adapter"
    assert m["classes"] == sorted(set(setting["cells"].obs["cell_type"]))
    assert 0 < m["novelty"]["threshold"] < 1 and m["novelty"]["n_calibration"] == n
    assert m["genes"]["n_overlap"] > 0 and m["kept_obs"] == ["cell_type", "donor_id", "dataset_id"]


def test_neighbours_equal_brute_force(setting):
    index = ReferenceIndex(setting["index"])
    rng = np.random.default_rng(1)
    z = np.asarray(index.embeddings[rng.choice(index.n_cells, 100, replace=False)])
    z = z + 0.02 * rng.normal(size=z.shape).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    pos, dist = index.search(z, 15)
    exact_pos, exact_dist = exact_search(index.embeddings, z, 15, chunk=97, query_block=30)  # uneven blocks
    full = 1 - z @ np.asarray(index.embeddings).T
    np.testing.assert_allclose(exact_dist, np.sort(full, axis=1)[:, :15], atol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(pos, exact_pos)])
    assert recall >= 0.99
    np.testing.assert_allclose(dist, exact_dist, atol=1e-4)
    assert (np.diff(dist, axis=1) >= -1e-6).all()  # nearest first


def test_knn_vote_equals_a_hand_computed_vote():
    labels = np.array([[0, 1, 1], [2, 2, 0]])
    distances = np.array([[0.1, 0.4, 0.4], [0.5, 0.5, 0.05]])
    shares = knn_vote(labels, distances, 3)
    # cell 0: class 0 weighs 1/0.1 = 10, class 1 weighs 2/0.4 = 5 -> 10/15; cell 1: class 0 20, class 2 4 -> 20/24
    np.testing.assert_allclose(shares, [[10 / 15, 5 / 15, 0], [20 / 24, 0, 4 / 24]], rtol=1e-6)
    exact = knn_vote(np.array([[1, 0]]), np.array([[0.0, 0.2]]), 2)  # a distance of 0 counts as 1e-6
    assert exact[0, 1] == pytest.approx(1e6 / (1e6 + 5), rel=1e-6)


def test_annotate_with_the_index_labels_by_the_neighbours(setting):
    cells = setting["cells"]
    query = cells[:50].copy()
    annotate(query, setting["model"], reference=setting["index"], k=5, progress=False)
    index = ReferenceIndex(setting["index"])
    neighbours = query.obsm["scimilarity_lora_knn_neighbors"]
    assert neighbours.shape == (50, 5) and (neighbours["n0"] == query.obs_names).all()  # itself, at distance ~0
    distances = query.obsm["scimilarity_lora_knn_distances"]
    assert distances[:, 0] == pytest.approx(0, abs=1e-4)
    np.testing.assert_allclose(query.obs["scimilarity_lora_knn_distance"], distances[:, 0])
    # the label is the hand-computed distance-weighted vote of those neighbours
    pos = index.cells.reset_index().set_index("cell_id").loc[neighbours.to_numpy().ravel(), "index"].to_numpy()
    codes = index.label_codes[pos].reshape(50, 5)
    expected = np.asarray(index.classes)[knn_vote(codes, distances, len(index.classes)).argmax(1)]
    assert (query.obs["scimilarity_lora_knn_best_guess"].astype(str).to_numpy() == expected).all()
    assert (query.obs["scimilarity_lora_knn_label"].astype(str) == cells.obs["cell_type"][:50].astype(str)).mean() > 0.9
    assert set(query.obs["scimilarity_lora_knn_status"]) == {"ok"}
    assert query.uns["scimilarity_lora"]["reference"]["n_cells"] == cells.n_obs
    query.write_h5ad(setting["root"] / "annotated.h5ad")  # obsm of cell ids survives the file format


def test_novelty_threshold_flags_a_type_held_out_of_the_reference(setting, tmp_path):
    root = setting["root"]
    index = build_index(setting["model"], str(root / "reference.h5ad"), tmp_path / "index", label_key="cell_type",
                        progress=False)
    import anndata as ad

    query = ad.read_h5ad(root / "query.h5ad")
    annotate(query, setting["model"], reference=index, progress=False)
    novel = query.obs["scimilarity_lora_knn_status"] == "novel"
    held_out = (query.obs["cell_type"] == HELD_OUT).to_numpy()
    print(f"novel: held-out type {novel[held_out].mean():.3f}, known types {novel[~held_out].mean():.3f}")
    assert novel[held_out].mean() >= 0.3
    assert novel[~held_out].mean() <= 0.1
    assert (query.obs["scimilarity_lora_knn_label"][novel] == "unknown").all()
    forced = annotate(query.copy(), setting["model"], reference=index, force_label=True, progress=False)
    assert "unknown" not in set(forced.obs["scimilarity_lora_knn_label"])


def _another_adapter(model, out):
    """The same run with its LoRA weights changed: another adapter of the same base."""
    shutil.copytree(model, out)
    weights = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    return out


def test_an_index_refuses_another_adapter_naming_both(setting, tmp_path):
    other = _another_adapter(setting["model"], tmp_path / "other_model")
    assert encoder_identity(other) != encoder_identity(setting["model"])
    with pytest.raises(IndexMismatchError) as e:
        annotate(setting["cells"][:10].copy(), other, reference=setting["index"], progress=False)
    mine, theirs = encoder_identity(setting["model"]), encoder_identity(other)
    assert mine["adapter_sha256"][:12] in str(e.value) and theirs["adapter_sha256"][:12] in str(e.value)


def test_a_base_index_is_queried_with_the_base_embedding(setting, tmp_path):
    base = build_index(setting["model"], str(setting["root"] / "cells.h5ad"), tmp_path / "base", label_key="cell_type",
                       base=True, progress=False)
    index = ReferenceIndex(base)
    assert index.identity == {"kind": "base", "base_sha256": encoder_identity(setting["model"])["base_sha256"]}
    adapted = ReferenceIndex(setting["index"])
    assert not np.allclose(index.embeddings, adapted.embeddings, atol=1e-3)  # the adapter moved the cells
    query = setting["cells"][:20].copy()
    annotate(query, setting["model"], reference=base, k=3, progress=False)
    assert (query.obsm["scimilarity_lora_knn_neighbors"]["n0"] == query.obs_names).all()
    with pytest.raises(IndexMismatchError, match="base"):
        adapted.check_encoder(index.identity)


def test_a_chunked_annotate_loads_the_base_encoder_once(setting, tmp_path, monkeypatch):
    """A --base index over a file read in 150-cell chunks: the base is loaded (and its identity hashed) once, not
    per chunk, and every cell is still its own nearest reference cell."""
    import anndata as ad

    from scimilarity_lora.inference.annotate_file import annotate_file
    from scimilarity_lora.inference.reference import query as reference_query

    base = build_index(setting["model"], str(setting["root"] / "cells.h5ad"), tmp_path / "base", label_key="cell_type",
                       base=True, progress=False)
    loads = []
    original = reference_query.ReferenceEncoder.load
    monkeypatch.setattr(reference_query.ReferenceEncoder, "load", lambda *a, **kw: loads.append(1) or original(*a, **kw))
    out = tmp_path / "annotated.h5ad"
    annotate_file(setting["root"] / "cells.h5ad", out, setting["model"], reference=base, k=3, chunk_cells=150)
    got = ad.read_h5ad(out)
    assert len(loads) == 1 and got.n_obs > 3 * 150
    assert (got.obsm["scimilarity_lora_knn_neighbors"]["n0"] == got.obs_names).all()


def test_the_soma_store_slice_builds_the_same_index(setting, tmp_path):
    """The same cells from a Census-shaped store (open_soma(uri=...)), in small chunks, filtered by obs."""
    store = write_census_store(setting["cells"], tmp_path / "store")
    donor = "donor_1"
    index = ReferenceIndex(build_index(setting["model"], str(store), tmp_path / "index", label_key="cell_type",
                                       keep_obs=["donor_id"], obs_filter=f"donor_id == '{donor}'", batch_size=17,
                                       progress=False))
    from_file = ReferenceIndex(setting["index"])
    rows = np.flatnonzero(setting["cells"].obs["donor_id"] == donor)
    assert index.n_cells == len(rows) and set(index.cells["donor_id"]) == {donor}
    assert index.cell_ids.tolist() == setting["cells"].obs_names[rows].tolist()
    np.testing.assert_allclose(index.embeddings, from_file.embeddings[rows], atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(setting, tmp_path):
    cli = [sys.executable, "-m", "scimilarity_lora.inference.reference", "build", str(setting["root"] / "run"),
           str(setting["root"] / "cells.h5ad"), "--out", str(tmp_path / "index")]
    r = subprocess.run(cli + ["--label-key", "no_such_column"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "no column ['no_such_column']" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "index").exists() and not list(tmp_path.iterdir())
    bad = setting["cells"][:30].copy()
    bad.X = bad.X.toarray()
    bad.X[3, 2] = -1
    bad.write_h5ad(tmp_path / "negative.h5ad")
    with pytest.raises(ValueError, match="negative"):
        build_index(setting["model"], str(tmp_path / "negative.h5ad"), tmp_path / "index", label_key="cell_type",
                    progress=False)
    assert not (tmp_path / "index").exists() and [p.name for p in tmp_path.iterdir()] == ["negative.h5ad"]


def test_a_corrupt_index_is_refused_by_name(setting, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(setting["index"], broken)
    (broken / "index.hnsw").write_bytes(b"not an index")
    with pytest.raises(ReferenceIndexError, match="index.hnsw"):
        ReferenceIndex(broken)
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ReferenceIndexError, match="not valid JSON"):
        ReferenceIndex(broken)
    with pytest.raises(ReferenceIndexError, match="not a reference index"):
        ReferenceIndex(tmp_path)


def test_evaluate_scores_knn_beside_the_head(setting):
    from scimilarity_lora.evaluation.query import evaluate_query

    report = evaluate_query(setting["model"], str(setting["root"] / "query.h5ad"), "cell_type",
                            ontology_key="cell_type_ontology_term_id", reference=setting["index"],
                            majority_voting=False)
    knn = report["knn"]
    import anndata as ad

    assert knn["n_cells_scored"] == ad.read_h5ad(setting["root"] / "query.h5ad").n_obs
    assert knn["accuracy"] == pytest.approx(1.0)  # every query cell is in this index: its own nearest neighbour
    assert knn["encoder_kind"] == "adapter" and knn["k"] == 15
    assert 0 <= report["accuracy"] <= 1


def test_the_service_refuses_an_adapter_that_no_longer_matches_its_index(setting, tmp_path):
    """An adapter replaced while serving by another one: its index answers 409 naming both, never other points."""
    from bentoml.exceptions import NotFound

    from scimilarity_lora.serving.search import IndexConflict, References, parse_reference_setting

    assert parse_reference_setting("", "m") == {}
    assert parse_reference_setting("/x/idx", "m") == {"m": "/x/idx"}
    assert parse_reference_setting("a=/x, b=/y", "m") == {"a": "/x", "b": "/y"}
    with pytest.raises(ValueError, match="name=<index dir>"):
        parse_reference_setting("a=/x,=/y", "m")
    served = CellTypePredictor.load(setting["model"])
    refs = References(f"m={setting['index']}", {"m": served}, "m")
    assert refs.for_model("m", served) is refs.indices["m"]
    replaced = CellTypePredictor.load(_another_adapter(setting["model"], tmp_path / "replaced"))
    with pytest.raises(IndexConflict) as e:
        refs.for_model("m", replaced)
    assert e.value.error_code == 409 and "was built with adapter" in str(e.value)
    with pytest.raises(NotFound, match="has no reference index"):
        refs.for_model("other", served)
    skipped = References(f"m={setting['index']}", {"m": replaced}, "m")  # at start: skipped, not served wrongly
    assert skipped.indices == {}


def test_annotating_a_file_in_chunks_equals_annotating_it_in_memory(setting, tmp_path):
    """The file path (the CLI's, for files too large to load) reads 97 rows at a time, writes per-cell matrices
    chunk by chunk, and gives exactly the in-memory columns; the input's matrix and obs are kept."""
    import anndata as ad
    import pandas as pd

    from scimilarity_lora.inference.annotate_file import annotate_file

    src = setting["root"] / "cells.h5ad"
    expected = annotate(ad.read_h5ad(src), setting["model"], reference=setting["index"], k=5, progress=False,
                        majority_voting=True, over_clustering="donor_id")
    out = tmp_path / "annotated.h5ad"
    summary = annotate_file(src, out, setting["model"], reference=setting["index"], k=5, chunk_cells=97,
                            majority_voting=True, over_clustering="donor_id")
    got = ad.read_h5ad(out)
    assert sorted(got.obs.columns) == sorted(expected.obs.columns)  # majority voting's columns come last here
    for c in expected.obs.columns:
        a, b = got.obs[c], expected.obs[c]
        if pd.api.types.is_float_dtype(b):
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, err_msg=c)
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), c
    assert set(got.obsm) == set(expected.obsm)
    np.testing.assert_allclose(got.obsm["X_scimilarity"], expected.obsm["X_scimilarity"], atol=1e-6)
    np.testing.assert_allclose(got.obsm["scimilarity_lora_knn_distances"],
                               expected.obsm["scimilarity_lora_knn_distances"], atol=1e-6)
    assert (got.obsm["scimilarity_lora_knn_neighbors"].to_numpy() ==
            expected.obsm["scimilarity_lora_knn_neighbors"].to_numpy()).all()
    uns, want = got.uns["scimilarity_lora"], expected.uns["scimilarity_lora"]
    assert summary["status_counts"] == want["status_counts"] == {k: int(v) for k, v in uns["status_counts"].items()}
    assert uns["reference"]["status_counts"] == want["reference"]["status_counts"]
    assert (got.X != setting["cells"].X).nnz == 0 and (got.obs["donor_id"] == setting["cells"].obs["donor_id"]).all()


def test_a_bad_chunk_leaves_no_output(setting, tmp_path):
    """NaN in the last chunk: a clear error, and nothing at the output path (no half-annotated file)."""
    import anndata as ad

    from scimilarity_lora.inference.annotate_file import annotate_file
    from scimilarity_lora.preprocess import InvalidExpressionError

    cells = setting["cells"].copy()
    X = cells.X.tocsr()
    X.data[X.indptr[-2]] = np.nan  # the last cell
    cells.X = X
    src, out = tmp_path / "bad.h5ad", tmp_path / "out.h5ad"
    cells.write_h5ad(src)
    last = cells.n_obs - 1
    with pytest.raises(InvalidExpressionError, match=f"bad.h5ad, cells 600 to {last}: .* 1 NaN"):
        annotate_file(src, out, setting["model"], chunk_cells=200)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_annotating_the_cells_of_a_soma_store(setting, tmp_path):
    """A Census-shaped store's slice, read in chunks through open_soma(uri=...): the same answers as the same
    cells in memory; the output holds the slice's obs and the store's genes, no matrix."""
    import anndata as ad

    from scimilarity_lora.inference.annotate_file import annotate_file

    store = write_census_store(setting["cells"], tmp_path / "soma")
    out = tmp_path / "annotated.h5ad"
    annotate_file(store, out, setting["model"], chunk_cells=150, obs_filter="donor_id != 'donor_0'")
    got = ad.read_h5ad(out)
    cells = setting["cells"]
    chosen = cells[cells.obs["donor_id"] != "donor_0"].copy()
    expected = annotate(chosen.copy(), setting["model"], progress=False)
    assert got.n_obs == chosen.n_obs > 0 and got.X is None and got.n_vars == cells.n_vars
    assert got.obs_names.tolist() == chosen.obs_names.tolist()
    assert got.obs["scimilarity_lora_label"].astype(str).tolist() == \
        expected.obs["scimilarity_lora_label"].astype(str).tolist()
    np.testing.assert_allclose(got.obsm["X_scimilarity"], expected.obsm["X_scimilarity"], atol=1e-5)


def test_an_h5ad_row_source_carries_the_gene_ids_column(setting):
    """What annotate_file hands to each chunk for --gene-ids-key: the file's var column, read with the rest of var;
    a column the file lacks is a clear error."""
    from scimilarity_lora.data.io import DataError
    from scimilarity_lora.data.row_source import open_h5ad_rows

    path = setting["root"] / "cells.h5ad"
    with open_h5ad_rows(path, gene_ids_key="feature_id") as source:
        assert source.gene_ids == setting["cells"].var["feature_id"].astype(str).tolist()
    with open_h5ad_rows(path) as source:
        assert source.gene_ids is None
    with pytest.raises(DataError, match="gene id column 'ensembl' not in var"):
        open_h5ad_rows(path, gene_ids_key="ensembl")
