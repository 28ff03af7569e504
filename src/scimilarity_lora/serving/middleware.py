"""ASGI middleware in front of every endpoint: the request body read whole, within a size cap and a deadline, before
any endpoint runs; JSON as the content type of the JSON endpoints; error bodies kept short.

Reading the body here, rather than inside BentoML's handler, is what turns an over-long chunked body into a 413
(not a 500 from deep inside the handler), a client that trickles bytes into a 408 (not a connection held open for
ever), and a duplicate JSON key into a 400 (Python's JSON parser silently keeps the last one).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.responses import JSONResponse

#: the endpoints whose bodies are JSON (the .npz route takes bytes)
JSON_ROUTES = frozenset({"/predict", "/predict_batch", "/embed", "/v1/search", "/v1/search_batch"})
#: JSON routes whose body reader checks duplicate keys itself, more cheaply (see .fast_json)
OWN_KEY_CHECK = frozenset({"/predict_batch"})
FORM_TYPES = (b"", b"application/x-www-form-urlencoded")
#: bodies above this are checked for duplicate keys off the event loop
_THREAD_CHECK_BYTES = 64 * 1024


async def _reply(send: Any, status: int, message: str) -> None:
    response = JSONResponse({"error": message}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def duplicate_key(body: bytes) -> str | None:
    """The first key that occurs twice in one JSON object of ``body`` (None if none, or if it is not JSON)."""
    try:
        json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        return str(e)
    except (ValueError, RecursionError):
        return None  # malformed JSON: the endpoint's own parser reports it
    return None


def duplicate_key_message(key: str) -> str:
    return f"duplicate JSON key {key!r}: each key may appear once"


class RequestGuard:
    """Reads a POST body completely (at most ``max_bytes``, within ``timeout_s``), checks its content type and,
    for JSON, duplicate keys; then hands the buffered body to the app."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _reply(send, 413, f"request body larger than {self.max_bytes} bytes")
        is_json_route = scope.get("path") in JSON_ROUTES
        if is_json_route:
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type in FORM_TYPES:  # curl -d without -H: read it as the JSON it is
                scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}
            elif content_type != b"application/json":
                return await _reply(send, 415, f"{scope['path']} takes application/json, not "
                                               f"{content_type.decode('latin-1')!r}")
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _reply(send, 408, f"request body not received within {self.timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _reply(send, 413, f"request body larger than {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        if is_json_route and body and scope.get("path") not in OWN_KEY_CHECK:
            check = duplicate_key(bytes(body)) if len(body) < _THREAD_CHECK_BYTES else \
                await asyncio.to_thread(duplicate_key, bytes(body))
            if check is not None:
                return await _reply(send, 400, duplicate_key_message(check))
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the real channel would

    return replay


class ShortErrors:
    """Error responses are one shape, ``{"error": ..., ["n_errors", "detail"]}``, small, and say only what the client
    needs: a list of validation errors keeps the first
    ``keep`` and a count (a 5 MB request of 10,000 bad cells no longer earns an 80 MB answer), and each keeps its
    location and message, not an echo of the input or links to the validator's internals."""

    def __init__(self, app: Any, max_bytes: int = 16_384, keep: int = 10) -> None:
        self.app, self.max_bytes, self.keep = app, max_bytes, keep

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def capped_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = self._shorten(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capped_send)

    def _shorten(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body[: self.max_bytes]
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
            return json.dumps(data[0]).encode()  # BentoML wraps endpoint errors in a one-element list: unwrap
        errors = data.get("detail") if isinstance(data, dict) else None
        if not isinstance(errors, list):
            return body if len(body) <= self.max_bytes else json.dumps({"error": str(data)[:2000]}).encode()
        detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} if isinstance(e, dict) else e
                  for e in errors[: self.keep]]
        first = ""
        if detail and isinstance(detail[0], dict):
            where = ".".join(str(part) for part in detail[0].get("loc", []))
            first = f"{where}: {detail[0].get('msg', '')}" if where else str(detail[0].get("msg", ""))
        return json.dumps({"error": f"{len(errors)} problem(s) in the request; first: {first}",
                           "n_errors": len(errors), "detail": detail}).encode()
