"""``crosssite serve``: a trained model as an HTTP service with a browser viewer (see `crosssite.serve`).

    crosssite serve MODEL [--host 127.0.0.1] [--port 8000] [--token T | $CROSSSITE_TOKEN]
                          [--site NAME | --adapt PATH...] [limits, batching, --cors-origin URL...]

MODEL is a crosssite model (stem, ``.safetensors``, ``.json`` or run folder; Grad-CAM available) or an
``.onnx`` export (fp32 or int8). ``--adapt PATH`` (repeatable) estimates AdaBN statistics once, at start-up,
on this hospital's slices, and scores every request with them. Needs the ``serve`` extra.
"""

from __future__ import annotations

import copy
import ipaddress
import socket
from pathlib import Path

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CrossSiteError

TOKEN_ENV = "CROSSSITE_TOKEN"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    model: Path | None = typer.Argument(None, help="Model file (stem, .safetensors, .json, run folder) or .onnx "
                                        "export (default: the shipped model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    token: str | None = typer.Option(None, "--token", envvar=TOKEN_ENV, show_envvar=True,
                                     help="Bearer token required by /v1 (prefer the environment variable)."),
    site: str | None = typer.Option(None, "--site", help="Normalise with this known site's statistics."),
    adapt: list[Path] = typer.Option([], "--adapt", help="AdaBN at start-up on these slices (files or folders)."),
    top_k: int = typer.Option(5, "--top-k", min=0, help="Slices averaged into a scan's score (0: all)."),
    max_upload_mb: float = typer.Option(512, "--max-upload-mb", help="Largest request body."),
    max_files: int = typer.Option(64, "--max-files", help="Most files in one request."),
    max_unzipped_mb: float = typer.Option(512, "--max-unzipped-mb", help="Largest decompressed zip archive (a "
                                          "600-slice 512 x 512 16-bit series is 315 MB)."),
    max_zip_entries: int = typer.Option(2048, "--max-zip-entries", help="Most members of one zip archive."),
    timeout: float = typer.Option(120, "--timeout", help="Seconds to receive and score one request (then 504)."),
    queue: int = typer.Option(32, "--queue", help="Requests admitted at once; more get 503 with Retry-After."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most slices in one forward pass."),
    batch_wait_ms: float = typer.Option(10, "--batch-wait-ms", help="How long a slice waits for others to join."),
    threads: int | None = typer.Option(None, "--threads", help="Threads of the forward pass (default: all CPUs)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow this browser origin (CORS; repeatable)."),
    header_timeout: float = typer.Option(10, "--header-timeout", help="Seconds a connection has to send a "
                                         "request's headers (then it is closed)."),
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, /docs, viewer at /."""
    try:
        import uvicorn  # noqa: F401  (the serve extra, checked before anything is loaded)

        from crosssite.serve.app import create_app
    except ImportError as e:
        raise fail(f"crosssite serve needs the serve extra ({e.name} is missing): pip install 'crosssite[serve]'") from None
    from crosssite.serve import Limits, Service
    from crosssite.serve.protocol import bind_socket, header_timeout_protocol

    _set_threads(threads)
    try:
        protocol = header_timeout_protocol(header_timeout)
        sock = bind_socket(host, port)  # before the model loads: a bad --host or a port in use fails at once
    except CrossSiteError as e:
        raise fail(e) from None
    try:
        limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_files=max_files,
                        max_unzipped_bytes=int(max_unzipped_mb * 2**20), max_zip_entries=max_zip_entries,
                        timeout_s=timeout, max_pending=queue)
        service = Service.from_file(model or _shipped(), site=site, adapt=adapt, limits=limits, top_k=top_k or None,
                                    max_batch=max_batch, max_wait_s=batch_wait_ms / 1e3)
    except CrossSiteError as e:
        sock.close()
        raise fail(e) from None
    if not token and not _is_loopback(host):
        typer.echo(f"warning: serving on {host} without a token: anyone who can reach this port can use the "
                   f"model; set {TOKEN_ENV} or --token", err=True)
    typer.echo(f"model {service.model_id} ({service.model_version}, {service.backend_name}, normalisation "
               f"{service.direct.norm}); viewer at http://{host}:{sock.getsockname()[1]}/", err=True)
    _run(create_app(service, token=token or None, cors_origins=cors_origin), sock, protocol)


def _shipped() -> Path:
    from crosssite.pretrained import shipped_model

    return shipped_model()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _run(application: object, sock: socket.socket, protocol: type) -> None:
    """uvicorn on the socket bound already, with the header deadline and the service's log lines."""
    import uvicorn

    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # uvicorn's, plus the service's own log lines
    log_config["loggers"]["crosssite.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config = uvicorn.Config(application, log_config=log_config, server_header=False, http=protocol,
                            timeout_keep_alive=5,
                            timeout_graceful_shutdown=5)  # then running requests are cancelled and their uploads removed
    uvicorn.Server(config).run(sockets=[sock])
