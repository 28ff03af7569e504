"""The BentoML service: cell-type prediction and SCimilarity embeddings over HTTP.

Serve from the repository root (the root ``service.py`` re-exports this class)::

    bentoml serve --host 127.0.0.1 --port 3000          # model: $SCIMILARITY_LORA_MODEL or scimilarity_lora:latest

Values are raw counts by default (``"values": "counts"``); send ``"values": "log1p"`` for log-normalised input.
Either way the request goes through the training code path: :mod:`~scimilarity_lora.genes` alignment to the
model's gene order, then :mod:`~scimilarity_lora.preprocess` normalisation with the settings stored in the model.
Requests are queued to the :class:`~.batcher.MicroBatcher`. Bad input is a 4xx with a message (see
``tests/test_service.py`` for every case). Parsing, validation and featurisation run in a small thread pool, never
on the event loop, so health probes and small requests stay fast while large batches are being prepared. Loads
:mod:`scimilarity_lora.inference` only: no Lightning.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import bentoml
import numpy as np
import scipy.sparse as sp
import torch
from bentoml.exceptions import InvalidArgument, NotFound
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from scimilarity_lora.genes import GeneAlignment, GeneAlignmentError
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.preprocess import InvalidExpressionError
from scimilarity_lora.serving import client_errors
from scimilarity_lora.model.multi_adapter import AdapterError
from scimilarity_lora.serving.adapter_set import AdapterGone, AdapterSet, adapter_tags
from scimilarity_lora.serving.batcher import MicroBatcher
from scimilarity_lora.serving.fast_json import BatchRequestInput, SparseArrays
from scimilarity_lora.serving.middleware import RequestGuard, ShortErrors
from scimilarity_lora.serving.openapi import CompleteOpenAPI
from scimilarity_lora.serving.parsing import cells_matrix, gene_error_message, parse_npz, sparse_matrix
from scimilarity_lora.serving.schemas import (CellRequest, EmbedRequest, SearchBatchRequest,
                                             SearchRequest, SparseCells)
from scimilarity_lora.serving.search import References, knn_predictions
from scimilarity_lora.serving.served_set import ServedSetFile
from scimilarity_lora.serving.settings import SETTINGS

log = logging.getLogger(__name__)
#: a model tag of the BentoML store: name or name:version
MODEL_TAG = __import__("re").compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?")


def _service() -> "SCimilarityLoRA | None":
    """The running service instance, from BentoML (mounted routes run in the same worker)."""
    try:
        return bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None


async def _metadata(request: Request) -> JSONResponse:
    svc = _service()
    if svc is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    await svc.sync_served_set()
    return JSONResponse(svc.metadata)


async def _predict_batch_npz(request: Request) -> JSONResponse:
    """Binary batch input (see :func:`~.parsing.parse_npz`): parsing 64k numbers from JSON costs more than the
    forward pass; an .npz is read with ``allow_pickle=False`` in well under a millisecond."""
    svc = _service()
    if svc is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    body = await request.body()

    def prepare() -> tuple[Any, Any, Any]:
        batch = parse_npz(body)
        return (batch, *svc.featurize(batch.X, batch.genes, batch.values))

    try:
        await svc.sync_served_set()
        batch, x, alignment = await svc.off_loop(prepare)
        probs, z, pred = await svc.infer(x, None)
    except InvalidArgument as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    except NotFound as e:
        return JSONResponse({"error": str(e)}, status_code=404)
    return JSONResponse(svc.batch_response(probs, z, batch.top_k, [alignment.n_overlap] * len(probs),
                                           batch.force_label, pred))


async def _models(request: Request) -> JSONResponse:
    svc = _service()
    if svc is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    await svc.sync_served_set()
    return JSONResponse({"models": svc.models(), "default": svc.default_model})


async def _admin_adapters(request: Request) -> JSONResponse:
    """Add (POST {"model": "<name or name:version in the store>"}) or remove (DELETE .../adapters/<name>) an adapter
    while the server runs. Guarded by ``SCIMILARITY_LORA_ADMIN_TOKEN`` (``Authorization: Bearer <token>``); without
    that variable the endpoint does not exist. An adapter is read and checked completely before it is registered;
    the change is recorded for every worker and the next start (see :mod:`.served_set`)."""
    svc = _service()
    if svc is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    if not SETTINGS.admin_token or svc.adapters is None:
        return JSONResponse({"error": "not found (adapter administration needs a base model and "
                                      "SCIMILARITY_LORA_ADMIN_TOKEN)"}, status_code=404)
    import hmac

    # bytes, not str: compare_digest raises on non-ASCII str, and a header is whatever a client sends
    given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, f"Bearer {SETTINGS.admin_token}".encode("utf-8")):
        return JSONResponse({"error": "missing or wrong admin token"}, status_code=401)
    await svc.sync_served_set(force=True)
    if request.method == "DELETE":
        name = request.path_params.get("name", "")
        if name not in svc.adapters.served:
            return JSONResponse({"error": f"unknown model {name!r}; served: {sorted(svc.adapters.served)}"},
                                status_code=404)
        if name == svc.default_model:
            return JSONResponse({"error": f"{name!r} is the default model; it cannot be removed"}, status_code=409)
        await svc.on_inference_thread(svc.adapters.remove, name)
        svc.record_served_set()
        return JSONResponse({"removed": name, "models": sorted(svc.adapters.served)})
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON: {\"model\": \"<name or name:version>\"}"},
                            status_code=400)
    tag = body.get("model") if isinstance(body, dict) else None
    if not isinstance(tag, str) or not MODEL_TAG.fullmatch(tag):
        return JSONResponse({"error": "'model' must be a model tag of the store: name or name:version (letters, "
                                      f"digits, '_', '-', '.'), got {str(tag)[:100]!r}"}, status_code=400)
    try:
        model = bentoml.models.get(tag)
        served = await svc.off_loop(svc.adapters.build, model.tag.name, model.path, str(model.tag))
    except bentoml.exceptions.NotFound:
        return JSONResponse({"error": f"no model {tag!r} in the model store"}, status_code=404)
    except (AdapterError, bentoml.exceptions.BentoMLException, ValueError) as e:
        return JSONResponse({"error": f"cannot add {tag!r}: {e}"}, status_code=400)
    await svc.on_inference_thread(svc.adapters.register, served)
    svc.record_served_set()
    return JSONResponse({"added": model.tag.name, "tag": str(model.tag), "models": sorted(svc.adapters.served)})


async def _search(request: Request) -> JSONResponse:
    """The reference cells nearest to one cell (``SearchRequest``) or to each of many (``SearchBatchRequest``)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    svc = _service()
    if svc is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    batch = request.url.path.endswith("_batch")
    try:
        req = (SearchBatchRequest if batch else SearchRequest).model_validate_json(await request.body())
    except ValidationError as e:  # ShortErrors turns the list into the one error shape of every endpoint
        return JSONResponse({"detail": e.errors(include_url=False, include_context=False, include_input=False)},
                            status_code=400)
    try:
        if batch and (req.cells is None) == (req.sparse is None):
            raise InvalidArgument("send exactly one of 'cells' (a list of {expression: {...}}) or 'sparse'")
        name, pred = await svc.resolve(req.model)
        svc.references.for_model(name, pred)  # 404 before any work when the model has no index
        if batch:
            x, used = await svc.off_loop(svc._prepare_batch, req.cells, req.sparse, req.values, pred)
        else:
            x, alignment = await svc.off_loop(svc._one_cell, req.expression, req.values, "", pred)
        _, z, pred = await svc.infer(x, name)
        index = svc.references.for_model(name, pred)  # the adapter that ran (it may have been replaced meanwhile)
        neighbors = await svc.off_loop(lambda: index.neighbors(*index.search(z, req.k)))
    except BentoMLException as e:
        return JSONResponse({"error": str(e)}, status_code=e.error_code.value)
    if batch:
        return JSONResponse({"neighbors": neighbors, "n_cells": len(neighbors)})
    return JSONResponse({"neighbors": neighbors[0], "genes_used": alignment.n_overlap})


