"""The HTTP application of `crosssite serve` (FastAPI): the API under ``/v1``, probes, and the viewer at ``/``.

    POST /v1/predict[?cam=true][&images=true]   multipart field ``files``: PNG / JPEG slices, DICOM files,
                                                zip archives (a DICOM series, ...), NIfTI volumes
    GET  /v1/model                              the model card: architecture, sites, preprocessing, metrics
    GET  /healthz, /readyz                      liveness (process up) and readiness (model loaded, worker up)
    GET  /docs, /openapi.json                   the OpenAPI page and schema
    GET  /                                      the viewer (static HTML + JS, no build step)

Secure by default: an optional bearer token (compared in constant time) guards ``/v1``; the token is checked
and a request slot taken *before* the body is read, so neither an unauthenticated client nor an overloaded
server receives uploads; a body over the size limit is refused from its Content-Length, or as soon as more
bytes arrive than the limit allows; receiving plus scoring is bounded by the request timeout (504); CORS is off
unless origins are given; responses carry ``Cache-Control: no-store``, ``nosniff`` and a strict Content
Security Policy (except the OpenAPI pages, whose Swagger UI comes from a CDN). A credential in the query string
is refused and blanked before the access log sees it. Logs hold counts and timings, never file names, pixels,
DICOM attributes or tokens.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import crosssite
from crosssite.errors import CrossSiteError
from crosssite.serve.service import NOTICE, Service, Upload

__all__ = ["STATIC", "create_app"]

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_DOC_PATHS = ("/docs", "/redoc", "/openapi.json")
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "description": "PNG/JPEG slices, DICOM files, zip archives, NIfTI volumes"}},
        }}},
    }
}


_CREDENTIAL = re.compile(rb"(?i)(^|&)((?:access_?)?token|api_?key|key|auth|authorization|bearer|password|secret)"
                         rb"=([^&]*)")


class NoCredentialsInURL:
    """ASGI middleware: a query string carrying a credential (``?token=...``, ``api_key``, ...) is refused (400),
    and its value is blanked in the request's scope first, so the access log (which prints the scope's query
    string after the response) never holds it. URLs end up in logs, proxies and browser history."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if not _CREDENTIAL.search(query):
            await self.app(scope, receive, send)
            return
        scope["query_string"] = _CREDENTIAL.sub(rb"\1\2=[redacted]", query)
        detail = "credentials in the URL are refused: send the token as the header 'Authorization: Bearer TOKEN'"
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for a request body above ``max_bytes``, from its Content-Length when it has one,
    else as soon as the bytes received pass the limit (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"upload larger than the server's limit of {max_bytes / 2**20:g} MiB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, limited, send)


def create_app(service: Service, *, token: str | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The application serving ``service``; ``token``: the bearer token ``/v1`` requires (None: no token)."""
    limits = service.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(service.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)

    app = FastAPI(title="crosssite serve", version=crosssite.__version__, lifespan=lifespan,
                  description=f"P(COVID) of chest-CT slices and scans. {NOTICE}")
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(NoCredentialsInURL)  # added last: runs first, before anything else sees the URL
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith(_DOC_PATHS):
            response.headers["Content-Security-Policy"] = CSP
        return response

    bearer = HTTPBearer(auto_error=False, description="the token given to `crosssite serve --token`")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, token.encode()):
            detail = "missing bearer token" if credentials is None else "wrong bearer token"
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

    _add_predict(app, service, authorised)
    _add_status(app, service, authorised)

    @app.get("/", include_in_schema=False)
    def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Slot:
    """Who gives an admitted request's queue slot back: the scoring thread if it starts, else the handler, never
    both -- a timeout can cancel the hand-over to the thread before the thread runs, and then only the handler
    knows the slot is still taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        """True for the first caller only."""
        with self._lock:
            taken, self._taken = self._taken, True
            return not taken


def _add_predict(app: FastAPI, service: Service, authorised: Callable[..., None]) -> None:
    """``POST /v1/predict``: admitted into the bounded queue, read within the timeout, scored in a thread."""
    limits = service.limits

    def score(uploads: list[Upload], cam: bool, images: bool, cancel: threading.Event, slot: _Slot) -> dict[str, Any]:
        if not slot.take():  # the request already ended (timed out before this thread started): no work
            return {}
        try:
            return service.predict(uploads, cam=cam, images=images, cancel=cancel)
        finally:
            service.release()

    @app.post("/v1/predict", dependencies=[Depends(authorised)], openapi_extra=_UPLOAD_SCHEMA)
    async def predict(request: Request, cam: bool = False, images: bool = False) -> dict[str, Any]:
        """P(COVID) and label per slice, score per scan, and errors per file. ``cam=true``: a Grad-CAM overlay
        per slice (PNG, base64; PyTorch model only); ``images=true``: each slice as the model sees it."""
        try:
            service.check(cam)
        except CrossSiteError as e:
            raise HTTPException(400, str(e)) from None
        if not service.try_admit():
            raise HTTPException(503, "server busy: too many requests waiting; retry later",
                                headers={"Retry-After": str(limits.retry_after_s)})
        slot = _Slot()
        cancel = threading.Event()  # set when this handler ends, however: a timed-out request's work stops too
        try:
            with anyio.fail_after(limits.timeout_s):
                form = await request.form(max_files=limits.max_files, max_fields=16)
                try:
                    uploads = [Upload(v.filename, v.file) for _, v in form.multi_items() if isinstance(v, UploadFile)]
                    if not uploads:
                        raise HTTPException(400, "no files uploaded: send slices, DICOM, zip or NIfTI files as "
                                                 "the multipart form field 'files'")
                    return await anyio.to_thread.run_sync(partial(score, uploads, cam, images, cancel, slot),
                                                          abandon_on_cancel=True)
                finally:
                    await form.close()
        except TimeoutError:
            raise HTTPException(504, f"request not done within the server's timeout of {limits.timeout_s:g} s") from None
        except CrossSiteError as e:
            raise HTTPException(400, str(e)) from None
        finally:
            cancel.set()
            if slot.take():  # no scoring thread took the slot over (a timeout may cancel it before it starts)
                service.release()


def _add_status(app: FastAPI, service: Service, authorised: Callable[..., None]) -> None:
    """``GET /v1/model``, ``/healthz`` and ``/readyz``."""
    limits = service.limits

    @app.get("/v1/model", dependencies=[Depends(authorised)])
    def model() -> dict[str, Any]:
        """The model card: id, version, architecture, sites, preprocessing, normalisation, validation metrics."""
        return service.model_info()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: the model is loaded and its worker runs (503 while starting or stopping); with the
        requests admitted now, the capacity, and the micro-batcher's counters."""
        ready = service.ready
        stats = service.batcher.stats
        body = {"status": "ready" if ready else "not ready", "pending": service.pending,
                "capacity": limits.max_pending, "forward_passes": stats.batches, "slices_scored": stats.images,
                "largest_batch": stats.largest, "merged_passes": stats.merged}
        return JSONResponse(body, status_code=200 if ready else 503)
