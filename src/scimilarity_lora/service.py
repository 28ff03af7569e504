"""The BentoML service: cell-type prediction and SCimilarity embeddings over HTTP.

Serve from the repository root (the root ``service.py`` re-exports this class)::

    bentoml serve --host 127.0.0.1 --port 3000          # model: $SCIMILARITY_LORA_MODEL or scimilarity_lora:latest

Values are raw counts by default (``"values": "counts"``); send ``"values": "log1p"`` for log-normalised input.
Either way the request goes through the training code path: :mod:`~scimilarity_lora.genes` alignment to the
model's gene order, then :mod:`~scimilarity_lora.preprocess` normalisation with the settings stored in the model.

Batching: BentoML's ``batchable=True`` merges requests before an endpoint could say which request or cell is bad,
and its dispatcher answers 503 when overloaded. Instead every request is validated and featurised in its endpoint,
then queued to :class:`MicroBatcher`, which runs whatever has queued as one forward pass (at most
``max_batch_rows`` cells): no added latency when idle, large batches under load, and requests wait rather than
fail. Bad input is a 4xx with a message (see ``tests/test_service.py`` for every case).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
import scipy.sparse as sp
import torch
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from scimilarity_lora.genes import GeneAlignmentError
from scimilarity_lora.predictor import CellTypePredictor
from scimilarity_lora.preprocess import InvalidExpressionError

log = logging.getLogger(__name__)

MODEL_TAG = os.environ.get("SCIMILARITY_LORA_MODEL", "scimilarity_lora:latest")
MAX_GENES = int(os.environ.get("SCIMILARITY_LORA_MAX_GENES", "40000"))
MAX_CELLS = int(os.environ.get("SCIMILARITY_LORA_MAX_CELLS", "10000"))
MAX_NNZ = int(os.environ.get("SCIMILARITY_LORA_MAX_NNZ", "5000000"))
MAX_BODY_BYTES = int(os.environ.get("SCIMILARITY_LORA_MAX_BODY_BYTES", str(64 * 1024 * 1024)))
MAX_BATCH_ROWS = int(os.environ.get("SCIMILARITY_LORA_MAX_BATCH_ROWS", "256"))
THREADS = int(os.environ.get("SCIMILARITY_LORA_TORCH_THREADS", str(min(4, os.cpu_count() or 1))))
WORKERS = int(os.environ.get("SCIMILARITY_LORA_WORKERS", "1"))

Finite = Annotated[float, Field(allow_inf_nan=False)]
Values = Literal["counts", "log1p"]
GeneName = Annotated[str, Field(min_length=1, max_length=200)]
Expression = Annotated[dict[GeneName, Finite], Field(min_length=1, max_length=MAX_GENES)]
TopK = Annotated[int, Field(ge=1, le=100)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellRequest(_Strict):
    expression: Expression = Field(description="gene symbol -> expression value for one cell")
    values: Values = Field("counts", description="'counts' (raw UMI counts) or 'log1p' (log1p(normalize_total))")
    top_k: TopK = Field(3, description="how many ranked cell types to return")


class BatchCell(_Strict):
    expression: Expression


class SparseCells(_Strict):
    """CSR-like: cell i has values data[indptr[i]:indptr[i+1]] for genes[indices[...]]."""

    genes: Annotated[list[GeneName], Field(min_length=1, max_length=MAX_GENES)]
    indptr: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=MAX_CELLS + 1)]
    indices: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_NNZ)]
    data: Annotated[list[Finite], Field(max_length=MAX_NNZ)]


class BatchRequest(_Strict):
    cells: Annotated[list[BatchCell], Field(min_length=1, max_length=MAX_CELLS)] | None = None
    sparse: SparseCells | None = None
    values: Values = "counts"
    top_k: TopK = 3


class EmbedRequest(_Strict):
    expression: Expression
    values: Values = "counts"


class MicroBatcher:
    """Queue featurised cells; one inference thread runs everything queued as one forward pass."""

    def __init__(self, predictor: CellTypePredictor, max_batch_rows: int = MAX_BATCH_ROWS) -> None:
        self.predictor, self.max_batch_rows = predictor, max_batch_rows
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches_run = 0
        self.rows_run = 0

    async def run(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            rows = items[0][0].shape[0]
            while rows < self.max_batch_rows and not self.queue.empty():
                items.append(self.queue.get_nowait())
                rows += items[-1][0].shape[0]
            try:
                probs, emb = await loop.run_in_executor(self.executor, self._forward, [x for x, _ in items])
            except Exception as e:  # never leave a request hanging
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            start = 0
            for x, fut in items:
                n = x.shape[0]
                if not fut.done():
                    fut.set_result((probs[start:start + n], emb[start:start + n]))
                start += n

    def _forward(self, xs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        probs, emb = self.predictor.forward(torch.cat(xs) if len(xs) > 1 else xs[0])
        self.batches_run += 1
        self.rows_run += probs.shape[0]
        return probs.numpy(), emb.numpy()


class BodySizeLimit:
    """Refuse request bodies above a cap with HTTP 413 before reading them into memory."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        response = JSONResponse({"error": f"request body larger than {self.max_bytes} bytes"}, status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _TooLarge(Exception):
    pass


