"""Where a result goes: a DICOM peer (C-STORE), a DICOMweb server (STOW-RS), or a folder (``--dry-run``), through
an outbox on disk that keeps every result until it is delivered.

`Outbox.submit` writes the SR into the outbox folder first (atomically) and tries to send it once at once; a
failed send stays on disk and a background thread retries it with exponential back-off (`RETRY_DELAYS_S`, then
every `MAX_DELAY_S`) until it succeeds. An outbox left by an earlier run (a node stopped while its peer was down)
is sent when the next one starts. A file is removed only after the peer confirmed it (C-STORE status 0x0000, a
STOW-RS answer without failure).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from crosssite.errors import CrossSiteError
from crosssite.ioutil import atomic_write, ensure_dir

__all__ = ["SendError", "Sender", "CStoreSender", "StowSender", "FolderSender", "Outbox", "parse_peer",
           "RETRY_DELAYS_S", "MAX_DELAY_S", "save_dataset"]

log = logging.getLogger("crosssite.pacs")

RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
MAX_DELAY_S = 60.0


class SendError(CrossSiteError):
    """A result that could not be delivered (peer down, refused, answered with a failure status)."""


class Sender(Protocol):
    """Delivers one DICOM dataset; raises `SendError` when the peer did not take it."""

    description: str

    def send(self, ds: Any) -> None: ...


def save_dataset(path: Path, ds: Any, what: str = "DICOM file") -> Path:
    """Write ``ds`` as a DICOM file (with its file meta information) atomically."""

    def write(tmp: str) -> None:
        ds.save_as(tmp, enforce_file_format=True)

    return atomic_write(path, write, what)


def parse_peer(text: str) -> tuple[str, int, str]:
    """``HOST:PORT:AET`` -> (host, port, AE title)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2] or len(parts[2]) > 16:
        raise CrossSiteError(f"--send-to {text!r}: expected HOST:PORT:AET (an AE title of at most 16 characters)")
    return parts[0], int(parts[1]), parts[2]


class CStoreSender:
    """C-STORE to a DICOM peer (a PACS such as Orthanc), one association per dataset."""

    def __init__(self, host: str, port: int, ae_title: str, calling_ae_title: str = "CROSSSITE",
                 timeout_s: float = 30.0) -> None:
        self.host, self.port, self.ae_title = host, port, ae_title
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s
        self.description = f"C-STORE {ae_title}@{host}:{port}"

    def send(self, ds: Any) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise SendError(f"{self.description}: association not established (peer down or refused)")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            shown = "no answer" if code is None else f"status 0x{code:04X}"
            raise SendError(f"{self.description}: C-STORE failed ({shown})")


class StowSender:
    """STOW-RS to a DICOMweb server (dicomweb-client)."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.client = client
        self.description = f"STOW-RS {url}"

    def send(self, ds: Any) -> None:
        from dicomweb_client.api import DICOMwebClient

        try:
            client = self.client or DICOMwebClient(url=self.url)
            answer = client.store_instances(datasets=[ds])
        except Exception as e:  # requests' connection errors, HTTP errors: all mean "not delivered"
            raise SendError(f"{self.description}: {' '.join(str(e).split())[:300]}") from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise SendError(f"{self.description}: the server refused the instance ({len(failed)} failed)")


class FolderSender:
    """``--dry-run``: the SR written to ``folder/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` instead of sent."""

    def __init__(self, folder: Path) -> None:
        self.folder = ensure_dir(folder, "the --dry-run folder")
        self.description = f"dry run: {self.folder}"

    def send(self, ds: Any) -> None:
        save_dataset(self.folder / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm", ds, "the dry-run SR")


@dataclass
class _Pending:
    path: Path
    attempts: int = 0
    due: float = 0.0


class Outbox:
    """Results waiting for delivery, on disk; see the module docstring.

    Args:
        folder: where results wait (created; files left there by an earlier run are sent first).
        sender: the destination.
        clock: monotonic seconds (for tests).
    """

    def __init__(self, folder: Path, sender: Sender, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = ensure_dir(folder, "the outbox folder")
        self.sender = sender
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[Path, _Pending] = {p: _Pending(p) for p in sorted(self.folder.glob("*.dcm"))}
        if self._pending:
            log.info("outbox: %d result(s) left by an earlier run, sending them", len(self._pending))

    def pending(self) -> list[Path]:
        with self._lock:
            return sorted(self._pending)

    def submit(self, ds: Any) -> str:
        """Keep ``ds`` in the outbox and try to deliver it once; return ``"sent"`` or ``"queued (reason)"``."""
        path = save_dataset(self.folder / f"{ds.SOPInstanceUID}.dcm", ds, "the outbox copy of a result")
        entry = _Pending(path, due=float("inf"))  # the retry thread leaves it alone until this first try fails
        with self._lock:
            self._pending[path] = entry
        return self._attempt(entry, ds)

    def _delay(self, attempts: int) -> float:
        return RETRY_DELAYS_S[attempts - 1] if attempts <= len(RETRY_DELAYS_S) else MAX_DELAY_S

    def _attempt(self, entry: _Pending, ds: Any = None) -> str:
        import pydicom

        entry.attempts += 1
        try:
            self.sender.send(ds if ds is not None else pydicom.dcmread(entry.path))
        except Exception as e:  # a failed send of any kind keeps the result for a retry
            reason = e if isinstance(e, SendError) else f"{type(e).__name__}: {e}"
            delay = self._delay(entry.attempts)
            entry.due = self.clock() + delay
            log.warning("outbox: %s not delivered (attempt %d: %s); kept in %s, next try in %.0f s",
                        entry.path.name, entry.attempts, " ".join(str(reason).split()), self.folder, delay)
            self._wake.set()
            return f"queued ({' '.join(str(reason).split())})"
        with self._lock:
            self._pending.pop(entry.path, None)
        entry.path.unlink(missing_ok=True)
        if entry.attempts > 1:
            log.info("outbox: %s delivered to %s after %d attempts", entry.path.name, self.sender.description,
                     entry.attempts)
        return "sent"

    def retry_due(self) -> int:
        """Try every result whose back-off has passed; return how many were delivered."""
        now = self.clock()
        with self._lock:
            due = [e for e in self._pending.values() if e.due <= now]
        return sum(self._attempt(e) == "sent" for e in due)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.retry_due()
            with self._lock:
                waits = [e.due - self.clock() for e in self._pending.values()]
            self._wake.clear()
            self._wake.wait(timeout=max(0.05, min([1.0, *waits])))

    def start(self) -> Outbox:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="crosssite-outbox", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
