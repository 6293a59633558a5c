"""The HTTP API (FastAPI). Every error is JSON `{"error": "..."}` with a 4xx/5xx status.

  GET  /health            200 {"model_version", "bits", "codes", "process"} once a version is loaded, else 503
  POST /search?k=&rerank= multipart field `image` -> {"model_version", "results": [{"id", "label",
                          "path", "distance"(, "rerank_distance")}, ...]}, nearest first
  GET  /search/{id}?k=    the same with database item `id` (manifest row id) as the query
  GET  /metrics           Prometheus text
  POST /webhook           MLflow registry webhook (HMAC-signed): re-read the alias now

Ties: items at equal distance in ascending id (adalabelhash/serving/index.py). Searches that
arrive together are answered together (adalabelhash/serving/batcher.py). With
`rerank=N` the top N by Hamming distance are reordered by the asymmetric distance of the
query's real-valued code (image queries only). A request takes the served version once, when
it starts, and finishes on it even if a swap happens meanwhile.
Auth: with a token set, every endpoint but /health and /webhook (which is signed instead)
needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import time
from dataclasses import dataclass

import orjson
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import Response

from adalabelhash.errors import UserError
from adalabelhash.serving.batcher import Batcher
from adalabelhash.serving.loader import Follower, ServedModel

WEBHOOK_MAX_AGE_SECONDS = 300  # replay window for signed deliveries
# Up to this many pixels an upload is decoded on the event loop: well under 0.1 ms, while the hop
# to a thread and back costs ~0.2 ms of CPU (benchmarks/serve/README.md).
INLINE_DECODE_PIXELS = 128 * 128


@dataclass(frozen=True)
class ApiSettings:
    max_upload_bytes: int = 10 * 2**20
    max_k: int = 1000
    max_rerank: int = 10000
    token: str | None = None  # bearer token; None: open
    webhook_secret: str | None = None  # None: /webhook is off (404)
    wake_siblings: bool = False  # one of several worker processes: a webhook wakes the others (SIGWINCH) too


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(follower: Follower, settings: ApiSettings, batcher: Batcher | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    registry = CollectorRegistry()
    requests_total = Counter("adalabelhash_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("adalabelhash_request_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    loaded = Gauge("adalabelhash_model_version", "registered version being served (0: none)", registry=registry)
    codes = Gauge("adalabelhash_database_codes", "codes in the served database", registry=registry)
    swaps = Counter("adalabelhash_swaps", "versions swapped in", registry=registry)
    load_failures = Counter("adalabelhash_load_failures", "versions that failed to load", registry=registry)
    batch_sizes = Histogram("adalabelhash_batch_size", "queries answered by one search call", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64))
    batcher = batcher or Batcher()
    batcher.on_batch = batch_sizes.observe

    def on_event(kind: str, detail: dict) -> None:
        if kind == "swapped":
            swaps.inc()
            model = follower.current
            loaded.set(float(model.version))
            codes.set(len(model.database))
        elif kind == "load_failed":
            load_failures.inc()

    follower.on_event = on_event

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        follower.start()
        if settings.wake_siblings:  # a sibling process that received the webhook says the alias moved
            import signal

            asyncio.get_running_loop().add_signal_handler(signal.SIGWINCH, follower.wake)
        yield
        await run_in_threadpool(follower.stop)
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="adalabelhash retrieval", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg')}")

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # never a bare 500 page
        return error(500, f"internal error: {exc.__class__.__name__}")

    plain_routes = {}  # endpoint -> path of the routes added without FastAPI's machinery (below)
    app.add_middleware(GuardAndMeasure, token=settings.token, requests_total=requests_total, latency=latency,
                       plain_routes=plain_routes)

    def serving() -> ServedModel:
        model = follower.current
        if model is None:
            raise ApiError(503, f"no version of {follower.name}@{follower.alias} loaded yet")
        return model

    def check_k(k: int, rerank: int = 0) -> None:
        if not 1 <= k <= settings.max_k:
            raise ApiError(422, f"k must be in 1..{settings.max_k}, got {k}")
        if not 0 <= rerank <= settings.max_rerank:
            raise ApiError(422, f"rerank must be in 0..{settings.max_rerank}, got {rerank}")

    @app.get("/health")
    def health():
        model = follower.current
        if model is None:
            return error(503, f"no version of {follower.name}@{follower.alias} loaded yet")
        return {"model_version": model.version, "bits": model.database.bits, "codes": len(model.database),
                "process": os.getpid()}  # which worker answered, with --processes

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # The two search routes are plain Starlette routes: FastAPI's parameter machinery costs 0.075-0.09 ms
    # of CPU per request (benchmarks/serve/http_floor.py), a fifth of what the service spends on one.
    async def search_id(request: Request):
        model = serving()
        item_id, k = int_param(request.path_params, "item_id"), int_param(request.query_params, "k", 10)
        check_k(k)
        position = model.position(item_id)
        if position is None:
            raise ApiError(404, f"id {item_id} is not in the database of v{model.version}")
        found = await batcher.search(model, k, code=model.database.codes[position])
        return answer(model, *found)

    async def search_image(request: Request):
        model = serving()  # this request's version, whatever happens to `current` meanwhile
        k, rerank = int_param(request.query_params, "k", 10), int_param(request.query_params, "rerank", 0)
        check_k(k, rerank)
        image = await read_upload(request, settings.max_upload_bytes)
        if header_pixels(image) <= INLINE_DECODE_PIXELS:
            pixels = decode_upload(image, model.image_size)
        else:  # in the threadpool: a large decode would stall every other request; decoders run in parallel
            pixels = await run_in_threadpool(decode_upload, image, model.image_size)
        found = await batcher.search(model, k, pixels=pixels, rerank=rerank)
        return answer(model, *found)

    for path, endpoint, method in (("/search/{item_id}", search_id, "GET"), ("/search", search_image, "POST")):
        app.add_route(path, endpoint, methods=[method])
        plain_routes[endpoint] = path

    @app.post("/webhook")
    async def webhook(request: Request):
        if not settings.webhook_secret:
            raise ApiError(404, "webhook not enabled (set ADALABELHASH_WEBHOOK_SECRET)")
        body = await request.body()
        verify_signature(settings.webhook_secret, request.headers, body)
        try:
            event = json.loads(body)
            data = event.get("data") or {}
        except (ValueError, AttributeError):
            raise ApiError(400, "webhook body is not a JSON object") from None
        if event.get("entity") == "model_version_alias" and data.get("name") == follower.name:
            follower.wake()  # the follower reads the alias itself: the payload only says when
            if settings.wake_siblings:
                wake_sibling_processes()
        return {"received": f"{event.get('entity')}.{event.get('action')}"}

    return app


class GuardAndMeasure:
    """Plain ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware): the bearer token check,
    then request counts and latency per route template (FastAPI names its own routes in the scope,
    the plain ones are looked up by endpoint)."""

    OPEN_PATHS = ("/health", "/webhook")

    def __init__(self, app, token, requests_total, latency, plain_routes):
        self.app, self.token, self.requests_total, self.latency = app, token, requests_total, latency
        self.plain_routes = plain_routes
        self.expected = f"Bearer {token}".encode() if token else b""
        self._metric_children = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        if self.token and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                from fastapi.responses import JSONResponse

                self.requests_total.labels("unauthorized", 401).inc()
                response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else self.plain_routes.get(scope.get("endpoint"), "other")
            counter, latency = self._children(endpoint, status[0])
            counter.inc()
            latency.observe(time.perf_counter() - started)

    def _children(self, endpoint: str, status: int):
        """The (counter, histogram) of one endpoint and status, looked up once (labels() takes a lock)."""
        key = (endpoint, status)
        if key not in self._metric_children:
            self._metric_children[key] = (self.requests_total.labels(endpoint, status), self.latency.labels(endpoint))
        return self._metric_children[key]


async def read_upload(request, limit: int) -> bytes:
    """The `image` field of a multipart body, refusing anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise ApiError(413, f"upload of {int(declared):,} bytes is over the limit of {limit:,}")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the image as multipart/form-data field 'image'")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit + 64 * 1024:  # room for the multipart framing
            raise ApiError(413, f"upload is over the limit of {limit:,} bytes")
    request._body = bytes(body)  # Starlette's form parser reads the cached body
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # malformed multipart
        raise ApiError(400, f"malformed multipart body: {str(exc)[:200]}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "multipart field 'image' (a file) is missing")
    data = await upload.read()
    if len(data) > limit:
        raise ApiError(413, f"image of {len(data):,} bytes is over the limit of {limit:,}")
    return data


def int_param(params, name: str, default: int | None = None) -> int:
    """An integer path or query parameter; 422 naming it when it is not one."""
    value = params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(422, f"{name}: must be an integer, got {value[:40]!r}") from None


def header_pixels(data: bytes) -> int:
    """Width x height from the image header, without decoding; 0 if there is no readable header
    (decode_upload then names the problem, as cheaply)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - PIL raises several types for a bad header
        return 0


def decode_upload(data: bytes, image_size: int):
    from adalabelhash.data.images import decode_rgb
    from adalabelhash.preprocess import fit_image

    try:
        return fit_image(decode_rgb(data, "upload"), image_size)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None


def answer(model: ServedModel, distances, positions, rerank_distances=None):
    """The JSON answer, serialised by orjson (the plain types are built here: no encoder pass)."""
    database = model.database
    labels, paths = database.labels, database.paths
    results = [{"id": i, "label": labels[p], "path": paths[p], "distance": d}  # plain ints: one gather, no numpy scalars
               for i, p, d in zip(database.ids[positions].tolist(), positions.tolist(), distances.tolist())]
    if rerank_distances is not None:
        for result, value in zip(results, rerank_distances):
            result["rerank_distance"] = round(float(value), 4)
    return Response(orjson.dumps({"model_version": model.version, "results": results}), media_type="application/json")


def wake_sibling_processes() -> None:
    """SIGWINCH to the other worker processes of this service (children of the same uvicorn
    supervisor). Its default action is to ignore it, so a sibling still starting (handler not yet
    installed) is not killed: it loads the current version anyway. Where the siblings cannot be
    listed, they follow at their next poll."""
    import signal

    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            siblings = [int(pid) for pid in f.read().split() if int(pid) != os.getpid()]
    except OSError:
        return
    for pid in siblings:
        try:
            os.kill(pid, signal.SIGWINCH)
        except OSError:
            pass


def verify_signature(secret: str, headers, body: bytes) -> None:
    """MLflow's scheme: X-MLflow-Signature = "v1," + base64(HMAC-SHA256(secret,
    "<delivery id>.<timestamp>.<body>")), timestamp in seconds, within the replay window."""
    delivery, stamp = headers.get("x-mlflow-delivery-id", ""), headers.get("x-mlflow-timestamp", "")
    signature = headers.get("x-mlflow-signature", "")
    if not (delivery and stamp.isdigit() and signature.startswith("v1,")):
        raise ApiError(401, "webhook delivery without MLflow signature headers")
    if abs(time.time() - int(stamp)) > WEBHOOK_MAX_AGE_SECONDS:
        raise ApiError(401, "webhook delivery too old (replay window)")
    expected = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256).digest()
    if not hmac.compare_digest(base64.b64encode(expected).decode(), signature[3:]):
        raise ApiError(401, "webhook signature does not match")
