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

import torch

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