v1_app = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]), Route("/models", _models, methods=["GET"]),
                           Route("/search", _search, methods=["POST"]),
                           Route("/search_batch", _search, methods=["POST"]),
                           Route("/admin/adapters", _admin_adapters, methods=["POST"]),
                           Route("/admin/adapters/{name}", _admin_adapters, methods=["DELETE"]),
                           Route("/predict_batch_npz", _predict_batch_npz, methods=["POST"])])


@bentoml.asgi_app(v1_app, path="/v1")
@bentoml.service(
    traffic={"timeout": 120, "max_concurrency": 512},
    workers=SETTINGS.workers,
    metrics={"enabled": SETTINGS.metrics},
    logging={"access": {"enabled": SETTINGS.access_log}},
    monitoring={"enabled": SETTINGS.monitoring},
)
class SCimilarityLoRA:
    """Cell-type annotation with a LoRA-fine-tuned SCimilarity encoder."""

    model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        client_errors.install()
        torch.set_num_threads(SETTINGS.torch_threads)
        self.model_info = info = self.model.info
        self.adapters: AdapterSet | None = None
        self.served_file: ServedSetFile | None = None
        self._sync_lock: asyncio.Lock | None = None
        if info.labels.get("kind") == "base":  # one base, many adapters (see adapter_set.py)
            self.adapters = AdapterSet(self.model.path, info.metadata["sha256"])
            tags = adapter_tags(info.metadata["sha256"], SETTINGS.adapters)
            if SETTINGS.admin_token:  # the set the admin endpoint last recorded, if any, survives restarts
                self.served_file = ServedSetFile(info.metadata["sha256"])
                recorded = self.served_file.read()
                tags = recorded if recorded is not None else tags
                self.served_file.seen_mtime = self.served_file.mtime()
            for tag in tags:
                self._add_or_skip(tag)
            if not self.adapters.served:
                raise RuntimeError(f"no servable adapter of base {info.tag} in the model store (export --adapter)")
            default = SETTINGS.default_model
            if default and default not in self.adapters.served:
                log.warning("SCIMILARITY_LORA_DEFAULT_MODEL=%s is not served; the default is %s", default,
                            sorted(self.adapters.served)[0])
                default = None
            self.default_model = default or sorted(self.adapters.served)[0]
            self.batcher = MicroBatcher(None, SETTINGS.max_batch_rows, forward=self._adapter_forward)
        else:
            self.default_model = info.tag.name
            self._single = CellTypePredictor.load(self.model.path)
            self.batcher = MicroBatcher(self._single, SETTINGS.max_batch_rows)
        self.cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="featurize")
        served = ({n: s.predictor for n, s in self.adapters.served.items()} if self.adapters
                  else {self.default_model: self._single})
        #: one reference index per model that has one, opened once per process (see .search)
        self.references = References(SETTINGS.reference, served, self.default_model)
        log.info("serving %s: %d classes, %d genes", info.tag, len(self.predictor.classes), len(self.predictor.genes))

    def _add_or_skip(self, tag: str) -> None:
        """Serve one adapter of the store, or skip it with one line saying why: one broken adapter must not stop
        the others (it crash-looped the worker before)."""
        try:
            model = bentoml.models.get(tag)
            self.adapters.add(model.tag.name, model.path, str(model.tag))
        except (AdapterError, bentoml.exceptions.BentoMLException, ValueError, OSError) as e:
            log.warning("skipping adapter %s: %s", tag, str(e).splitlines()[0][:500] if str(e) else type(e).__name__)

    @property
    def predictor(self) -> CellTypePredictor:
        """The default model's predictor, as served now (an adapter can be replaced while serving)."""
        return self.adapters.served[self.default_model].predictor if self.adapters else self._single

    @property
    def metadata(self) -> dict[str, Any]:
        pred, spec = self.predictor, self.predictor.spec
        metrics = (self.adapters.served[self.default_model].info["metrics"] if self.adapters
                   else self.model_info.metadata.get("metrics", {}))
        return {
            "model_tag": (self.adapters.served[self.default_model].info["tag"] if self.adapters
                          else str(self.model_info.tag)),
            "classes": pred.classes,
            "class_ontology_terms": pred.class_terms,
            "n_genes": len(pred.genes),
            "latent_dim": pred.latent_dim,
            "preprocessing": pred.preprocessing.to_dict(),
            "gene_aliases": spec.gene_aliases,
            "finetune": spec.finetune,
            "base": spec.base,
            "base_is_pretrained": bool(spec.base.get("is_pretrained")),
            "training_metrics": metrics,
            "unknown": None if pred.calibration is None else {
                "temperature": pred.calibration.temperature,
                "confidence_threshold": pred.calibration.confidence_threshold,
                "novelty_threshold": pred.calibration.novelty_threshold},
            "references": self.references.summary(),
            "limits": {"max_genes_per_cell": SETTINGS.max_genes, "max_cells": SETTINGS.max_cells,
                       "max_body_bytes": SETTINGS.max_body_bytes},
        }

    # -- the served set: the same in every worker and across restarts ------------------------------------------
    async def on_inference_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Registry changes run on the inference thread, between forward passes."""
        return await asyncio.get_running_loop().run_in_executor(self.batcher.executor, fn, *args)

    def record_served_set(self) -> None:
        if self.served_file is not None:
            self.served_file.write([s.info["tag"] for s in self.adapters.served.values()])

    async def sync_served_set(self, force: bool = False) -> None:
        """Bring this worker's adapters in line with the recorded set, if another worker changed it. A request that
        arrives while a sync runs waits for it (else it would see the new record but not yet the new adapter)."""
        if self.served_file is None:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        if not (force or self._sync_lock.locked() or self.served_file.changed()):
            return
        async with self._sync_lock:
            mtime = self.served_file.mtime()
            if mtime is None or mtime == self.served_file.seen_mtime:
                return
            tags = self.served_file.read()
            if tags is not None:
                await self._apply_served_set(tags)
            self.served_file.seen_mtime = mtime

    async def _apply_served_set(self, tags: list[str]) -> None:
        wanted = {t.split(":")[0]: t for t in tags}
        for name in [n for n in self.adapters.served if n not in wanted and n != self.default_model]:
            await self.on_inference_thread(self.adapters.remove, name)
        for name, tag in wanted.items():
            current = self.adapters.served.get(name)
            if current is not None and current.info["tag"] == tag:
                continue
            try:
                model = bentoml.models.get(tag)
                served = await self.off_loop(self.adapters.build, model.tag.name, model.path, str(model.tag))
            except (AdapterError, bentoml.exceptions.BentoMLException, ValueError, OSError) as e:
                log.warning("skipping adapter %s: %s", tag, str(e).splitlines()[0][:500] if str(e) else e)
                continue
            await self.on_inference_thread(self.adapters.register, served)
        log.info("served set synchronised from %s: %s", self.served_file.path, sorted(self.adapters.served))

    async def infer(self, x: torch.Tensor, name: str | None) -> tuple[np.ndarray, np.ndarray, CellTypePredictor]:
        """(probabilities, embeddings, the predictor whose head computed them); 404 if the adapter was removed
        while the request waited."""
        try:
            return await self.batcher.run(x, name)
        except AdapterGone as e:
            raise NotFound(str(e.args[0]) if e.args else str(e)) from None

    def _adapter_forward(self, xs: list[torch.Tensor], names: list[str | None]) -> list:
        return self.adapters.forward(xs, [n or self.default_model for n in names])

    async def resolve(self, model: str | None) -> tuple[str, CellTypePredictor]:
        """The model a request names (or the default), or 404 with the names served."""
        await self.sync_served_set()
        name = model or self.default_model
        served = self.adapters.served if self.adapters else {self.default_model: None}
        if name not in served:
            raise NotFound(f"unknown model {name!r}; served: {sorted(served)}")
        return name, served[name].predictor if self.adapters else self._single

    def models(self) -> list[dict[str, Any]]:
        if self.adapters is None:
            return [{"name": self.default_model, "tag": self.metadata["model_tag"], "classes": self.predictor.classes,
                     "metrics": self.metadata["training_metrics"], "base": self.predictor.spec.base, "default": True}]
        return [{**info, "default": name == self.default_model} for name, info in sorted(self.adapters.info.items())]

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (parsing, validation, featurisation) in the featurisation pool, not on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    # -- featurisation: the shared alignment + preprocessing, with errors turned into 400s --------------------
    def featurize(self, X: sp.csr_matrix, genes: list[str], values: str,
                  where: str = "", pred: CellTypePredictor | None = None) -> tuple[torch.Tensor, GeneAlignment]:
        pred = pred or self.predictor
        try:
            alignment = pred.alignment(genes, min_overlap=1)
        except GeneAlignmentError as e:
            raise InvalidArgument(f"{where}{gene_error_message(e, len(genes))}") from None
        try:
            x = pred.featurize(X, alignment, input_is_log1p=values == "log1p")
        except InvalidExpressionError as e:
            raise InvalidArgument(f"{where}{e}") from None
        return x, alignment

    def _one_cell(self, expression: dict[str, float], values: str, where: str = "",
                  pred: CellTypePredictor | None = None) -> tuple[torch.Tensor, GeneAlignment]:
        X = sp.csr_matrix(np.asarray([list(expression.values())], dtype=np.float32))
        return self.featurize(X, list(expression), values, where, pred)

    def _predictions(self, probs: np.ndarray, z: np.ndarray, top_k: int, force_label: bool,
                     pred: CellTypePredictor | None = None) -> list[dict[str, Any]]:
        pred = pred or self.predictor
        status = pred.status(probs, z)
        answers, terms = pred.answer_with_terms(probs, status, force_label)
        return [{"cell_type": answer, **({"cell_type_ontology_term_id": term} if term else {}), "status": s,
                 **self._ranking(p, top_k, pred)} for p, s, answer, term in zip(probs, status, answers, terms)]

    def _ranking(self, probs: np.ndarray, top_k: int, pred: CellTypePredictor) -> dict[str, Any]:
        order = np.argsort(-probs)[:top_k]
        return {
            "best_guess": pred.classes[int(order[0])],
            "confidence": round(float(probs[order[0]]), 6),
            "top_k": [{"cell_type": pred.classes[int(i)], "probability": round(float(probs[i]), 6)} for i in order],
        }

    def _prepare_batch(self, cells: list | None, sparse: SparseCells | SparseArrays | None, values: str,
                       pred: CellTypePredictor | None = None) -> tuple[torch.Tensor, list[int]]:
        if cells is not None:
            expressions = [c.expression if hasattr(c, "expression") else c["expression"] for c in cells]
            together = self._cells_together(expressions, values, pred or self.predictor)
            if together is not None:
                return together
            parts = [self._one_cell(e, values, f"cell {i}: ", pred) for i, e in enumerate(expressions)]
            return torch.cat([p[0] for p in parts]), [p[1].n_overlap for p in parts]
        X, genes = sparse_matrix(sparse)
        x, alignment = self.featurize(X, genes, values, pred=pred)
        return x, [alignment.n_overlap] * X.shape[0]

    @staticmethod
    def _cells_together(expressions: list[dict[str, float]], values: str,
                        pred: CellTypePredictor) -> tuple[torch.Tensor, list[int]] | None:
        """The list form featurised in one pass over the union of the cells' genes, or None where that could differ
        from cell by cell (the per-cell path then answers, and names the cell of any error): the union's alignment
        holds for each cell unless it left an alias unused (``GeneAlignment.unused_aliases``), which a cell of its own
        might use. Normalisation is per row and its checks fail when any cell's would."""
        X, genes = cells_matrix(expressions)
        try:
            alignment = pred.alignment(genes, min_overlap=1)
        except GeneAlignmentError:
            return None
        if alignment.unused_aliases:
            return None
        if (np.diff(X.indptr) == 0).any():
            return None
        known = np.zeros(len(genes), dtype=np.int64)
        known[alignment.source_index] = 1
        used = np.add.reduceat(known[X.indices], X.indptr[:-1])  # each cell's genes the model knows
        if (used == 0).any():
            return None
        try:
            x = pred.featurize(X, alignment, input_is_log1p=values == "log1p")
        except InvalidExpressionError:
            return None
        return x, used.tolist()

    def batch_response(self, probs: np.ndarray, z: np.ndarray, top_k: int, used: list[int],
                       force_label: bool = False, pred: CellTypePredictor | None = None) -> dict:
        predictions = self._predictions(probs, z, top_k, force_label, pred)
        return {"predictions": [{**p, "genes_used": u} for p, u in zip(predictions, used)], "n_cells": len(used)}

    # -- endpoints -------------------------------------------------------------------------------------------
    @bentoml.api(input_spec=CellRequest, route="/predict")
    async def predict(self, expression: dict[str, float], values: str = "counts", top_k: int = 3,
                      force_label: bool = False, model: str | None = None, method: str = "head", k: int = 15) -> dict:
        """Predict the cell type of one cell ("unknown", with the best guess and the reason, when the model is not
        confident or has never seen the like of it; ``force_label`` always names a type). ``method="knn"``: the
        vote of the k nearest cells of the model's reference index."""
        name, pred = await self.resolve(model)
        if method == "knn":
            self.references.for_model(name, pred)
        x, alignment = await self.off_loop(self._one_cell, expression, values, "", pred)
        probs, z, pred = await self.infer(x, name)
        unknown = list(alignment.unknown_genes)
        answer = await self._answers(name, pred, probs, z, top_k, force_label, method, k)
        return {**answer[0], "genes_used": alignment.n_overlap,
                "genes_unknown": unknown[:100], "n_genes_unknown": len(unknown), "values": values}

    @bentoml.api(input_spec=BatchRequestInput, route="/predict_batch")
    async def predict_batch(self, cells: list | None = None, sparse: SparseCells | SparseArrays | None = None,
                            values: str = "counts", top_k: int = 3, force_label: bool = False,
                            model: str | None = None, method: str = "head", k: int = 15) -> dict:
        """Predict many cells: a list of expression dicts, or one CSR-like sparse block with a shared gene list."""
        if (cells is None) == (sparse is None):
            raise InvalidArgument("send exactly one of 'cells' (a list of {expression: {...}}) or 'sparse'")
        name, pred = await self.resolve(model)
        if method == "knn":
            self.references.for_model(name, pred)
        x, used = await self.off_loop(self._prepare_batch, cells, sparse, values, pred)
        probs, z, pred = await self.infer(x, name)
        if method != "knn":
            return self.batch_response(probs, z, top_k, used, force_label, pred)
        answers = await self._answers(name, pred, probs, z, top_k, force_label, method, k)
        return {"predictions": [{**a, "genes_used": u} for a, u in zip(answers, used)], "n_cells": len(used)}

    async def _answers(self, name: str, pred: CellTypePredictor, probs: np.ndarray, z: np.ndarray, top_k: int,
                       force_label: bool, method: str, k: int) -> list[dict[str, Any]]:
        """The head's answers, or with ``method="knn"`` those of the model's reference index."""
        if method != "knn":
            return self._predictions(probs, z, top_k, force_label, pred)
        index = self.references.for_model(name, pred)
        return await self.off_loop(knn_predictions, index, z, k, top_k, force_label)

    @bentoml.api(input_spec=EmbedRequest, route="/embed")
    async def embed(self, expression: dict[str, float], values: str = "counts", model: str | None = None) -> dict:
        """The cell's L2-normalised SCimilarity embedding (of the fine-tuned encoder)."""
        name, pred = await self.resolve(model)
        x, alignment = await self.off_loop(self._one_cell, expression, values, "", pred)
        _, emb, _ = await self.infer(x, name)
        return {"embedding": [round(float(v), 7) for v in emb[0]], "dim": int(emb.shape[1]),
                "genes_used": alignment.n_overlap}


SCimilarityLoRA.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_body_bytes, timeout_s=SETTINGS.body_timeout_s)
SCimilarityLoRA.add_asgi_middleware(ShortErrors)
SCimilarityLoRA.add_asgi_middleware(CompleteOpenAPI, model_tag=SETTINGS.model_tag)
