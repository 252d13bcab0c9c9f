"""Continuous batching for the server: one thread owns the backend and steps it; HTTP handlers (on the asyncio
loop) submit requests and read their events from per-request asyncio queues.

Every `step` advances all running requests together, and a request that arrives while others run joins the batch
at the next step (its prompt is prefilled into free cache rows), so concurrent clients share forward passes.
Admission is bounded: beyond `max_batch` running samples plus `max_queue` waiting ones, `submit` refuses.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

from nanoseek.infer.engine import Backend, Request, TokenEvent


class QueueFull(Exception):
    """The server has more work than it accepts (the caller answers 429)."""


class WorkerDead(Exception):
    """The engine thread stopped after an error (the caller answers 503)."""


@dataclass(eq=False)  # identity hash: one stream is shared by the requests of a call
class _Stream:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    samples: int  # samples still running


class EngineWorker:
    def __init__(self, backend: Backend, max_queue: int = 64):
        self.backend, self.max_queue = backend, max_queue
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[str, _Stream] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.cancelled = 0  # requests stopped because their client went away
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(None)
        self.thread.join(timeout=10)

    @property
    def load(self) -> int:
        """Samples submitted and not finished (running or waiting)."""
        with self.lock:
            return sum(s.samples for s in set(self.streams.values()))

    def submit(self, requests: list[Request]) -> asyncio.Queue:
        """Queue the requests of one HTTP call (from the event loop). Their TokenEvents arrive on the returned
        queue as they happen, then None when all are finished (or an exception if one failed)."""
        if self.error is not None or not self.thread.is_alive():
            raise WorkerDead(f"the engine stopped: {self.error!r}")
        samples = sum(r.params.n for r in requests)
        with self.lock:
            load = sum(s.samples for s in set(self.streams.values()))
            if load + samples > self.backend.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {load} samples running or queued (limit "
                                f"{self.backend.max_batch + self.max_queue}); retry later")
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), samples)
            for r in requests:
                self.streams[r.id] = stream
        for r in requests:
            self.inbox.put(("add", r))
        return stream.events

    def cancel(self, requests: list[Request]) -> None:
        """Stop the requests of a client that went away."""
        for r in requests:
            with self.lock:
                known = self.streams.pop(r.id, None) is not None
            if known:
                self.cancelled += 1
                self.inbox.put(("abort", r.id))

    def _deliver(self, request_id: str, item: TokenEvent | BaseException | None) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, item)

    def _finished(self, request_id: str) -> None:
        """One sample of a request ended; close the stream when it was its call's last."""
        with self.lock:
            stream = self.streams.get(request_id)
            if stream is None:
                return
            stream.samples -= 1
            if stream.samples == 0:
                for rid in [k for k, v in self.streams.items() if v is stream]:
                    del self.streams[rid]
                stream.loop.call_soon_threadsafe(stream.events.put_nowait, None)

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._drain(block=not self.backend.has_work())
                if not self.backend.has_work():
                    continue
                for ev in self.backend.step():
                    self._deliver(ev.request_id, ev)
                    if ev.finish_reason is not None:
                        self._finished(ev.request_id)
        except BaseException as e:  # a bug or out-of-memory: fail every open request, then report unhealthy
            self.error = e
            with self.lock:
                for stream in set(self.streams.values()):
                    stream.loop.call_soon_threadsafe(stream.events.put_nowait, e)
                self.streams.clear()

    def _drain(self, block: bool) -> None:
        """Move queued submissions/cancellations into the backend (waiting for one when idle)."""
        while True:
            try:
                item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            kind, payload = item
            if kind == "add":
                if payload.id not in self.streams:
                    continue  # cancelled before it started
                try:
                    self.backend.add_request(payload)
                except ValueError as e:  # the backend refused it: the handler answers 400
                    with self.lock:
                        stream = self.streams.pop(payload.id, None)
                    if stream is not None:
                        stream.loop.call_soon_threadsafe(stream.events.put_nowait, e)
            else:
                self.backend.abort(payload)