class JSONByDefault:
    """Every POST endpoint here takes JSON. ``curl -d`` without ``-H 'content-type: application/json'`` sends
    form encoding, which BentoML would parse as form fields and reject with a confusing message; treat a missing or
    form content type as JSON instead."""

    FORM = (b"", b"application/x-www-form-urlencoded")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip()
            if content_type in self.FORM:
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


_STATE: dict[str, Any] = {}


async def _metadata(request: Request) -> JSONResponse:
    if "metadata" not in _STATE:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    return JSONResponse(_STATE["metadata"])


async def _predict_batch_npz(request: Request) -> JSONResponse:
    """Binary batch input: an .npz (``np.savez``) with arrays ``genes`` (str), ``indptr``, ``indices``, ``data`` and
    optional scalars ``values`` ('counts' | 'log1p') and ``top_k``. Parsing 64k numbers from JSON costs more than
    the forward pass; an .npz is read with ``allow_pickle=False`` in well under a millisecond."""
    svc = _STATE.get("service")
    if svc is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    body = await request.body()
    try:  # np.load's exceptions on malformed input are not enumerable (EOFError, ValueError, BadZipFile, ...)
        with np.load(io.BytesIO(body), allow_pickle=False) as f:
            parts = [np.asarray(f[k]) for k in ("genes", "indptr", "indices", "data")]
            values = str(f["values"]) if "values" in f.files else "counts"
            top_k = int(f["top_k"]) if "top_k" in f.files else 3
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's malformed body
        return JSONResponse({"error": "body must be an .npz (np.savez) with arrays genes, indptr, indices, data "
                                      f"and optional values, top_k ({type(e).__name__}: {e})"}, status_code=400)
    if parts[0].dtype.kind != "U" or values not in ("counts", "log1p") or not 1 <= top_k <= 100:
        return JSONResponse({"error": "genes must be strings, values 'counts' or 'log1p', top_k 1..100"},
                            status_code=400)
    if any(p.dtype.kind not in "iu" for p in parts[1:3]) or parts[3].dtype.kind not in "iuf":
        return JSONResponse({"error": "indptr and indices must be integer arrays, data numeric"}, status_code=400)
    try:
        X, genes = csr_from_parts(*parts)
        _check_rows(X, values)
        x, alignment = svc._featurize(X, genes, values)
    except InvalidArgument as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    probs, _ = await svc.batcher.run(x)
    return JSONResponse(svc._batch_response(probs, top_k, [alignment.n_overlap] * len(probs)))


v1_app = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]),
                           Route("/predict_batch_npz", _predict_batch_npz, methods=["POST"])])


