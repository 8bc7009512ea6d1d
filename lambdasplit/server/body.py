"""The LLM body a server holds (BodyRuntime), and what the routes of its app share (BodyContext)."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil

from ..models.device import resolve_device
from ..models.formats import choose_format, parse_format
from ..models.kvcache import kv_bytes_per_position, kv_cache_bytes
from ..models.llm import load_split
from ..models.source import model_name
from ..util.threads import on_compute_thread
from ..wire.lowrank import Basis
from .context import ServerContext, ServerSettings
from .privatelora import install as install_private_lora
from .scheduler import Lie, Scheduler
from .sessions import SessionStore

log = logging.getLogger("lambdasplit.server")


class BodyRuntime:
    """One body (layers [x, y) of one model), and the facts a session must match."""

    def __init__(self, folder: Path, x: int, y: int, weights: str | None = None, basis: str | Path | None = None,
                 device: str = "auto"):
        self.device = resolve_device(device)
        self.weights = choose_format(weights, self.device)
        self.model = load_split(folder, x, y, parts=("body",), weights=self.weights, device=self.device)
        self.dtype_name = str(self.model.dtype).removeprefix("torch.")
        self.model.body.requires_grad_(False)  # training sessions take gradients at the input only
        install_private_lora(self.model.body.layers)  # plain layers until a PrivateLoRA session's step runs
        self.split = self.model.split
        self.name = model_name(folder)
        self.basis = Basis.load(basis) if basis else None
        if self.basis is not None and self.basis.hidden_size != self.model.hidden_size:
            raise ValueError(f"basis {basis} is for hidden size {self.basis.hidden_size}, the model has "
                             f"{self.model.hidden_size}")
        self._fingerprints: dict[tuple[int, int], str] = {}

    def kv_bytes_per_position(self, x: int, y: int) -> int:
        """KV-cache bytes one position takes in layers [x, y) while every layer still holds it."""
        return (y - x) * kv_bytes_per_position(self.model.config, self.model.dtype.itemsize)

    def kv_bytes(self, x: int, y: int, positions: int) -> int:
        """KV-cache bytes layers [x, y) hold after `positions` positions (a sliding layer: at most its window)."""
        return kv_cache_bytes(self.model.config, self.model.dtype.itemsize, x, y, positions)

    def compile(self) -> float:
        """Compile the body's single-position step now (models/compiled.py); the seconds it took. On a thread
        with the compute thread's torch threads (util/threads.py: on_compute_thread), as the graph is guarded
        on their count."""
        return on_compute_thread(self.model.body.layers.compile)

    def weights_problem(self, expected: str | None) -> str | None:
        """Why a session expecting its body in `expected` weights cannot have this one (None: it can)."""
        if expected is None:
            return None
        try:
            want = parse_format(expected)
        except ValueError as exc:
            return f"weights mismatch: {exc}"
        if want != self.weights:
            return (f"weights mismatch: this server serves layers [{self.split.x}, {self.split.y}) in "
                    f"{self.weights.describe()}, the session expects {want.describe()}; ask for "
                    f"{self.weights.name} (--body-weights {self.weights.name}) or serve with --weights {want.name}")
        return None

    def fingerprint(self, x: int, y: int) -> str:
        if (x, y) not in self._fingerprints:
            self._fingerprints[(x, y)] = self.model.body_fingerprint(x, y)
        return self._fingerprints[(x, y)]


class BodyContext(ServerContext):
    """One LLM body server's state: the body, its sessions (with their KV-cache budget), the compute
    thread that runs every step (the scheduler), and the longest session it allows."""

    def __init__(self, runtime: BodyRuntime, settings: ServerSettings):
        super().__init__(settings, SessionStore(settings.max_sessions, settings.idle_ttl_s, settings.kv_budget,
                                                settings.session_prefix))
        self.runtime = runtime
        self.model = model = runtime.model
        self.max_positions = min(settings.max_positions or model.max_positions, model.max_positions)
        lie = Lie(settings.dishonest, settings.dishonest_after) if settings.dishonest else None
        if lie is not None:
            log.warning("DISHONEST server (testing only): answers perturbed by %g x their RMS from step %d",
                        settings.dishonest, settings.dishonest_after)
        self.scheduler = Scheduler(model.body, model.hidden_size, model.dtype, self.limits, self.metrics,
                                   settings.max_batch, lie=lie, device=model.device,
                                   exchange_timeout_s=settings.exchange_timeout_s)
        store = self.store
        self.metrics.gauges.update(
            sessions=lambda: len(store), kv_reserved_bytes=lambda: store.reserved,
            kv_budget_bytes=lambda: store.kv_budget_bytes or 0, rss_bytes=lambda: psutil.Process().memory_info().rss,
            kv_cache_bytes=self.kv_cache_bytes)

    def kv_cache_bytes(self) -> int:
        """Bytes the open sessions' KV caches hold now."""
        return sum(self.runtime.kv_bytes(s.x, s.y, s.pos) for s in self.store.sessions() if s.cache is not None)

    def close(self) -> None:
        self.scheduler.close()
