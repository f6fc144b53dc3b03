"""Micro-batching: crops from concurrent callers run through the network in one call.

A server answering several clients at once otherwise runs the network once per
request, one after the other, each call at batch 1.  :class:`MicroBatcher` takes
the crops each caller submits and runs what has queued as one batch on a single
worker thread (at most ``max_batch`` crops), handing each caller back exactly its
own rows.  Crops that arrive while a batch runs form the next one.  A caller
that will submit soon (a request still decoding its image) can say so
(:meth:`MicroBatcher.expecting`); the worker then waits for it, up to
``max_wait_s``, so requests that arrive within a few milliseconds run together.
Nobody announced, nobody waits: a lone client pays no latency for batching.  :class:`BatchingBackend` puts it behind the
:class:`~staralign.inference.detector.Backend` interface, so a
:class:`~staralign.inference.detector.LandmarkDetector` built on it does its face
detection and cropping in the calling thread, as always, and only the network
call is shared::

    shared = BatchingBackend(detector.backend, max_batch=8)
    view = LandmarkDetector(shared, detector=LockedFaceDetector(detector.face_detector))
    faces = view.detect(image)          # from any number of threads at once

Guarantees, each tested:

* Rows go back to the caller that sent them, in its order (no cross-talk).
* Only one backend call runs at a time (the backends need not be thread-safe).
* Bounded: at most ``max_queue`` crops wait; past that :meth:`MicroBatcher.submit`
  raises :class:`BatchQueueFull` at once instead of queueing without end.
* A failing call fails only the caller that caused it: a merged batch that raises
  is retried caller by caller, so each gets its own result or its own exception.
* Calls with different keys (e.g. with and without ambiguity) never share a batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BatchQueueFull", "BatchingBackend", "LockedFaceDetector", "MicroBatcher"]

# A batch function: (rows stacked along axis 0, key) -> a tuple of arrays (or None) with one row per input row.
BatchFn = Callable[[np.ndarray, Hashable], tuple[Any, ...]]


IDLE_EXIT_S = 2.0  # the worker thread ends after this long without work


class BatchQueueFull(RuntimeError):
    """More crops are waiting than the batcher's ``max_queue``: the caller should refuse (busy), not wait."""