@bentoml.asgi_app(v1_app, path="/v1")
@bentoml.service(
    traffic={"timeout": 120, "max_concurrency": 512},
    workers=WORKERS,
    metrics={"enabled": os.environ.get("SCIMILARITY_LORA_METRICS", "1") == "1"},
    logging={"access": {"enabled": os.environ.get("SCIMILARITY_LORA_ACCESS_LOG", "1") == "1"}},
    monitoring={"enabled": os.environ.get("SCIMILARITY_LORA_MONITORING", "1") == "1"},
)
class SCimilarityLoRA:
    """Cell-type annotation with a LoRA-fine-tuned SCimilarity encoder."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        torch.set_num_threads(THREADS)
        self.predictor = CellTypePredictor.load(self.model.path)
        self.batcher = MicroBatcher(self.predictor)
        info = self.model.info
        _STATE["metadata"] = {
            "model_tag": str(info.tag),
            "classes": self.predictor.classes,
            "n_genes": len(self.predictor.genes),
            "latent_dim": self.predictor.encoder.latent_dim,
            "preprocessing": self.predictor.preprocessing.to_dict(),
            "finetune": self.predictor.config.get("finetune"),
            "base_is_pretrained": self.predictor.config.get("base_is_pretrained"),
            "training_metrics": info.metadata.get("metrics", {}),
            "limits": {"max_genes_per_cell": MAX_GENES, "max_cells": MAX_CELLS, "max_body_bytes": MAX_BODY_BYTES},
        }
        _STATE["service"] = self
        log.info("serving %s: %d classes, %d genes", info.tag, len(self.predictor.classes), len(self.predictor.genes))

    # -- featurisation: the shared alignment + preprocessing, with errors turned into 400s --------------------
    def _featurize(self, X: sp.csr_matrix, genes: list[str], values: str, where: str = "") -> tuple[torch.Tensor, Any]:
        try:
            alignment = self.predictor.alignment(genes, min_overlap=1)
        except GeneAlignmentError as e:
            raise InvalidArgument(f"{where}{_gene_error(e, len(genes))}") from None
        try:
            x = self.predictor.featurize(X, alignment, input_is_log1p=values == "log1p")
        except InvalidExpressionError as e:
            raise InvalidArgument(f"{where}{e}") from None
        return x, alignment

    def _one_cell(self, expression: dict[str, float], values: str, where: str = "") -> tuple[torch.Tensor, Any]:
        genes = list(expression)
        X = sp.csr_matrix(np.asarray([list(expression.values())], dtype=np.float32))
        return self._featurize(X, genes, values, where)

    def _prediction(self, probs: np.ndarray, top_k: int) -> dict[str, Any]:
        order = np.argsort(-probs)[:top_k]
        return {
            "cell_type": self.predictor.classes[int(order[0])],
            "confidence": round(float(probs[order[0]]), 6),
            "top_k": [{"cell_type": self.predictor.classes[int(i)], "probability": round(float(probs[i]), 6)}
                      for i in order],
        }

    # -- endpoints -------------------------------------------------------------------------------------------
    @bentoml.api(input_spec=CellRequest, route="/predict")
    async def predict(self, expression: dict[str, float], values: str = "counts", top_k: int = 3) -> dict:
        """Predict the cell type of one cell."""
        x, alignment = self._one_cell(expression, values)
        probs, _ = await self.batcher.run(x)
        unknown = list(alignment.unknown_genes)
        return {**self._prediction(probs[0], top_k), "genes_used": alignment.n_overlap,
                "genes_unknown": unknown[:100], "n_genes_unknown": len(unknown), "values": values}

    @bentoml.api(input_spec=BatchRequest, route="/predict_batch")
    async def predict_batch(self, cells: list | None = None, sparse: SparseCells | None = None,
                            values: str = "counts", top_k: int = 3) -> dict:
        """Predict many cells: a list of expression dicts, or one CSR-like sparse block with a shared gene list."""
        if (cells is None) == (sparse is None):
            raise InvalidArgument("send exactly one of 'cells' (a list of {expression: {...}}) or 'sparse'")
        if cells is not None:
            parts = [self._one_cell(c.expression if hasattr(c, "expression") else c["expression"], values,
                                    where=f"cell {i}: ") for i, c in enumerate(cells)]
            x = torch.cat([p[0] for p in parts])
            used = [p[1].n_overlap for p in parts]
        else:
            X, genes = _sparse_matrix(sparse)
            _check_rows(X, values)
            x, alignment = self._featurize(X, genes, values)
            used = [alignment.n_overlap] * X.shape[0]
        probs, _ = await self.batcher.run(x)
        return self._batch_response(probs, top_k, used)

    def _batch_response(self, probs: np.ndarray, top_k: int, used: list[int]) -> dict:
        return {"predictions": [{**self._prediction(p, top_k), "genes_used": u} for p, u in zip(probs, used)],
                "n_cells": len(used)}

    @bentoml.api(input_spec=EmbedRequest, route="/embed")
    async def embed(self, expression: dict[str, float], values: str = "counts") -> dict:
        """The cell's L2-normalised SCimilarity embedding (of the fine-tuned encoder)."""
        x, alignment = self._one_cell(expression, values)
        _, emb = await self.batcher.run(x)
        return {"embedding": [round(float(v), 7) for v in emb[0]], "dim": int(emb.shape[1]),
                "genes_used": alignment.n_overlap}


