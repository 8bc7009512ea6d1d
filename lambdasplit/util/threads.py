"""torch's CPU threads when the compute runs on a thread of its own, not on the main thread.

GNU OpenMP, the runtime of torch's CPU build, keeps a team of worker threads for each thread that starts
a parallel region. Once more threads are in teams than the machine has cores, its idle workers stop
spinning between regions and sleep, and a decode step, hundreds of small parallel regions, then pays a
wake-up for each. Measured on a 2-core machine (2026-12-06): layers 1..29 of SmolLM2 took 57-60 ms per
token on a compute thread after the main thread had loaded the model with 2 threads, and 28-31 ms when
the main thread had kept to one.

Servers and the web app load their models on the main thread and compute on a thread of their own:
they call `hand_over()` before loading anything, and the compute thread calls `take_over()` first.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_threads: int | None = None


def hand_over() -> int:
    """Keep the calling (main) thread to one torch thread, saving the count the compute thread will use."""
    global _threads
    if _threads is None:
        _threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return _threads


def take_over() -> None:
    """On a compute thread: use the threads the main thread handed over (a no-op if it did not)."""
    if _threads is not None:
        torch.set_num_threads(_threads)


def on_compute_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread of its own that takes the handed-over threads, as a compute thread does; its result,
    or its exception raised here. For compiling (models/compiled.py): a compiled graph is guarded on torch's
    thread count, so a graph compiled on the one-thread main thread would compile again on the compute
    thread's first step. The thread takes its OpenMP team with it when it ends."""
    result: dict = {}

    def run() -> None:
        take_over()
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="lambdasplit-compile")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