@dataclass(eq=False)  # compared by identity: rows are arrays
class _Job:
    rows: np.ndarray
    key: Hashable
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Merges the row batches of concurrent :meth:`submit` calls into single ``fn`` calls.

    ``fn(stacked_rows, key)`` returns a tuple of outputs, each an array with one row per
    input row (or None).  ``max_batch``: most rows a call gets (a single submission
    larger than that still runs whole, alone).  ``max_wait_s``: how long the worker,
    once it has a submission, waits for callers announced with :meth:`expecting`.
    ``max_queue``: most rows waiting.
    """

    def __init__(self, fn: BatchFn, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 64,
                 name: str = "staralign-batcher") -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.fn, self.max_batch, self.max_wait_s, self.max_queue = fn, int(max_batch), float(max_wait_s), int(max_queue)
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._coming = 0  # callers inside expecting() that have not submitted yet
        self._local = threading.local()
        self.calls = 0  # backend calls made (for tests and benchmarks)
        self.rows = 0  # rows run
        self.name = name
        # The worker starts with the first submission and ends after IDLE_EXIT_S without
        # work, so an idle server (or a test that builds many apps) holds no threads.
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ callers

    def submit(self, rows: np.ndarray, key: Hashable = None) -> Future:
        """Queue ``rows`` (N, ...) for a batched call; the future's result is ``fn``'s outputs for these rows."""
        rows = np.asarray(rows)
        job = _Job(rows, key)
        if len(rows) == 0:
            job.future.set_exception(ValueError("no rows submitted"))
            return job.future
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._queued_rows and self._queued_rows + len(rows) > self.max_queue:
                raise BatchQueueFull(f"{self._queued_rows} crops are already waiting for the network "
                                     f"(limit {self.max_queue})")
            if getattr(self._local, "coming", False):  # an announced caller has arrived
                self._local.coming = False
                self._coming -= 1
            self._queue.append(job)
            self._queued_rows += len(rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return job.future

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce that this thread will :meth:`submit` within the block (it may also not).

        Until it does (or leaves the block), a batch that could take its rows waits for
        it, at most ``max_wait_s``.  Use it around the work that precedes a submission:
        decoding an image, finding its faces.
        """
        if getattr(self._local, "coming", False):  # already announced: nested use counts once
            yield
            return
        with self._cond:
            self._coming += 1
            self._local.coming = True
        try:
            yield
        finally:
            with self._cond:
                if self._local.coming:
                    self._local.coming = False
                    self._coming -= 1
                self._cond.notify_all()

    def run(self, rows: np.ndarray, key: Hashable = None) -> tuple[Any, ...]:
        """:meth:`submit` and wait for the result (re-raises the call's exception)."""
        return self.submit(rows, key).result()

    def close(self) -> None:
        """Stop the worker after the queued work is done; later submissions raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and threading.current_thread() is not thread:
            thread.join()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the worker

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job and the jobs with its key that fit, after waiting up to max_wait_s."""
        with self._cond:
            while not self._queue:
                if self._closed or not self._cond.wait(IDLE_EXIT_S) and not self._queue:
                    self._thread = None  # under the lock: the next submit starts a new worker
                    return None
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed and self._coming > 0:  # wait only for callers on their way
                if self._fitting_rows() >= self.max_batch:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            first = self._queue[0]
            taken, count = [], 0
            for job in list(self._queue):
                if job.key != first.key:
                    continue
                if taken and count + len(job.rows) > self.max_batch:
                    break
                taken.append(job)
                count += len(job.rows)
            for job in taken:
                self._queue.remove(job)
            self._queued_rows -= count
            return taken

    def _fitting_rows(self) -> int:
        key = self._queue[0].key
        return sum(len(j.rows) for j in self._queue if j.key == key)

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)

    def _call(self, rows: np.ndarray, key: Hashable) -> tuple[Any, ...]:
        self.calls += 1
        self.rows += len(rows)
        out = self.fn(rows, key)
        for o in out:
            if o is not None and len(o) != len(rows):
                raise RuntimeError(f"the batch function returned {len(o)} rows for {len(rows)}")
        return out

    def _run(self, jobs: list[_Job]) -> None:
        if len(jobs) == 1:
            job = jobs[0]
            try:
                job.future.set_result(self._call(job.rows, job.key))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
                job.future.set_exception(exc)
            return
        try:
            out = self._call(np.concatenate([j.rows for j in jobs]), jobs[0].key)
        except BaseException:  # noqa: BLE001 - find the caller whose rows fail: each alone
            for job in jobs:
                self._run([job])
            return
        start = 0
        for job in jobs:
            end = start + len(job.rows)
            job.future.set_result(tuple(None if o is None else o[start:end] for o in out))
            start = end


class BatchingBackend:
    """A :class:`~staralign.inference.detector.Backend` whose :meth:`run` shares calls between threads.

    Everything but ``run`` is the wrapped backend's.  Calls asking for ambiguity and
    calls not asking for it (and calls with different further options) are batched
    separately (the key), so each gets what a direct call would give.
    """

    def __init__(self, backend: Any, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 64) -> None:
        self.inner = backend

        def call(rows: np.ndarray, key: Hashable) -> tuple[Any, ...]:
            ambiguity, options = key  # type: ignore[misc]
            return tuple(backend.run(rows, ambiguity, **dict(options)))

        self.batcher = MicroBatcher(call, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue)

    def __getattr__(self, name: str) -> Any:  # name, definition, input_size, device, conversions, ...
        if name in ("inner", "batcher"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, batch: np.ndarray, ambiguity: bool = True, **options: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """The wrapped backend's ``run``, shared with concurrent callers asking the same (``ambiguity``
        and any further keyword options, which must be hashable, go into the batch key)."""
        landmarks, cov = self.batcher.run(np.asarray(batch), (bool(ambiguity), tuple(sorted(options.items()))))
        return landmarks, cov

    def close(self) -> None:
        self.batcher.close()


class LockedFaceDetector:
    """A face detector called by one thread at a time (OpenCV, dlib and MediaPipe detectors keep state).

    Keeps the wrapped detector's ``framing`` and ``name``, so boxes are framed and
    reported exactly as the detector's own.
    """

    def __init__(self, detector: Any) -> None:
        self.inner = detector
        self.lock = threading.Lock()
        self.name = getattr(detector, "name", type(detector).__name__)
        framing = getattr(detector, "framing", None)
        if framing is not None:
            self.framing = framing

    def __call__(self, image: np.ndarray) -> list:
        with self.lock:
            return self.inner(image)
