"""The sparse form of ``/predict_batch`` decoded straight into arrays, pydantic only when that fails.

Validating a 256-cell sparse body with pydantic and then turning its Python lists into arrays cost more than the
forward pass (docs/guide/serving.md has the profile). :class:`BatchRequestInput` keeps :class:`~.schemas.BatchRequest`
as the contract (the OpenAPI document, every error message) and changes only how a body is read: msgspec decodes
it against the same limits in C, straight into typed lists, and NumPy takes them from there. Whatever msgspec does
not accept (the list-of-cells form, a malformed body, any value out of bounds) goes through pydantic exactly as
before, so an error reads the same whichever decoder saw the body first. A body msgspec accepts is one pydantic
accepts too (tests/test_fast_json.py checks that on generated bodies); duplicate keys never reach either decoder
(they are refused first, here more cheaply than :mod:`.middleware` does for the other routes).

Both decoders run in a worker thread, not on the event loop; a 10,000-cell list-form body still delays ``/livez``
while pydantic holds the GIL over it (the numbers are in the serving guide).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio.to_thread
import msgspec
import numpy as np
from _bentoml_sdk.io_models import IOMixin  # BentoML's hook for how an input model is read from a request
from bentoml.exceptions import InvalidArgument

from scimilarity_lora.serving.middleware import duplicate_key, duplicate_key_message
from scimilarity_lora.serving.schemas import FLOAT32_MAX, BatchRequest
from scimilarity_lora.serving.settings import SETTINGS

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_Small = Annotated[int, msgspec.Meta(ge=1, le=100)]


class _Sparse(msgspec.Struct, forbid_unknown_fields=True):
    genes: Annotated[list[_Name], msgspec.Meta(min_length=1, max_length=SETTINGS.max_genes)]
    indptr: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=SETTINGS.max_nnz)]],
                      msgspec.Meta(min_length=2, max_length=SETTINGS.max_cells + 1)]
    indices: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=SETTINGS.max_genes)]],
                       msgspec.Meta(max_length=SETTINGS.max_nnz)]
    data: Annotated[list[Annotated[float, msgspec.Meta(ge=0, le=FLOAT32_MAX)]], msgspec.Meta(max_length=SETTINGS.max_nnz)]


class _SparseBatch(msgspec.Struct, forbid_unknown_fields=True):
    sparse: _Sparse
    values: Literal["counts", "log1p"] = "counts"
    top_k: _Small = 3
    force_label: bool = False
    model: _Name | msgspec.UnsetType = msgspec.UNSET  # an explicit null is pydantic's to refuse
    method: Literal["head", "knn"] = "head"
    k: _Small = 15


_DECODER = msgspec.json.Decoder(_SparseBatch)
#: a JSON string followed by a colon: an object key (valid only on a body that decoded, so tokens are real tokens)
_KEY = re.compile(rb'"(?:[^"\\]|\\.)*"(\s*:)?')


def _repeated_key(body: bytes) -> str | None:
    """A key that occurs twice in a body :data:`_DECODER` accepted. Such a body has exactly two objects, the request and
    its ``sparse`` block, whose allowed keys differ, and no other keys (gene names are array items): a key token seen
    twice anywhere is a key repeated within one object. Scanning strings costs about 0.5 ms on a 256-cell body,
    where ``json.loads`` with a pairs hook (:func:`.middleware.duplicate_key`) cost 8."""
    seen: set[str] = set()
    for m in _KEY.finditer(body):
        if m.group(1) is None:
            continue
        token = m.group(0)[: m.group(0).rindex(b'"') + 1]
        key = json.loads(token) if b"\\" in token else token[1:-1].decode()
        if key in seen:
            return key
        seen.add(key)
    return None


@dataclass(frozen=True)
class SparseArrays:
    """A validated sparse block as arrays: what :func:`~.parsing.csr_from_parts` takes, like ``SparseCells``."""

    genes: list[str]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def decode_sparse_batch(body: bytes) -> dict[str, Any] | None:
    """The fields of a sparse-form batch request with its block as arrays, or None for any body this decoder does not
    accept (the caller then asks pydantic, whose answer is the contract)."""
    try:
        req = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    s = req.sparse
    sparse = SparseArrays(s.genes, np.fromiter(s.indptr, np.int64, len(s.indptr)),
                          np.fromiter(s.indices, np.int64, len(s.indices)), np.fromiter(s.data, np.float64, len(s.data)))
    fields = {f: getattr(req, f) for f in ("values", "top_k", "force_label", "method", "k")}
    if req.model is not msgspec.UNSET:
        fields["model"] = req.model
    return {"sparse": sparse, **fields}


#: a key with white space before its colon (the count below would miss it)
_SPACED_KEY = re.compile(rb'"\s+:')


def _keys_in(body: bytes) -> int | None:
    """How many object keys ``body`` (valid JSON) spells, or None if it cannot say cheaply. Without a backslash, a
    quote is always a string's delimiter, so every key ends with ``":`` (or ``"`` and white space before the colon,
    which answers None) and nothing else does: one ``bytes.count`` in C, milliseconds for 30 MB."""
    if b"\\" in body or _SPACED_KEY.search(body):
        return None
    return body.count(b'":')


def _list_form_has_no_repeats(req: BatchRequest, body: bytes) -> bool:
    """For a list-form request pydantic accepted: a repeated key collapses in the dict it lands in, so the body spells
    more keys than the request holds (its fields, and per cell ``expression`` and its genes). The duplicate-key
    ``json.loads`` this replaces held the GIL for 1.4 s on a 10,000-cell body."""
    if req.cells is None or req.sparse is not None:
        return False
    return _keys_in(body) == len(req.model_fields_set) + sum(1 + len(c.expression) for c in req.cells)


def read_batch_request(cls: type[BatchRequest], body: bytes) -> BatchRequest:
    """The request in ``body``; a 400 for a duplicate key (the check :class:`.middleware.RequestGuard` leaves to this
    route, reported before anything else as there) or anything pydantic refuses."""
    fields = decode_sparse_batch(body)
    if fields is not None:
        key = _repeated_key(body)
        if key is not None:
            raise InvalidArgument(duplicate_key_message(key))
        return cls.model_construct(**fields)
    try:
        req = cls.model_validate_json(body or b"{}")
    except ValueError:  # pydantic's ValidationError (BentoML's 400), after the duplicate-key answer if there is one
        key = duplicate_key(body)
        if key is not None:
            raise InvalidArgument(duplicate_key_message(key)) from None
        raise
    if not _list_form_has_no_repeats(req, body):
        key = duplicate_key(body)  # exact, and names the key
        if key is not None:
            raise InvalidArgument(duplicate_key_message(key))
    return req


class BatchRequestInput(IOMixin, BatchRequest):
    """``BatchRequest`` as BentoML reads it from a request: msgspec first, pydantic for everything else."""

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> "BatchRequestInput":
        body = await request.body()
        return await anyio.to_thread.run_sync(read_batch_request, cls, body)
