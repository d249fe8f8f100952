"""The DICOM node: a pynetdicom C-STORE SCP that scores each CT series it receives and sends the report back.

    node = DicomNode(pipeline, ae_title="CROSSSITE", port=11112, complete_after_s=5.0).start()
    ...
    node.stop()

Every storage SOP class is accepted, in every transfer syntax pynetdicom knows (compressed ones included, so a
PACS can forward what it holds as it holds it), and C-ECHO answers. A received instance goes to the pipeline
(`crosssite.pacs.pipeline`): an instance whose header cannot be decoded, or that lacks its UIDs, is refused with a
failure status (0xC000, "cannot understand") and named in the log; an instance the rules leave out (another
modality, a non-image object, a localizer) is answered with success, so the sending PACS's job does not fail, and
logged with the reason. A series counts as complete when no instance of it arrived for ``complete_after_s``
seconds; a worker thread then scores it and hands its reports to the outbox, so receiving never waits on scoring.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from crosssite.pacs.pipeline import REFUSED, Pipeline

__all__ = ["DicomNode", "STATUS_CANNOT_UNDERSTAND"]

log = logging.getLogger("crosssite.pacs")

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000


class DicomNode:
    """A C-STORE SCP feeding a `Pipeline`; see the module docstring.

    Args:
        pipeline: receives, scores and reports.
        ae_title: this node's AE title.
        host, port: where it listens (port 0: a free port, read back from ``port`` after `start`).
        complete_after_s: a series with no new instance for this long is complete.
    """

    def __init__(self, pipeline: Pipeline, ae_title: str = "CROSSSITE", host: str = "127.0.0.1", port: int = 11112,
                 complete_after_s: float = 5.0) -> None:
        self.pipeline = pipeline
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.complete_after_s = complete_after_s
        self.completed: queue.Queue = queue.Queue()  # SeriesReport of every scored series (for callers and tests)
        self._todo: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._pending: set[str] = set()  # series queued or being scored
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- network

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as e:  # pydicom could not decode the received data set
            uid = getattr(getattr(event, "request", None), "AffectedSOPInstanceUID", None) or "(unknown UID)"
            log.warning("instance %s refused: undecodable data set (%s)", uid, type(e).__name__)
            return STATUS_CANNOT_UNDERSTAND
        try:
            outcome = self.pipeline.accept(ds, f"instance {event.request.AffectedSOPInstanceUID}")
        except Exception as e:  # the node keeps serving whatever one instance holds
            log.exception("instance %s refused: %s", event.request.AffectedSOPInstanceUID, type(e).__name__)
            return STATUS_CANNOT_UNDERSTAND
        return STATUS_CANNOT_UNDERSTAND if outcome.category == REFUSED else STATUS_SUCCESS

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _ae(self) -> Any:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0  # no limit on what the peer sends at once
        return ae

    # ------------------------------------------------------------------------------------------- workers

    def _watch(self) -> None:
        """Queue every series that went quiet for ``complete_after_s``."""
        tick = min(0.2, self.complete_after_s / 4 or 0.05)
        while not self._stop.wait(tick):
            for uid in self.pipeline.idle_series(self.complete_after_s):
                with self._lock:
                    if uid in self._pending:
                        continue
                    self._pending.add(uid)
                self._todo.put(uid)

    def _work(self) -> None:
        while True:
            uid = self._todo.get()
            if uid is None:
                return
            try:
                self.completed.put(self.pipeline.complete(uid))
            except Exception as e:  # a series that cannot be scored is logged; the node keeps serving
                log.exception("series %s failed: %s", uid, type(e).__name__)
            finally:
                with self._lock:
                    self._pending.discard(uid)

    def start(self) -> DicomNode:
        """Listen (in background threads) and return self."""
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        self._server = self._ae().start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self.pipeline.outbox.start()
        for target, name in ((self._watch, "crosssite-series-watch"), (self._work, "crosssite-scoring")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("DICOM node %s listening on %s:%d; a series is complete after %.1f s without a new instance",
                 self.ae_title, self.host, self.port, self.complete_after_s)
        return self

    def stop(self) -> None:
        """Stop listening and the workers (a series being scored finishes first); the outbox keeps what waits."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._todo.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads.clear()
        self.pipeline.outbox.stop()

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