SCimilarityLoRA.add_asgi_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
SCimilarityLoRA.add_asgi_middleware(JSONByDefault)


def _gene_error(e: GeneAlignmentError, n: int) -> str:
    msg = str(e)
    if "only 0 of" in msg:
        return f"none of the {n} genes in the request are in the model's gene order (symbols expected, e.g. CD3D)"
    return msg


def _sparse_matrix(sparse: SparseCells) -> tuple[sp.csr_matrix, list[str]]:
    return csr_from_parts(sparse.genes, sparse.indptr, sparse.indices, sparse.data)


def csr_from_parts(genes, indptr, indices, data) -> tuple[sp.csr_matrix, list[str]]:
    """Validate CSR parts (JSON lists or .npz arrays) and build the cells x genes matrix."""
    indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    data = np.asarray(data, dtype=np.float32)
    n_genes = len(genes)
    if not 1 <= n_genes <= MAX_GENES or indptr.ndim != 1 or indices.ndim != 1 or data.ndim != 1:
        raise InvalidArgument(f"sparse: genes must hold 1 to {MAX_GENES} names and indptr/indices/data be 1-d")
    if not 2 <= len(indptr) <= MAX_CELLS + 1 or len(indices) > MAX_NNZ:
        raise InvalidArgument(f"sparse: at most {MAX_CELLS} cells and {MAX_NNZ} non-zeros per request")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise InvalidArgument("sparse.indptr must start at 0, never decrease, and end at len(sparse.indices)")
    if len(indices) != len(data):
        raise InvalidArgument(f"sparse.indices ({len(indices)}) and sparse.data ({len(data)}) differ in length")
    if len(indices) and (indices.max() >= n_genes or indices.min() < 0):
        bad = int(np.argmax((indices >= n_genes) | (indices < 0)))
        cell = int(np.searchsorted(indptr, bad, side="right") - 1)
        raise InvalidArgument(f"cell {cell}: a gene index is outside 0..len(sparse.genes)-1 ({n_genes})")
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_genes)), [str(g) for g in genes]


def _check_rows(X: sp.csr_matrix, values: str) -> None:
    """Name the first bad cell of a sparse block (the shared validation would only say 'the input')."""
    bad = X.data < 0
    if bad.any():
        cell = int(np.searchsorted(X.indptr, int(np.argmax(bad)), side="right") - 1)
        raise InvalidArgument(f"cell {cell}: negative values; expected {values}")
