"""Concurrent queries answered together: one onnxruntime call for the images waiting, one faiss
call for every code waiting.

No timer: a worker takes whatever queued up while it was busy (up to `max_batch`), so a lone
query goes at once and batches grow only under load, where a full scan of the codes per query is
what saturates the CPU. Each job carries the version it started on; a batch that spans a swap
is answered per version. With several workers, a worker leaves a share of what waits to the
others that are idle, so they scan side by side (taking everything, one worker did all the
scanning while the rest slept). A batch's answers go back to the event loop in one
`call_soon_threadsafe` (one wake-up of the loop per batch, not per query).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from adalabelhash.codes import pack_codes
from adalabelhash.serving.index import Query

log = logging.getLogger("adalabelhash.serve")


@dataclass
class Job:
    model: object  # loader.ServedModel
    k: int
    rerank: int = 0
    pixels: np.ndarray | None = None  # (S, S, 3) uint8: an image query
    code: np.ndarray | None = None  # packed bits: an id query's stored code, an image query's once encoded
    real: np.ndarray | None = None  # an image query's tanh outputs, once encoded
    future: asyncio.Future | None = None  # on the submitting event loop
    outcome: tuple | BaseException | None = None  # the answer or the error, until delivered


class Batcher:
    def __init__(self, max_batch: int = 32, workers: int = 1, on_batch: Callable[[int], None] = lambda size: None):
        if max_batch < 1 or workers < 1:
            raise ValueError(f"--max-batch and --search-workers must be >= 1, got {max_batch} and {workers}")
        self.max_batch, self.on_batch = max_batch, on_batch
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._idle, self._idle_lock = 0, threading.Lock()  # workers waiting for a job
        self._threads = [threading.Thread(target=self._loop, name=f"search-{i}", daemon=True) for i in range(workers)]

    async def search(self, model, k: int, *, pixels: np.ndarray | None = None, code: np.ndarray | None = None,
                     rerank: int = 0) -> tuple:
        """Queue one query and wait for (Hamming distances, positions, asymmetric distances or None)."""
        job = Job(model, k, rerank, pixels, code, future=asyncio.get_running_loop().create_future())
        self._queue.put(job)
        return await job.future

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def run_once(self, block: bool = True) -> int:
        """Take what is queued (waiting for one job if `block`), answer it; the number of jobs, -1 on stop."""
        with self._idle_lock:
            self._idle += 1
        try:
            first = self._queue.get(block=block)
        except queue.Empty:
            return 0
        finally:
            with self._idle_lock:
                self._idle -= 1
                others_idle = self._idle
        if first is None:
            return -1
        jobs = [first]
        take = batch_share(1 + self._queue.qsize(), others_idle, self.max_batch)
        while len(jobs) < take:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: put it back for this loop's next turn
                self._queue.put(None)
                break
            jobs.append(job)
        self.on_batch(len(jobs))
        for model in {id(job.model): job.model for job in jobs}.values():
            self._answer([job for job in jobs if job.model is model])
        for loop in {id(job.future.get_loop()): job.future.get_loop() for job in jobs}.values():
            loop.call_soon_threadsafe(_deliver, [job for job in jobs if job.future.get_loop() is loop])
        return len(jobs)

    def _answer(self, jobs: list[Job]) -> None:
        try:
            model = jobs[0].model
            images = [job for job in jobs if job.pixels is not None]
            if images:
                real = model.encode(np.stack([job.pixels for job in images]))
                for job, job_real, code in zip(images, real, pack_codes(real)):
                    job.real, job.code = job_real, code
            answers = model.index.answer([Query(job.code, job.k, job.real, job.rerank) for job in jobs])
        except Exception as exc:  # answered as an error to these requests only; the worker goes on
            log.exception("a batch of %d queries failed", len(jobs))
            for job in jobs:
                job.outcome = exc
            return
        for job, found in zip(jobs, answers):
            job.outcome = found

    def _loop(self) -> None:
        while self.run_once() >= 0:
            pass


def batch_share(waiting: int, others_idle: int, max_batch: int) -> int:
    """How many of the `waiting` jobs one worker takes: an even share with the idle workers, at most `max_batch`."""
    return max(1, min(max_batch, -(-waiting // (1 + others_idle))))


def _deliver(jobs: list[Job]) -> None:
    """On the event loop: hand each job its outcome (a request that went away has no one to tell)."""
    for job in jobs:
        if job.future.done():
            continue
        if isinstance(job.outcome, BaseException):
            job.future.set_exception(job.outcome)
        else:
            job.future.set_result(job.outcome)
