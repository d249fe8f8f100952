"""Micro-batching: slices of concurrent requests go through the network in one forward pass.

Each request thread hands its model inputs to `MicroBatcher.submit` and blocks on the answer. One worker
thread owns the network: it takes the oldest waiting job, waits at most ``max_wait_s`` for more jobs to
arrive, and runs every job it collected (up to ``max_batch`` slices) as one batch. A job larger than what is
left of the batch waits for the next one, so a batch never exceeds ``max_batch`` unless a single job does.
A failure of the forward pass is raised in every request of that batch.

`BatchedBackend` puts a batcher behind the backend interface `Predictor` calls (``probabilities``), so the
request threads keep `Predictor`'s decoding, error rows and volume scores unchanged.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["BatchStats", "MicroBatcher", "BatchedBackend"]


_STOP = object()  # queued by `MicroBatcher.stop`


@dataclass
class _Job:
    images: torch.Tensor  # (B, 3, S, S)
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters of the forward passes run so far."""

    batches: int = 0
    images: int = 0
    largest: int = 0  # most slices in one forward pass
    merged: int = 0  # forward passes that served more than one job


class MicroBatcher:
    """Runs ``run`` ((N, 3, S, S) -> (N,) P(COVID)) on merged jobs in one worker thread; see the module docstring."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], max_batch: int = 32, max_wait_s: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | object] = queue.Queue()
        self._carry: _Job | object | None = None  # a job (or the stop marker) taken for the next batch
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.running:
            self._thread = threading.Thread(target=self._loop, name="crosssite-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then end the worker thread."""
        if self.running:
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self._thread = None
        leftover = [self._carry] if isinstance(self._carry, _Job) else []
        self._carry = None
        while not self._queue.empty():
            leftover.append(self._queue.get())
        for job in leftover:
            if isinstance(job, _Job):
                job.future.set_exception(RuntimeError("the micro-batcher stopped before this job ran"))

    def submit(self, images: torch.Tensor) -> np.ndarray:
        """P(COVID) of ``images`` (B, 3, S, S), computed in a batch with whatever else is waiting."""
        if not self.running:
            raise RuntimeError("the micro-batcher is not running")
        job = _Job(images)
        self._queue.put(job)
        return job.future.result()

    def _next_batch(self) -> list[_Job] | None:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        jobs, size = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _STOP or size + len(job.images) > self.max_batch:
                self._carry = job  # the stop marker, or a job for the next batch
                break
            jobs.append(job)
            size += len(job.images)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            images = torch.cat([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images
            try:
                p = np.asarray(self.run(images))
            except BaseException as e:  # noqa: BLE001  (handed to every waiting request)
                for j in jobs:
                    j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                j.future.set_result(p[start : start + len(j.images)])
                start += len(j.images)
            s = self.stats
            s.batches, s.images, s.largest = s.batches + 1, s.images + len(images), max(s.largest, len(images))
            s.merged += len(jobs) > 1


class BatchedBackend:
    """The backend interface of `Predictor` (``probabilities``), answered through a `MicroBatcher`; ``model``: the
    PyTorch network behind it (None for ONNX), which `Predictor` reads each request's out-of-distribution score
    from in the request's own thread."""

    def __init__(self, batcher: MicroBatcher, model: torch.nn.Module | None = None) -> None:
        self.batcher = batcher
        self.model = model

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return self.batcher.submit(images)
