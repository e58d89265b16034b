"""Requests that arrive close together run as one per-sample batch, each picture with its own mix.

The seeds name batching different adapters in one forward pass as LoRA's open limitation; a mix per
sample (mixing.Mixer, per_sample mode) solves it inside one call, and a server is where it pays: the
page's and the A1111 API's requests wait up to `window_ms` for company sharing their size, steps,
sampler and guidance, and up to `max_batch` pictures then run as one pass (generate.generate_items).
A lone request runs as generate() runs it (its pixels are `sdlora generate`'s). A shared pass with different
mixes runs grouped (mixing.py): each picture's rows are computed as its mix alone computes them (its fused
weights, or the base and its unfused delta), and the layers whose products would round by batch size run
row by row (sdlora/batch_invariance.py), so every picture gets exactly its lone pixels, whatever shares its
pass (tests/test_grouped_pass.py, tests/test_a1111_api.py).

One worker thread runs the passes one after another: the models are shared, and a pass already uses
every core.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .errors import SdloraError
from .generate import Generated, GenerateSettings, Item, generate_items


class QueueFull(SdloraError):
    """More requests wait than the server queues (an HTTP face answers 503)."""


def batch_key(settings: GenerateSettings, items: list[Item]) -> tuple:
    """What pictures of one pass must share. Whether a negative prompt is given is part of it: SDXL zeroes
    the unconditional embedding when none is, which one pass cannot do for some pictures only."""
    s = settings
    return (s.width, s.height, s.steps, s.scheduler, s.guidance, s.guidance_rescale, any(i.negative for i in items))


@dataclass
class _Job:
    settings: GenerateSettings
    items: list[Item]
    key: tuple
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Generated] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class Progress:
    """What A1111's /sdapi/v1/progress reports: the running pass and how many requests wait."""

    job: str = ""
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False

    def fraction(self) -> float:
        return self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0


class Batcher:
    def __init__(self, base, window_ms: float = 50.0, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or window_ms < 0:
            raise SdloraError(f"max batch {max_batch} and window {window_ms} ms", "use a batch of 1 or more and a "
                              "window of 0 ms or more")
        self.base, self.window, self.max_batch, self.max_queue = base, window_ms / 1000.0, max_batch, max_queue
        self._pending: list[_Job] = []
        self._cond = threading.Condition()
        self._interrupt = threading.Event()
        self.progress = Progress()
        self.passes: list[int] = []  # pictures per pass run so far (the tests read it)
        self.last_pass_steps = 0  # denoising steps the last pass ran (fewer than asked when interrupted)
        self._thread = threading.Thread(target=self._work, name="sdlora-batcher", daemon=True)
        self._thread.start()

    def submit(self, settings: GenerateSettings, items: list[Item]) -> list[Generated]:
        """Block until the pictures of `items` are made (in a pass with whatever else arrived in the window)."""
        job = _Job(settings, list(items), batch_key(settings, items), time.monotonic())
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting, the most this server queues",
                                "try again shortly")
            self._pending.append(job)
            self.progress.job_count = len(self._pending)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results

    def interrupt(self) -> None:
        """Stop the running pass after its current step; its pictures come back as they are (as A1111's)."""
        self._interrupt.set()
        self.progress.interrupted = True

    def _take(self) -> list[_Job]:
        """The next pass: the oldest job, and the later ones sharing its key that still fit, once the oldest has
        waited its window or enough pictures are there to fill a pass. Called with the lock held."""
        while True:
            while not self._pending:
                self._cond.wait()
            first = self._pending[0]
            same = [j for j in self._pending if j.key == first.key]
            left = first.arrived + self.window - time.monotonic()
            if left <= 0 or sum(len(j.items) for j in same) >= self.max_batch:
                break
            self._cond.wait(timeout=left)
        taken, count = [], 0
        for job in same:
            if taken and count + len(job.items) > self.max_batch:
                continue
            taken.append(job)
            count += len(job.items)
        for job in taken:
            self._pending.remove(job)
        self.progress.job_count = len(self._pending) + len(taken)
        return taken

    def _work(self) -> None:
        while True:
            with self._cond:
                jobs = self._take()
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        settings = jobs[0].settings
        self._interrupt.clear()
        p = self.progress
        p.job, p.sampling_step, p.sampling_steps, p.started, p.interrupted = (
            f"{len(items)} pictures for {len(jobs)} requests", 0, settings.steps, time.time(), False)

        def on_step():
            p.sampling_step += 1

        try:
            # A job larger than a pass runs in several (pictures are batch-independent, so nothing changes).
            results: list[Generated] = []
            for start in range(0, len(items), self.max_batch):
                chunk = items[start : start + self.max_batch]
                p.sampling_step = 0
                results += generate_items(self.base, settings, chunk, on_step=on_step,
                                          should_stop=self._interrupt.is_set)
                self.passes.append(len(chunk))
            at = 0
            for job in jobs:
                job.results, at = results[at : at + len(job.items)], at + len(job.items)
        except BaseException as err:  # every waiting request hears of it; the worker lives on
            for job in jobs:
                job.error = err
        finally:
            with self._cond:
                self.last_pass_steps = p.sampling_step
                p.job, p.sampling_step, p.sampling_steps = "", 0, 0
                p.job_count = len(self._pending)
            for job in jobs:
                job.done.set()
