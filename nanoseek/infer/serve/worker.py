"""Continuous batching for the server: one thread owns the backend and steps it; HTTP handlers (on the asyncio
loop) submit requests and read their events from per-request asyncio queues.

Every `step` advances all running requests together, and a request that arrives while others run joins the batch
at the next step (its prompt is prefilled into free cache rows), so concurrent clients share forward passes.
Admission is bounded: beyond `max_batch` running samples plus `max_queue` waiting ones, `submit` refuses.

Faults stay with the requests they hit: a sample that fails inside the engine (an error event) fails its HTTP
call, and a step that raises fails the calls whose requests the engine held; the thread goes on serving the rest.
Only when the engine cannot even drop those requests does the thread stop (`error`; /health answers 503).
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


class GenerationFailed(Exception):
    """A request failed inside the engine (the caller answers 500 for that request only)."""


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
        queue as they happen, then None when all are finished, or instead an exception: ValueError when the
        engine refused a request, GenerationFailed when one failed while running."""
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

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        """End the calls of these requests with `error` and drop all of their requests from the engine.

        After a failed step the engine may hold a row it cannot batch (dropping another then raises as the batch
        is rebuilt), so every drop is tried; the engine is sound again if it then holds nothing or no drop
        failed, and otherwise cannot be trusted: the first failure propagates and the thread stops."""
        with self.lock:
            streams = {self.streams[rid] for rid in request_ids if rid in self.streams}
            dropped = [rid for rid, stream in self.streams.items() if stream in streams]
            for rid in dropped:
                del self.streams[rid]
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, error)
        failures = []
        for rid in dropped:
            try:
                self.backend.abort(rid)
            except Exception as e:
                failures.append(e)
        if failures and self.backend.has_work():
            raise failures[0]

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._drain(block=not self.backend.has_work())
                if not self.backend.has_work():
                    continue
                with self.lock:
                    held = list(self.streams)  # every request drained into the engine, running or waiting there
                try:
                    events = self.backend.step()
                except Exception as e:  # a bug or out-of-memory in a batched step: its requests fail, not the server
                    self._fail(held, GenerationFailed(f"{type(e).__name__}: {e}"))
                    continue
                for ev in events:
                    if ev.error is not None:
                        self._fail([ev.request_id], GenerationFailed(ev.error))
                        continue
                    self._deliver(ev.request_id, ev)
                    if ev.finish_reason is not None:
                        self._finished(ev.request_id)
        except BaseException as e:  # the engine cannot even drop its requests: fail them all, report unhealthy
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
