"""Orthanc, the open-source PACS, connected to crosssite: the configuration that routes CT series to the node, and
a local Orthanc process (for tests, benchmarks and trying the node out).

`orthanc_config` writes what docs/SERVING.md ("Connect to your PACS") explains: crosssite's node registered in
``DicomModalities``, the DICOMweb plugin, and a Lua script that sends every stable CT series to the node once
(``OnStableSeries``: the series received nothing for ``StableAge`` seconds). The SR the node sends back is stored
in the same study; it is not CT, so it is not routed again.

`OrthancProcess` starts ``Orthanc CONFIG.json`` (Debian packages ``orthanc`` and ``orthanc-dicomweb``) on free
loopback ports with such a configuration in a folder of its own, waits until its REST API answers, and stops it
by its process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from crosssite.errors import CrossSiteError

__all__ = ["ORTHANC_BINARY", "DICOMWEB_PLUGIN", "find_orthanc", "free_port", "orthanc_config", "OrthancProcess",
           "ROUTE_CT_LUA"]

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")

ROUTE_CT_LUA = """\
-- Route each stable CT series to crosssite's node (once); everything else stays in Orthanc.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    RestApiPost('/modalities/{modality}/store',
                DumpJson({{Resources = {{seriesId}}, Asynchronous = true}}, true))
  end
end
"""


def find_orthanc() -> tuple[str, Path] | None:
    """(the Orthanc binary, the DICOMweb plugin) when both are installed, else None."""
    binary = shutil.which(ORTHANC_BINARY) or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)
    plugin = next((Path(d) / DICOMWEB_PLUGIN for d in PLUGIN_DIRS if (Path(d) / DICOMWEB_PLUGIN).is_file()), None)
    return (binary, plugin) if binary and plugin else None


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(folder: Path, *, http_port: int, dicom_port: int, node: tuple[str, str, int] | None,
                   plugin: Path | None, aet: str = "ORTHANC", modality: str = "crosssite",
                   stable_age_s: int = 2) -> Path:
    """Write an Orthanc configuration (and its Lua routing script) into ``folder``; return the configuration file.

    ``node`` is crosssite's node as (AE title, host, port); None leaves routing out.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "Name": "crosssite-orthanc",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,  # REST on loopback only
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "StableAge": stable_age_s,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "DicomScuTimeout": 30,
        "HttpTimeout": 30,
        "Plugins": [] if plugin is None else [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "DicomModalities": {},
        "LuaScripts": [],
    }
    if node is not None:
        node_aet, host, port = node
        config["DicomModalities"][modality] = [node_aet, host, port]
        lua = folder / "route-ct-to-crosssite.lua"
        lua.write_text(ROUTE_CT_LUA.format(modality=modality))
        config["LuaScripts"] = [str(lua)]
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class OrthancProcess:
    """A local Orthanc with a generated configuration; see the module docstring.

    Args:
        folder: its configuration, database and log go here.
        node: crosssite's node as (AE title, host, port), routed CT series go there; None: no routing.
        stable_age_s: Orthanc's ``StableAge`` (seconds without a new instance before a series is routed).
    """

    def __init__(self, folder: Path, node: tuple[str, str, int] | None = None, stable_age_s: int = 2) -> None:
        found = find_orthanc()
        if found is None:
            raise CrossSiteError("Orthanc and its DICOMweb plugin are not installed "
                                 "(apt-get install orthanc orthanc-dicomweb)")
        self.binary, plugin = found
        self.folder = Path(folder)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.aet = "ORTHANC"
        self.config = orthanc_config(self.folder, http_port=self.http_port, dicom_port=self.dicom_port, node=node,
                                     plugin=plugin, aet=self.aet, stable_age_s=stable_age_s)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.log = self.folder / "orthanc.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> OrthancProcess:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.folder, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CrossSiteError(f"Orthanc exited with status {self.process.returncode} at start; see {self.log}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise CrossSiteError(f"Orthanc did not answer on {self.url} within {timeout_s:g} s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ REST

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={} if body is None else {"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return json.loads(self._request("POST", path, json.dumps(payload).encode()))

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through REST (``POST /instances``)."""
        return json.loads(self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        """Orthanc ids of the resources at ``level`` (Study, Series, Instance) matching the DICOM ``query``."""
        return self.post("/tools/find", {"Level": level, "Query": query})
