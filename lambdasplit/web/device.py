"""The device side behind the web UI and the local API: one model, one body server, a client per split.

A split (X, Y) needs its own head and tail loaded (layers [0, X) and [Y, N)); the device keeps the
few most recently used ones. Changing the codecs reuses a loaded split (`SplitClient.with_wire`).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..client.body import Retry
from ..client.generate import SplitClient
from ..client.transport import BodyConnection
from ..models.device import resolve_device
from ..models.families import default_wire
from ..models.formats import choose_format
from ..models.llm import Split, load_config
from ..models.source import model_name, resolve_model
from ..privacy.results import Assessment, default_assessment_path
from ..util.threads import on_compute_thread
from ..wire.spec import parse_wire

# codecs the UI offers (any other codec name is accepted too); see docs/wire.md for what each costs
CODEC_CHOICES = ("fp32", "fp16", "bf16", "int8", "int8+out:4", "int6+out:4", "int4+out:4", "had+int4", "int2",
                 "noise:0.1+int8+out:4")
LOADED_SPLITS = 3  # heads and tails kept loaded, most recently used first


@dataclass(frozen=True)
class Options:
    """One generation's settings: the split, the codec each way, sampling and stop strings."""

    x: int
    y: int
    up: str
    down: str
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())


class Device:
    """What the device holds: the model folder, the body server's description, and loaded splits."""

    def __init__(self, model: str | Path | None, server: str, split: tuple[int, int] | None = None,
                 wire: str | tuple[str, str] | None = None, *, cache: bool = True, token: str | None = None, ca_bundle: str | None = None,
                 transport: str = "ws", speculate: str = "auto", max_draft: int = 8, basis: str | None = None,
                 retry: Retry = Retry(), assessment: str | Path | None = None, adapter: str | Path | None = None,
                 compute: dict | None = None):
        compute = compute or {}
        # a GGUF model is read at the device's own weight format (bf16 for int8, say), as SplitClient would
        fmt = choose_format(compute.get("weights"), resolve_device(compute.get("device", "auto")),
                            need_float=adapter is not None)
        self.folder = resolve_model(model, storage=fmt.storage)
        self.name = model_name(self.folder)
        self.servers = [u.strip() for u in server.split(",") if u.strip()]
        if not self.servers:
            raise ValueError("give the body server's URL (--server http://HOST:PORT)")
        self.client_options = dict(server=self.servers, cache=cache, token=token, ca_bundle=ca_bundle,
                                   transport=transport, speculate=speculate, max_draft=max_draft, basis=basis,
                                   retry=retry, adapter=adapter, **compute)
        self.adapter = str(adapter) if adapter else None
        config = load_config(self.folder)
        self.num_layers, self.hidden_size = config.num_hidden_layers, config.hidden_size
        with BodyConnection(self.servers[0], transport="http", token=token, ca_bundle=ca_bundle) as conn:
            self.server = conn.info()
        if (self.server.num_layers, self.server.hidden_size) != (self.num_layers, self.hidden_size):
            raise ValueError(f"the body server at {self.servers[0]} serves {self.server.model_name} "
                             f"({self.server.num_layers} layers, D={self.server.hidden_size}); this device has "
                             f"{self.name} ({self.num_layers} layers, D={self.hidden_size}): a mismatched model")
        x, y = split if split is not None else (self.server.x, self.server.y)
        default = Split.resolve(x, y, self.num_layers)
        self.check_split(default.x, default.y)
        self.defaults = Options(default.x, default.y, *parse_wire(wire or default_wire(config)))
        self._clients: OrderedDict[tuple[int, int], SplitClient] = OrderedDict()
        self._lock = threading.Lock()
        path = Path(assessment) if assessment else default_assessment_path(self.folder)
        if assessment and not path.is_file():
            raise ValueError(f"no assessment at {path} (make one with: lambdasplit assess)")
        self.assessment = Assessment.load(path) if path.is_file() else None
        if self.assessment is not None and (self.assessment.num_layers, self.assessment.hidden_size) != (
                self.num_layers, self.hidden_size):
            raise ValueError(f"the assessment {path} is of {self.assessment.model} ({self.assessment.num_layers} "
                             f"layers), not of {self.name}")
        self.assessment_path = path

    def check_split(self, x: int, y: int) -> None:
        if not self.server.x <= x <= y <= self.server.y:
            raise ValueError(f"split ({x}, {y}) is outside what the body server serves: layers "
                             f"[{self.server.x}, {self.server.y}) of {self.num_layers}; pick "
                             f"{self.server.x} <= X <= Y <= {self.server.y}")

    def client(self, options: Options) -> SplitClient:
        """A client for this split and these codecs (loading the split's head and tail if needed)."""
        self.check_split(options.x, options.y)
        key = (options.x, options.y)
        with self._lock:  # one load at a time; generations themselves run concurrently
            client = self._clients.get(key)
            if client is None:
                load = functools.partial(SplitClient, self.folder, split=key, **self.client_options)
                # compiled steps are guarded on torch's thread count: compile with the generations' threads
                client = on_compute_thread(load) if self.client_options.get("compile") else load()
                self._clients[key] = client
                while len(self._clients) > LOADED_SPLITS:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
        return client.with_wire((options.up, options.down))

    def leakage(self, x: int, y: int) -> dict | None:
        """What `lambdasplit assess` measured for the states this split sends (None: not assessed)."""
        if self.assessment is None:
            return None

        def point(layer: int) -> dict:
            return {"layer": layer, **{who: self.assessment.recovery(layer, who)
                                       for who in ("with-weights", "without-weights")}}

        up, down = point(x), point(y)
        return {"up": up, "down": down, "split": self.assessment.split_recovery(x, y),
                "metric": "top-1 token recovery", "measured": self.assessment.meta.get("date"),
                "noise": self.assessment.noise}

    def describe(self) -> dict:
        """What the page needs to draw its controls."""
        s = self.server
        return {"model": self.name, "server": self.servers[0], "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "served": [s.x, s.y], "server_model": s.model_name,
                "defaults": {"x": self.defaults.x, "y": self.defaults.y, "up": self.defaults.up,
                             "down": self.defaults.down, "max_tokens": self.defaults.max_tokens},
                "codecs": list(dict.fromkeys([self.defaults.up, self.defaults.down, *CODEC_CHOICES])),
                "assessed": self.assessment is not None, "assessment_path": str(self.assessment_path),
                "adapter": self.adapter,
                "diffusion": False}
