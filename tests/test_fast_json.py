"""/predict_batch's fast reader (serving/fast_json.py) must never accept what the contract (the pydantic BatchRequest)
refuses, must read what it accepts to the same values, and must actually take the fast path for ordinary bodies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bentoml.exceptions import InvalidArgument
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from scimilarity_lora.serving.fast_json import BatchRequestInput, SparseArrays, decode_sparse_batch, read_batch_request
from scimilarity_lora.serving.parsing import sparse_matrix
from scimilarity_lora.serving.schemas import BatchRequest, SparseCells

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5)
NUMBERS = st.integers(-2, 5) | st.floats(-1, 1e39, allow_nan=False) | st.sampled_from([0.0, -0.0, 3.0, 1e38])


@st.composite
def sparse_blocks(draw) -> dict:
    n_genes = draw(st.integers(0, 4))
    genes = draw(st.lists(st.text(min_size=0, max_size=3) | st.sampled_from(["CD3D", "x" * 201]),
                          min_size=n_genes, max_size=n_genes))
    nnz = draw(st.integers(0, 5))
    cuts = sorted(draw(st.lists(st.integers(0, nnz), min_size=0, max_size=3)))
    block = {"genes": genes, "indptr": [0, *cuts, nnz],
             "indices": draw(st.lists(st.integers(-1, 4), min_size=nnz, max_size=nnz)),
             "data": draw(st.lists(NUMBERS, min_size=nnz, max_size=nnz))}
    for key in draw(st.lists(st.sampled_from(sorted(block)), max_size=2)):  # now and then a wrong type
        block[key] = draw(ANY_JSON)
    if draw(st.booleans()) and draw(st.booleans()):
        block[draw(st.sampled_from(["extra", "cells"]))] = draw(ANY_JSON)
    return block


OPTIONAL = {"values": st.sampled_from(["counts", "log1p", "raw", None]), "top_k": st.integers(0, 101) | ANY_JSON,
            "force_label": st.booleans() | ANY_JSON, "model": st.text(max_size=3) | st.none(),
            "method": st.sampled_from(["head", "knn", "vote"]), "k": st.integers(0, 101) | st.floats(0, 3),
            "cells": ANY_JSON, "unknown_field": ANY_JSON}


@st.composite
def batch_bodies(draw) -> bytes:
    body = {"sparse": draw(sparse_blocks())} if draw(st.integers(0, 9)) else {}
    for key in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), max_size=3, unique=True)):
        body[key] = draw(OPTIONAL[key])
    return json.dumps(body).encode()


def _same(fast: dict, ref: BatchRequest) -> None:
    assert isinstance(ref.sparse, SparseCells) and ref.cells is None
    s = fast["sparse"]
    assert s.genes == ref.sparse.genes
    assert s.indptr.tolist() == ref.sparse.indptr and s.indices.tolist() == ref.sparse.indices
    assert s.data.tolist() == ref.sparse.data  # both parse JSON numbers to the nearest float64
    for key in ("values", "top_k", "force_label", "method", "k"):
        assert fast[key] == getattr(ref, key)
    assert fast.get("model") == ref.model


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_bodies())
def test_what_the_fast_reader_accepts_pydantic_accepts_with_the_same_values(body):
    fast = decode_sparse_batch(body)
    try:
        ref = BatchRequest.model_validate_json(body)
    except ValidationError:
        assert fast is None, body
        return
    if fast is not None:
        _same(fast, ref)


@pytest.mark.parametrize("raw", [
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [1e400]}}',   # overflows float64
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [3.5e38]}}',  # over float32's largest
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1.0], "indices": [0], "data": [1]}}',     # an integral float as index
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [true]}}',
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": ["1"]}}',
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [NaN]}}',
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [1]}, "model": null}',
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [1]}, "top_k": 3.0}',
    b'{"sparse": {"genes": ["\\ud800"], "indptr": [0, 1], "indices": [0], "data": [1]}}',
    b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [1]}} trailing',
])
def test_edge_bodies_agree_with_pydantic(raw):
    fast = decode_sparse_batch(raw)
    try:
        ref = BatchRequest.model_validate_json(raw)
    except ValidationError:
        assert fast is None
        return
    if fast is not None:
        _same(fast, ref)


def test_an_ordinary_sparse_body_takes_the_fast_path_and_builds_the_same_matrix():
    rng = np.random.default_rng(0)
    X = (rng.poisson(0.3, (50, 20)) * (rng.random((50, 20)) < 0.4)).astype(np.float32)
    import scipy.sparse as sp

    C = sp.csr_matrix(X)
    body = json.dumps({"sparse": {"genes": [f"G{i}" for i in range(20)], "indptr": C.indptr.tolist(),
                                  "indices": C.indices.tolist(), "data": C.data.astype(int).tolist()},
                       "top_k": 2, "model": "m"}).encode()
    fast = read_batch_request(BatchRequestInput, body)
    assert isinstance(fast.sparse, SparseArrays) and fast.top_k == 2 and fast.model == "m" and fast.cells is None
    slow = BatchRequest.model_validate_json(body)
    (Xf, gf), (Xs, gs) = sparse_matrix(fast.sparse), sparse_matrix(slow.sparse)
    assert gf == gs and (Xf != Xs).nnz == 0 and np.array_equal(Xf.toarray(), X)
    # the list-of-cells form goes through pydantic, as does anything the fast decoder refuses
    cells = read_batch_request(BatchRequestInput, b'{"cells": [{"expression": {"CD3D": 1}}]}')
    assert cells.sparse is None and cells.cells[0].expression == {"CD3D": 1.0}
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        read_batch_request(BatchRequestInput, body.replace(b'"data": [', b'"data": [-1, ', 1))


@pytest.mark.parametrize("body, key", [
    (b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [1]}, "k": 2, "k": 3}', "k"),
    (b'{"sparse": {"genes": ["A"], "genes": ["B"], "indptr": [0, 1], "indices": [0], "data": [1]}}', "genes"),
    (b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [1]}, "\\u006b": 2, "k": 3}', "k"),
    (b'{"cells": [{"expression": {"A": 1, "A": 2}}]}', "A"),                 # the pydantic path's check
    (b'{"sparse": {"genes": ["A"], "indptr": [0, 1], "indices": [0], "data": [-1]}, "k": 2, "k": 3}', "k"),
])
def test_a_repeated_key_is_refused_on_either_path(body, key):
    with pytest.raises(InvalidArgument, match=f"duplicate JSON key '{key}'"):
        read_batch_request(BatchRequestInput, body)


def test_gene_names_that_look_like_keys_are_not_keys():
    body = b'{"sparse": {"genes": ["data", "data:", "k"], "indptr": [0, 2], "indices": [0, 2], "data": [1, 2]}}'
    req = read_batch_request(BatchRequestInput, body)
    assert isinstance(req.sparse, SparseArrays) and req.sparse.genes == ["data", "data:", "k"]


@st.composite
def list_form_bodies(draw) -> bytes:
    """List-form bodies, now and then with a key repeated (spelled plainly or escaped) and in various spacings."""
    genes = st.sampled_from(["CD3D", "GNLY", "MS4A1", "A", "é", "x:y"])
    cells = draw(st.lists(st.dictionaries(genes, st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=4))
    sep = draw(st.sampled_from([(", ", ": "), (",", ":"), (", ", " : "), (",\n", ":\t")]))
    body = json.dumps({"cells": [{"expression": c} for c in cells], "top_k": 1}, separators=sep,
                      ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):  # repeat a gene of the first cell inside it
        gene = next(iter(cells[0]))
        spelled = draw(st.sampled_from([json.dumps(gene), json.dumps(gene).replace("C", "\\u0043", 1)]))
        body = body.replace('{"expression"' + sep[1] + "{", '{"expression"' + sep[1] + "{" + spelled + sep[1] + "5" +
                            sep[0], 1)
    return body.encode()


@settings(max_examples=300, deadline=None)
@given(list_form_bodies())
def test_the_list_form_refuses_exactly_the_bodies_with_a_repeated_key(body):
    from scimilarity_lora.serving.middleware import duplicate_key

    repeated = duplicate_key(body)
    if repeated is None:
        req = read_batch_request(BatchRequestInput, body)
        assert req.cells == BatchRequest.model_validate_json(body).cells
    else:
        with pytest.raises(InvalidArgument, match="duplicate JSON key"):
            read_batch_request(BatchRequestInput, body)
