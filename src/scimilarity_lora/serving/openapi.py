"""The OpenAPI schema at /docs.json, completed: BentoML documents its own endpoints with bare response objects,
error bodies that are not ours, no examples and none of the mounted /v1 routes. The service rewrites the document
on its way out (:class:`CompleteOpenAPI`) so that generated clients and API fuzzers see the real contract."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from scimilarity_lora.serving.schemas import (BatchResponse, EmbedResponse, ErrorResponse, PredictResponse,
                                             SearchBatchRequest, SearchBatchResponse, SearchRequest, SearchResponse)

#: the seed's curl example, shown as the /predict example
PREDICT_EXAMPLE = {"expression": {"CD3D": 1.2, "GNLY": 0.1, "MS4A1": 3.4, "CD14": 0.0}}
RESPONSES = {"/predict": PredictResponse, "/predict_batch": BatchResponse, "/embed": EmbedResponse}
ERRORS = {
    "400": "invalid request: the message names the field or the cell",
    "404": "the request names a model this service does not serve (the message lists the served ones), or asks "
           "for kNN / search of a model without a reference index",
    "409": "the served model is not the encoder its reference index was built with (the message names both)",
    "408": "the request body did not arrive within the body timeout",
    "413": "the request body is larger than the cap",
    "415": "not application/json (the JSON endpoints); a missing or form content type is read as JSON",
}


def _package_version() -> str:
    try:
        return version("scimilarity-lora")
    except PackageNotFoundError:
        return "0+unknown"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_responses(codes: tuple[str, ...]) -> dict:
    return {code: {"description": ERRORS[code], "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
            for code in codes}


def _drop_property_names(node: Any) -> Any:
    """OpenAPI 3.0 has no ``propertyNames`` (tools ignore it): say it in the description instead."""
    if isinstance(node, dict):
        names = node.pop("propertyNames", None)
        if names is not None:
            rule = f"keys: gene symbols of {names.get('minLength', 1)} to {names.get('maxLength', '?')} characters"
            node["description"] = f"{node.get('description', '')} ({rule})".strip()
        for value in node.values():
            _drop_property_names(value)
    elif isinstance(node, list):
        for value in node:
            _drop_property_names(value)
    return node


def complete_spec(spec: dict, model_tag: str | None = None) -> dict:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (PredictResponse, BatchResponse, EmbedResponse, ErrorResponse, SearchRequest, SearchBatchRequest,
                  SearchResponse, SearchBatchResponse):
        document = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(document.pop("$defs", {}))
        schemas[model.__name__] = document
    paths = spec.setdefault("paths", {})
    for route, model in RESPONSES.items():
        post = paths.get(route, {}).get("post")
        if post is None:
            continue
        responses = {code: r for code, r in post.get("responses", {}).items() if not str(code).startswith("4")}
        responses["200"] = {"description": "the answer", "content": {"application/json": {"schema": _ref(model.__name__)}}}
        responses.update(_error_responses(("400", "404", "408", "409", "413", "415")))
        post["responses"] = responses
    predict_body = paths.get("/predict", {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in predict_body:
        predict_body["application/json"]["example"] = PREDICT_EXAMPLE
    paths["/v1/predict_batch_npz"] = {"post": {
        "description": "Batch prediction from an .npz (np.savez) body with arrays genes (str), indptr, indices, data "
                       "and optional scalars values ('counts' | 'log1p'), top_k, force_label. Read with "
                       "allow_pickle=False; declared sizes are checked before decompressing.",
        "operationId": "predict_batch_npz",
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "the answer", "content": {"application/json": {
            "schema": _ref("BatchResponse")}}}, **_error_responses(("400", "408", "413"))}}}
    for route, request, response, what in (
            ("/v1/search", SearchRequest, SearchResponse, "one cell"),
            ("/v1/search_batch", SearchBatchRequest, SearchBatchResponse, "each of many cells")):
        paths[route] = {"post": {
            "description": f"Cell search: the k reference cells nearest to {what} in the embedding of the model that "
                           "built the model's reference index (SCIMILARITY_LORA_REFERENCE), nearest first, with their "
                           "labels and the obs columns the index keeps.",
            "operationId": route.strip("/").replace("/", "_"),
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request.__name__)}}},
            "responses": {"200": {"description": "the neighbours", "content": {"application/json": {
                "schema": _ref(response.__name__)}}}, **_error_responses(("400", "404", "408", "409", "413", "415"))}}}
    paths["/v1/metadata"] = {"get": {
        "description": "The served model: tag, classes, genes, preprocessing, fine-tuning, calibration, limits.",
        "operationId": "metadata",
        "responses": {"200": {"description": "model metadata", "content": {"application/json": {
            "schema": {"type": "object"}}}}}}}
    info = spec.setdefault("info", {})
    info["version"] = _package_version() + (f" (model {model_tag})" if model_tag else "")
    return _drop_property_names(spec)


class CompleteOpenAPI:
    """Rewrites GET /docs.json with :func:`complete_spec`."""

    def __init__(self, app: Any, model_tag: str | None = None) -> None:
        self.app, self.model_tag = app, model_tag

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/docs.json":
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                body = json.dumps(complete_spec(json.loads(body), self.model_tag)).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
