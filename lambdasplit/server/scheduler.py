"""The compute thread: every step of every session runs here, and concurrent decode steps share a pass.

    event loop ──submit(session, frame bytes)──▶ queue ──▶ compute thread
                                                             │ take what is queued (up to max_batch; up to 5 ms
                                                             │   more for sessions that are mid-decode)
                                                             │ decode frames, check each against its session
                                                             │ short steps (decode: 1 row; speculative verify:
                                                             │   a few rows) of cached sessions over the same
                                                             │   layers: ONE batched forward pass (batch.py)
                                                             │ anything else (prompts, no-cache sessions): alone
                                                             ▼ encode replies, resolve futures

Decoding on a CPU or a small GPU batch is bound by reading the weights; a batch of B sessions reads
them once instead of B times. One thread also means one OpenMP team (a second calling thread would
bring a second team that stalls on the same cores), and frames are decoded and encoded here too.

A step that waits on its device mid-step (PrivateLoRA: the server asks for the adapters of each adapted
projection) must not hold that thread while it waits: it runs on a thread of its own, which ends with
the step. Every thread's matrix work holds `compute_lock`, so one thread computes at a time and the two
never contend for the cores, and the waiting step lets go of it for each round trip to its device
(privatelora.Exchange), which has `exchange_timeout_s` to answer before the step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..models.batch import batched_forward, can_batch
from ..models.llm import Body
from ..util.threads import take_over
from ..wire.codecs import CodecError
from ..wire.frame import Frame, FrameError, Limits, decode_frame, encode_frame
from .metrics import Metrics
from .privatelora import ExchangeError, active
from .sessions import Session, StepError

log = logging.getLogger("lambdasplit.server")
BATCHED_ROWS = 16
"""Steps of at most this many rows share a batched pass: decode steps, and speculative verification
steps (the token and its drafts). Longer ones (prompts) run alone: a batch pads every row to its
longest step."""


class Lie:
    """TESTING ONLY (serve --dishonest): a server that perturbs what it answers, so that the client's
    cross-checking (client/verify.py) can be shown to catch it. From a session's step `after` on, each
    output row gets Gaussian noise of `scale` x its RMS (seeded: the same lies on every run)."""

    def __init__(self, scale: float, after: int = 0, seed: int = 0):
        if scale <= 0 or after < 0:
            raise ValueError(f"a lie needs a positive scale and a non-negative first step, got {scale}, {after}")
        self.scale, self.after = scale, after
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, out: torch.Tensor, step: int) -> torch.Tensor:
        if step < self.after:
            return out
        noise = torch.randn(out.shape, generator=self.generator).to(out.dtype)
        return out + self.scale * out.float().pow(2).mean(-1, keepdim=True).sqrt().to(out.dtype) * noise


@dataclass
class Job:
    session: Session
    data: bytes
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    frame: Frame | None = None
    arrived: float = field(default_factory=time.perf_counter)

    def resolve(self, result: bytes | BaseException) -> None:
        def set_result():
            if self.future.done():  # the client went away and the request was cancelled
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(set_result)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class Scheduler:
    """Runs steps on one thread; with max_batch > 1, batches concurrent decode steps."""

    def __init__(self, body: Body, hidden_size: int, dtype: torch.dtype, limits: Limits, metrics: Metrics,
                 max_batch: int = 16, window_s: float = 0.005, lie: Lie | None = None,
                 device: torch.device = torch.device("cpu"), exchange_timeout_s: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.body, self.hidden_size, self.dtype, self.limits = body, hidden_size, dtype, limits
        self.device = device  # frames move onto it before the body, and answers back to the CPU for encoding
        self.metrics, self.max_batch = metrics, max_batch
        self.lie = lie  # TESTING ONLY: a dishonest server's perturbation of its answers
        self.window_s = window_s if max_batch > 1 else 0.0
        self.recent: dict[str, float] = {}  # session id -> when its last step arrived here
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.exchange_timeout_s = exchange_timeout_s  # how long a step waits for its device's answer
        self.compute_lock = threading.Lock()  # matrix work: one thread at a time (the compute thread, or a
        # step that waits on its device, between its waits)
        self._graph_row_bytes: int | None = None  # what a training step's graph holds per row and layer
        self._measured = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lambdasplit-compute", daemon=True)
        self.thread.start()

    async def submit(self, session: Session, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        job = Job(session, data, loop, loop.create_future())
        self.queue.put(job)
        return await job.future

    def close(self) -> None:
        self.queue.put(None)

    # ---- the compute thread -------------------------------------------------------------------------
    def _run(self) -> None:
        take_over()  # the threads the main thread handed over before loading the body (util/threads.py)
        self._measure_graph()
        held: list[Job] = []  # jobs put back for the next round (a second step of a session already in a batch)
        while True:
            jobs = held or []
            if not jobs:
                first = self.queue.get()
                if first is None:
                    return
                jobs = [first]
            held = []
            # wait a moment for the steps of sessions that are decoding right now: their replies left
            # a moment ago and their next steps are on the way (without this, batches split in halves)
            now = time.monotonic()
            self.recent = {k: t for k, t in self.recent.items() if now - t < 1.0}
            expected = min(self.max_batch, max(len(self.recent), 1))
            deadline = now + self.window_s
            while len(jobs) < self.max_batch:
                try:
                    wait = deadline - time.monotonic() if len(jobs) < expected else 0
                    job = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)  # stop after this round
                    break
                jobs.append(job)
            for job in jobs:
                self.recent[job.session.id] = time.monotonic()
            batch, seen = [], set()
            for job in jobs:
                if job.session.id in seen:
                    held.append(job)  # steps of one session run in order, one per round
                    continue
                seen.add(job.session.id)
                try:
                    job.frame = decode_frame(job.data, self.limits, out_dtype=self.dtype, codec=job.session.up,
                                             width=self.hidden_size, max_positions=job.session.max_positions)
                except FrameError as exc:
                    job.resolve(exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the compute thread
                    log.exception("frame decoding failed")
                    job.resolve(StepError("malformed", f"the frame could not be decoded ({type(exc).__name__})"))
                    continue
                batch.append(job)
            for group in self._groups(batch):
                if group[0].session.lora is not None:  # it waits on its device mid-step: not on this thread
                    # a thread that ends with the step: the OpenMP workers torch starts for it go with it (while
                    # they exist, the compute thread's idle workers sleep rather than spin: its steps run slower)
                    threading.Thread(target=self._run_safely, args=(group,), name="lambdasplit-exchange",
                                     daemon=True).start()
                else:
                    self._run_safely(group)

    def _run_safely(self, group: list[Job]) -> None:
        try:
            self._run_group(group)
        except Exception as exc:  # noqa: BLE001 - a bug must cost these steps, never the thread
            log.exception("compute round failed")
            for job in group:
                job.resolve(StepError("internal", f"the step failed ({type(exc).__name__}: {exc})", 500))

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Short steps of cached sessions over the same layer range go together; the rest alone."""
        together: dict[tuple[int, int], list[Job]] = {}
        alone = []
        for job in jobs:
            s, t = job.session, job.frame.tensor
            if self.max_batch > 1 and s.use_cache and s.lora is None and job.frame.kind == "hidden" \
                    and t is not None and t.ndim == 2 and t.shape[0] <= BATCHED_ROWS \
                    and can_batch(self.body.layers, s.x, s.y):
                together.setdefault((s.x, s.y), []).append(job)
            else:
                alone.append([job])
        return [*together.values(), *alone]

    def _run_group(self, jobs: list[Job]) -> None:
        with contextlib.ExitStack() as locks:
            ready = []
            for job in sorted(jobs, key=lambda j: j.session.id):  # one lock order: no deadlock with the reaper
                locks.enter_context(job.session.lock)
                try:
                    if rolled := job.session.admit(job.frame, self.hidden_size):
                        self.metrics.inc("rollback_positions_total", rolled)
                except StepError as exc:
                    job.resolve(exc)
                    continue
                ready.append(job)
            if not ready:
                return
            with self.compute_lock:  # a waiting PrivateLoRA step lets go of it for each of its round trips
                self._compute(ready)

    def _compute(self, ready: list[Job]) -> None:
        """The forward pass of admitted steps, and their replies (the caller holds their locks and the compute lock)."""
        started = time.perf_counter()
        try:
            outs = [out.cpu() for out in self._forward(ready)]  # on a GPU, this waits for the result
        except ExchangeError as exc:  # the device failed its own step (a PrivateLoRA step runs alone)
            ready[0].session.fail(exc)  # closed: the layers before the exchange have moved its cache on
            ready[0].resolve(StepError(exc.code, f"{exc}; the session is closed (its step stopped halfway)",
                                       408 if exc.code == "exchange_timeout" else 400))
            return
        except Exception as exc:  # noqa: BLE001 - every cache in the pass is in doubt
            for job in ready:
                job.resolve(job.session.fail(exc))
            return
        seconds = time.perf_counter() - started
        self.metrics.observe("compute_seconds", seconds)
        self.metrics.observe("batch_size", len(ready))
        for job, out in zip(ready, outs):
            if self.lie is not None and job.frame.kind == "hidden":
                out = self.lie(out, job.session.step)
            reply = job.session.advance(job.frame, out, seconds)
            try:
                data = encode_frame(reply)
            except CodecError as exc:  # the cache has moved on without the client: the session cannot go on
                job.session.closed = True
                job.resolve(StepError("non_finite" if exc.code == "non_finite" else "internal",  # the body's own output
                                      f"the reply could not be encoded ({exc}); session closed", 500))
                continue
            self.metrics.observe("step_seconds", time.perf_counter() - job.arrived)
            job.resolve(data)

    def _forward(self, jobs: list[Job]) -> list[torch.Tensor]:
        # a PrivateLoRA session's step runs alone, with its adapters active (they ask the device mid-step)
        with active(jobs[0].session.lora if len(jobs) == 1 else None, self.compute_lock, self.exchange_timeout_s):
            if len(jobs) == 1 and jobs[0].session.train:
                return [self._train_step(jobs[0].session, jobs[0].frame)]
            return self._infer(jobs)

    def _train_step(self, s: Session, frame: Frame) -> torch.Tensor:
        """Split fine-tuning: a forward step keeps its graph; a gradient step runs it backwards and frees it.

        Only the gradient at the body's input is computed: the body's weights take no gradient and never
        change, and nothing of a step outlives its gradient (or the next forward step, or the session).
        """
        if frame.kind == "grad":
            inp, out = s.pending
            s.pending = None
            (grad,) = torch.autograd.grad(out, inp, frame.tensor.to(out.device, out.dtype).unsqueeze(0))
            return grad[0]
        s.pending = None
        with torch.enable_grad():
            inp = frame.tensor.to(self.device, self.dtype).unsqueeze(0).requires_grad_()
            out = self.body(inp, None, 0, s.x, s.y)
        s.pending = (inp, out)
        return out[0].detach()

    def graph_bytes_per_row(self, x: int, y: int) -> int:
        """What a training session's forward step over layers [x, y) holds per row until its gradient comes back:
        the tensors its graph saves (measured once, on one layer, at start), its input and its output, and a
        third more for the allocator's slack (measured: about 1.07 MB per row over 28 layers of SmolLM2 in RSS,
        0.81 MB of saved tensors)."""
        self._measured.wait(30.0)
        per_layer = self._graph_row_bytes or 16 * self.hidden_size * self.dtype.itemsize  # unmeasured: a guess
        ends = 2 * self.hidden_size * self.dtype.itemsize  # the step's input and output
        return (y - x) * per_layer * 4 // 3 + ends

    def _measure_graph(self) -> None:
        """The bytes one row of a training step keeps in one layer's graph: the tensors autograd saves for the
        gradient at the input, less the weights (16 rows against 32: the difference is per row)."""
        try:
            start = self.body.layers.start
            weights = {t.untyped_storage().data_ptr() for t in (*self.body.parameters(), *self.body.buffers())}
            sizes = []
            for rows in (16, 32):
                saved: dict[int, int] = {}

                def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
                    if t.untyped_storage().data_ptr() not in weights:
                        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                    return t

                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    inp = torch.zeros(1, rows, self.hidden_size, device=self.device, dtype=self.dtype)
                    self.body(inp.requires_grad_(), None, 0, start, start + 1)
                sizes.append(sum(saved.values()))
            self._graph_row_bytes = max(sizes[1] - sizes[0], 0) // 16
        except Exception:  # noqa: BLE001 - an empty or quantized body: no training sessions there anyway
            log.debug("no training graph measured", exc_info=True)
            self._graph_row_bytes = None
        finally:
            self._measured.set()

    @torch.inference_mode()
    def _infer(self, jobs: list[Job]) -> list[torch.Tensor]:
        if len(jobs) == 1:
            s, frame = jobs[0].session, jobs[0].frame
            pos = frame.pos if s.use_cache else 0
            return [self.body(frame.tensor.to(self.device, self.dtype).unsqueeze(0), s.cache, pos, s.x, s.y,
                              compiled=s.lora is None)[0]]
        s = jobs[0].session
        items = [(j.frame.tensor.to(self.device, self.dtype), j.session.cache, j.session.pos) for j in jobs]
        return batched_forward(self.body.layers, items, s.x, s.y)

