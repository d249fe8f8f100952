"""`crosssite serve` as its own process, as a hospital runs it: a timed-out zip of slow slices stops using the CPU
within 5 s (read from /proc), SIGTERM during an upload leaves no temporary files, a token in the URL is refused and
never written to the access log, a connection that never finishes its headers is closed, and a port in use or an
address that does not resolve is a one-line error before the model loads."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from test_serve import TOKEN, files, model_path  # noqa: F401  (module fixtures)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of proc(5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_zip(n: int = 400, side: int = 2048) -> bytes:
    """``n`` flat ``side`` x ``side`` PNG slices: a few MB that take seconds of CPU to decode."""
    png = io.BytesIO()
    Image.fromarray(np.full((side, side), 100, np.uint8)).save(png, format="PNG")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for i in range(n):
            z.writestr(f"series/s{i:04d}.png", png.getvalue())
    return buffer.getvalue()


class Server:
    """``crosssite serve`` in a subprocess, its output (uvicorn's access log on stdout included) collected."""

    def __init__(self, model: Path, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TMPDIR": str(tmp), "CROSSSITE_TOKEN": TOKEN}
        self.proc = subprocess.Popen([sys.executable, "-m", "crosssite", "serve", str(model), "--port",
                                      str(self.port), "--threads", "1", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    running = Server(model_path, tmp_path_factory.mktemp("tmp"), "--timeout", "1", "--header-timeout", "1")
    yield running
    running.stop()


def wait_for_log(server: Server, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log:
        assert time.monotonic() < deadline, f"{text!r} not in the server's output"
        time.sleep(0.05)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_timed_out_upload_stops_its_work_and_sigterm_leaves_no_files(model_path: Path, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "tmp").mkdir()
    server = Server(model_path, tmp_path / "tmp", "--timeout", "1")
    bomb = slow_zip()
    response = httpx.post(f"{server.url}/v1/predict", files=[("files", ("ct.zip", bomb))], headers=AUTH, timeout=60)
    assert response.status_code == 504 and "timeout of 1 s" in response.json()["detail"]
    timed_out = time.monotonic()
    idle = None
    while idle is None and time.monotonic() - timed_out < 5.0:
        before = cpu_seconds(server.proc.pid)
        time.sleep(0.5)
        if cpu_seconds(server.proc.pid) - before < 0.1:  # under 20% of one core over half a second
            idle = time.monotonic() - timed_out
    assert idle is not None, "the server still used the CPU 5 s after the request timed out"
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/readyz").json()["pending"]:  # its queue slot is given back
        assert time.monotonic() < deadline, "the timed-out request still holds its queue slot"
        time.sleep(0.05)

    # SIGTERM while another upload is being worked on: the process ends, its temporary folder with it
    posting = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/predict", headers=AUTH, timeout=60,
                                                         files=[("files", ("ct.zip", bomb))]), daemon=True)
    posting.start()
    deadline = time.monotonic() + 10
    while not list((tmp_path / "tmp").glob("crosssite-serve-*/crosssite-serve-*")):  # the request's folder
        assert time.monotonic() < deadline, "the upload never reached the server's temporary folder"
        time.sleep(0.02)
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal it caught
    assert "Application shutdown complete" in server.log
    assert list((tmp_path / "tmp").iterdir()) == []
    assert "Traceback" not in server.log


def test_token_in_the_url_is_refused_and_never_logged(server: Server) -> None:
    secret = "url-" + TOKEN
    for query in (f"token={secret}", f"x=1&access_token={secret}", f"api_key={secret}"):
        response = httpx.get(f"{server.url}/v1/model?{query}")
        assert response.status_code == 400 and "Authorization" in response.json()["detail"]
    assert httpx.get(f"{server.url}/v1/model?token={TOKEN}", headers=AUTH).status_code == 400
    assert httpx.get(f"{server.url}/v1/model", headers=AUTH).status_code == 200
    wait_for_log(server, "/v1/model?token=[redacted]")  # the requests were logged, without their value
    wait_for_log(server, "/v1/model?x=1&access_token=[redacted]")
    assert secret not in server.log and TOKEN not in server.log


def test_a_connection_that_never_finishes_its_headers_is_closed(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.settimeout(10)
        started = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the server, nothing answered
        assert time.monotonic() - started < 5
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # others are served as before


def test_port_in_use_or_unresolvable_host_fail_before_the_model_loads(server: Server, tmp_path: Path) -> None:
    missing_model = tmp_path / "no-such-model"  # loading it would fail: these errors come first
    cases = {f"cannot listen on 127.0.0.1:{server.port}: ": ["--port", str(server.port)],
             "--host no-such-host.invalid: cannot resolve": ["--host", "no-such-host.invalid"]}
    running = {message: subprocess.Popen([sys.executable, "-m", "crosssite", "serve", str(missing_model), *args],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for message, args in cases.items()}  # side by side: each is mostly Python start-up
    for message, proc in running.items():
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1 and stderr.startswith(f"error: {message}"), stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
