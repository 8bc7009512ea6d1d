"""The device side: tokenizer, head and tail, and the generation loop around a body.

    prompt -> tokenizer -> head -> [wire] -> body -> [wire] -> tail -> sample -> detokenizer

With caching (the default) the prompt's states go up once (L_in x D); after that each step sends
one 1 x D vector up and gets one 1 x D vector back. Without caching, every step resends and
recomputes the whole sequence (the paper's baseline).

With speculation (speculative.py; on by default, with prompt-lookup drafts and a draft length that
adapts to the measured acceptance and round time), a step may carry the next token and k drafts,
(k + 1) x D each way, and yield up to k + 1 tokens for one round trip; the output is the same.
"""

from __future__ import annotations

import copy
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..models.device import resolve_device
from ..models.families import default_wire
from ..models.formats import choose_format, parse_format
from ..models.llm import SplitModel, load_split, truncate_cache
from ..models.lora import Adapter, merge
from ..models.privatelora import PrivateAdapter, is_private_adapter
from ..models.prompting import encode_prompt
from ..models.source import resolve_model
from ..wire.codecs import Codec, CodecError, session_codecs
from ..wire.lowrank import Basis
from ..wire.protocol import ForwardHop, SessionRequest, WireFormat
from ..wire.spec import parse_codec, parse_wire
from .body import LocalBody, RemoteBody, Retry
from .chain import ChainBody
from .options import ConnectionOptions
from .route import Hop, Route, discover_route, reprobe
from .sampling import Sampler, SamplingParams
from .speculative import DEFAULT_MAX_DRAFT, MODES, SpeculationStats, Speculator, make_speculator, verify
from .transport import BodyError, Traffic
from .verify import VerifiedBody, tolerance


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    body_s: float = 0.0  # time waiting for the body: network + cloud compute
    cloud_s: float = 0.0  # of which the body's compute, as the server reports it
    head_tail_s: float = 0.0  # the device's own compute (head and tail), measured
    emulated_wait_s: float = 0.0  # waits added to emulate a slower device (device_slowdown > 1)
    device_slowdown: float = 1.0
    traffic: Traffic | None = None
    first_frame_up: bytes = b""
    recoveries: int = 0  # times the body server was lost and the session rebuilt
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    decode_rounds: int = 0  # round trips after the prompt's
    weights: tuple[str, str] = ("", "")  # the weight formats of (head and tail, body)
    # the body while it runs (a RemoteBody or LocalBody): live traffic and the latest frames, for the web UI
    body: object = field(default=None, repr=False, compare=False)

    @property
    def tokens_per_round_trip(self) -> float:
        """Tokens each decode round trip yielded (1 without speculation)."""
        return (self.new_tokens - 1) / self.decode_rounds if self.decode_rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, over the time they took."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def device_s(self) -> float:
        return self.prefill_s + self.decode_s - self.body_s

    @property
    def network_s(self) -> float:
        """Time on the wire and in the server's I/O: the wait for the body less its compute."""
        return self.body_s - self.cloud_s


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


class TextStream:
    """Turns token ids into text deltas, holding back incomplete UTF-8 sequences.

    Each push decodes only a short window (the tokens since the last emitted text, plus the ones
    before them for context), so streaming costs the same at token 5000 as at token 5.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = 0  # start of the context window
        self.read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class SplitClient:
    """Generate text with the head and tail here and the body on a server (or in-process).

    >>> client = SplitClient("smollm2", server="http://127.0.0.1:8470", split=(1, -1))
    >>> print(client.generate("What is the difference between AI, ML and DL?", max_new_tokens=64).text)

    How the servers are reached is `connection` (client/options.py); its fields may also be given as
    keywords of their own (`token=`, `ca_bundle=`, `timeout=`, `retry=`, `transport=`, `hops=`,
    `verify=`), which replace those of `connection`.
    """

    def __init__(self, model: str | Path | None = None, server: str | list[str] | None = None,
                 split: tuple[int, int] | None = None, *, wire: str | tuple[str, str] | None = None,
                 basis: str | Path | None = None, cache: bool = True, dtype: str | None = None,
                 weights: str | None = None, device: str = "auto", body_weights: str | None = None,
                 device_slowdown: float = 1.0, on_event: Callable[[str], None] | None = None,
                 speculate: str = "auto", max_draft: int = DEFAULT_MAX_DRAFT, adapter: str | Path | None = None,
                 compile: bool = False, connection: ConnectionOptions | None = None, **connection_fields):
        self.connection = ConnectionOptions.build(connection, **connection_fields)
        # where the head and tail compute, and in which format (models/formats.py); `dtype` is the older
        # name of `weights`. `body_weights`: the format the body must be served in (None: whatever it is)
        self.device = resolve_device(device)
        fmt = choose_format(weights or dtype, self.device, need_float=adapter is not None)
        self.body_weights = parse_format(body_weights).name if body_weights else None
        self.folder = resolve_model(model, storage=fmt.storage)
        # one URL, or several: replicas of the same layers (on a failure the client moves on to the next), or
        # the hops of a sharded body (client/route.py), told apart by what each serves
        self.servers = [u.strip() for u in server.split(",")] if isinstance(server, str) else list(server or [])
        if any(not u for u in self.servers):
            raise ValueError(f"empty server URL in {server!r}")
        self.server = self.servers[0] if self.servers else None
        self.route: Route | None = None  # planned at the first generation (or now, when the split comes from it)
        self.on_event = on_event
        self.use_cache = cache
        self.speculate, self.max_draft = self._check_speculation(speculate, max_draft), max_draft
        if not 1.0 <= device_slowdown <= 1000:
            raise ValueError(f"device_slowdown must be between 1 and 1000, got {device_slowdown}")
        self.device_slowdown = device_slowdown  # emulate a device this many times slower (benchmarks)
        self.basis = Basis.load(basis) if basis else None
        # a bad codec name fails here, before any model is loaded; none given: the model family's default
        self.wire = self._wire_format(wire) if wire is not None else None
        if split is None:
            split = self._server_split() if server else (0, 0)
        parts = ("head", "tail") if server else ("head", "body", "tail")
        self.model: SplitModel = load_split(self.folder, split[0], split[1], parts=parts, weights=fmt,
                                            device=self.device)
        if self.wire is None:
            self.wire = self._wire_format(default_wire(self.model.config))
        self.adapter = self.private_adapter = None
        if adapter is not None:
            self._load_adapter(adapter, remote=bool(server))
        # `compile`: one compiled graph for each part's single-position steps (models/compiled.py), compiled now
        self.compile_s = None
        if compile:
            self._event("compiling the decode steps of the parts held here (once; seconds to a minute) ...")
            self.compile_s = self.model.compile()
            self._event(f"compiled in {self.compile_s:.1f} s")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.eos_ids = _eos_ids(self.model.config, self.tokenizer)
        self._fingerprints: dict[tuple[int, int], str] = {}  # layers [x, y) -> their fingerprint (a hash of the weights)

    @property
    def split(self):
        return self.model.split

    def _load_adapter(self, folder: str | Path, remote: bool) -> None:
        """A LoRA adapter (lambdasplit tune) merged into the device's layers, or a PrivateLoRA one whose M
        matrices answer the body server mid-step; either way it never leaves the device."""
        if self.model.weights.quantized:
            raise ValueError(f"adapters need float weights on the device; these are {self.model.weights.name}: "
                             f"use --weights bf16 or fp32 with an adapter")
        if not is_private_adapter(folder):
            self.adapter = Adapter.load(folder)
            stacks = [part.layers for part in self.model.parts().values()]
            merge(self.adapter, stacks, remote=(self.split.x, self.split.y) if remote else None)
            return
        private = PrivateAdapter.load(folder)
        if not remote or self.connection.transport != "ws":
            raise ValueError("a PrivateLoRA adapter adapts the body on a server, over the WebSocket transport: "
                             "give --server and keep --transport ws")
        if (private.x, private.y) != (self.split.x, self.split.y):
            raise ValueError(f"this PrivateLoRA adapter was trained for split {private.x}:{private.y}; the client "
                             f"runs {self.split.x}:{self.split.y}")
        self.private_adapter = private

    def _wire_format(self, wire: str | tuple[str, str]) -> WireFormat:
        """'CODEC' for both directions, 'UP,DOWN', or an (up, down) pair; a bad name raises SpecError (a ValueError)."""
        up, down = parse_wire(wire)
        for name in (up, down):
            if parse_codec(name).rank and self.basis is None:
                raise ValueError(f"wire codec {name!r} needs the PCA basis file the server loaded (basis=/--basis FILE)")
        return WireFormat(up=up, down=down, basis=self.basis.sha256 if self.basis else None)

    def with_wire(self, wire: str | tuple[str, str]) -> "SplitClient":
        """This client with other codecs on the wire: the same loaded head, tail and tokenizer."""
        other = copy.copy(self)
        other.wire = self._wire_format(wire)
        return other

    def _check_speculation(self, mode: str, max_draft: int) -> str:
        if mode not in MODES:
            raise ValueError(f"speculation must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 <= max_draft <= 15:
            raise ValueError(f"the longest draft must be 0 to 15 tokens, got {max_draft}")
        if not self.use_cache and mode in ("ngram", "self"):
            raise ValueError("speculation needs the KV cache (drop --no-cache, or use --speculate off)")
        return mode if self.use_cache else "off"

    def _server_split(self) -> tuple[int, int]:
        if len(self.servers) > 1:
            route = self._plan_route(None)
            return route.x, route.y
        with self.connection.connect(self.server, "http") as conn:
            info = conn.info()
        return info.x, info.y

    def _info(self, url: str):
        with self.connection.connect(url, "http", timeout=min(self.connection.timeout, 10.0)) as conn:
            return conn.info()

    def _plan_route(self, split: tuple[int, int] | None) -> Route:
        """The hops of the body: one server (or replicas of one) is one hop, found without asking; several
        are asked what they hold (client/route.py)."""
        if self.route is None:
            if len(self.servers) == 1:
                self.route = Route((Hop(*split, tuple(self.servers)),))
            else:
                self.route, _ = discover_route(self.servers, self._info, split, self._event)
        return self.route

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Token ids of a prompt; instruct models get their chat template."""
        return encode_prompt(self.tokenizer, prompt, chat)

    # ---- generation -------------------------------------------------------------------------
    def _open_body(self, positions: int):
        if not self.servers:
            return LocalBody(self.model.body, self.use_cache)
        wire = self.wire.model_copy(update={"seed": secrets.randbits(62)})  # a fresh rotation per session
        # the server reserves KV memory for max_positions: ask for what this generation can reach
        private = self.private_adapter
        route = self._plan_route((self.split.x, self.split.y))
        if len(route.hops) == 1:
            hop = route.hops[0]
            request = self._hop_request(hop, wire, positions, private_lora=private.spec.request() if private else None)
            return self._open_hop(hop, request, self._codecs(wire, hop.x, hop.y),
                                  on_lora=private.answer if private else None)
        if private is not None:
            raise ValueError("a PrivateLoRA adapter needs the whole body on one server; this route has "
                             f"{len(route.hops)} hops ({route})")
        return self._open_hops(route, wire, positions)

    def _body_fingerprint(self, x: int, y: int) -> str:
        if (x, y) not in self._fingerprints:
            self._fingerprints[(x, y)] = self.model.body_fingerprint(x, y)
        return self._fingerprints[(x, y)]

    def _hop_request(self, hop: Hop, wire: WireFormat, positions: int, **fields) -> SessionRequest:
        return SessionRequest(model_fingerprint=self._body_fingerprint(hop.x, hop.y), x=hop.x, y=hop.y,
                              weights=self.body_weights, wire=wire, cache=self.use_cache, max_positions=positions,
                              **fields)

    def _open_hops(self, route: Route, wire: WireFormat, positions: int):
        """A sharded body: forwarded by its servers (one device round trip per step) where they allow it and
        verification does not need each hop's answers here, else chained by this client."""
        first, rest = route.hops[0], route.hops[1:]
        hops, verify = self.connection.hops, self.connection.verify
        if hops != "chain" and verify == 1:
            forward = [ForwardHop(urls=list(h.replicas), x=h.x, y=h.y,
                                  model_fingerprint=self._body_fingerprint(h.x, h.y)) for h in rest]
            request = self._hop_request(first, wire, positions, forward=forward)
            try:
                return self._open_hop(first, request, self._codecs(wire, first.x, route.y))
            except BodyError as exc:
                if hops == "forward" or exc.code != "no_forward":
                    raise
                self._event(f"{exc}; chaining the hops from here")
        elif hops == "forward":
            raise ValueError("cross-checking (verify > 1) compares each hop's answers on the device: use hops "
                             "'chain' or 'auto'")
        return ChainBody([self._open_hop(h, self._hop_request(h, wire, positions), self._codecs(wire, h.x, h.y))
                          for h in route.hops])

    def _open_hop(self, hop: Hop, request: SessionRequest, codecs: tuple[Codec, Codec], on_lora=None):
        """One hop's body: a session on one of its replicas (moving to the next on failure), or, verifying,
        sessions on `verify` of them at once."""
        if self.connection.verify == 1:
            return RemoteBody(list(hop.replicas), self.connection.connect, request, codecs, self.model.dtype,
                              self.connection.retry, self.on_event, on_lora=on_lora, device=self.model.device,
                              rediscover=lambda: reprobe(self.route, hop, self._info, self._event))
        member_retry = Retry(attempts=2, base_s=0.2, cap_s=1.0, patience_s=5.0)  # a failing replica is replaced

        def open_member(url: str) -> RemoteBody:
            return RemoteBody([url], self.connection.connect, request, codecs, self.model.dtype, member_retry,
                              self.on_event, device=self.model.device)

        return VerifiedBody(list(hop.replicas), self.connection.verify, open_member,
                            tolerance(self.wire.up, self.wire.down), hop.x, hop.y, self.on_event)

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def _codecs(self, wire: WireFormat, x: int, y: int) -> tuple[Codec, Codec]:
        try:
            return session_codecs(wire.up, wire.down, seed=wire.seed, x=x, y=y, basis=self.basis,
                                  basis_sha256=wire.basis)
        except CodecError as exc:
            raise ValueError(str(exc)) from None

    def generate_ids(self, prompt_ids: list[int], *, max_new_tokens: int = 256,
                     sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True,
                     stats: GenerationStats | None = None,
                     speculate: str | Speculator | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (the hot loop: head -> body -> tail -> sample).

        `speculate` overrides the client's speculation mode for this generation (a mode name, or a
        Speculator with a draft source of the caller's own).
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        limit = self.model.max_positions
        if len(prompt_ids) + max_new_tokens > limit:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                             f"context of {limit} positions")
        if isinstance(speculate, Speculator):
            if not self.use_cache:
                raise ValueError("speculation needs the KV cache")
            speculator = speculate
        else:
            mode = self.speculate if speculate is None else self._check_speculation(speculate, self.max_draft)
            speculator = make_speculator(mode, self.model, self.max_draft,
                                         log=self.on_event or (lambda m: print(f"[lambdasplit] {m}", file=sys.stderr)))
        if speculator is not None:
            stats.speculation = speculator.stats
        sampler = Sampler(sampling)
        body = None
        try:
            body = stats.body = self._open_body(len(prompt_ids) + max_new_tokens)
            opened = getattr(body, "opened", None)  # a RemoteBody: the session names the weights it runs
            stats.weights = (self.model.weights.name, opened.weights if opened else self.model.weights.name)
            if speculator is not None and not isinstance(body, LocalBody) and not body.rollback:
                speculator = None  # a server from before speculation: it would refuse the rollbacks
                self._event("the body server cannot roll back; speculation off")
            stats.device_slowdown = self.device_slowdown
            step = Stepper(self.model, body, self.use_cache, stats, self.device_slowdown)
            if speculator is not None:
                speculator.attach(step)
            t0 = time.perf_counter()
            tokens = [sampler(step(prompt_ids))]
            stats.prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            while True:
                for token in tokens:
                    stats.new_tokens += 1
                    stats.decode_s = time.perf_counter() - t1
                    yield token
                    if (stop_at_eos and token in self.eos_ids) or stats.new_tokens == max_new_tokens:
                        return
                tokens = self._round(step, tokens[-1], sampler, speculator, max_new_tokens - stats.new_tokens)
                stats.decode_rounds += 1
        finally:
            if body is not None:
                body.close()
                stats.cloud_s = body.cloud_s
                if not isinstance(body, LocalBody):
                    stats.traffic, stats.first_frame_up = body.measured(), body.first_frame_up
                    stats.recoveries = body.recoveries

    @staticmethod
    def _round(step: "Stepper", token: int, sampler: Sampler, speculator, room: int) -> list[int]:
        """One round trip: feed `token` (with drafts, when speculating); return the tokens it yields."""
        if speculator is None:
            return [sampler(step([token]))]
        drafts = speculator.propose([*step.ids, token], room - 1)
        started = time.perf_counter()
        logits = step([token, *drafts], all_logits=True)
        accepted, after = verify(logits, drafts, sampler)
        if accepted < len(drafts):
            step.rollback(step.pos - len(drafts) + accepted)
        speculator.record(len(drafts), accepted, time.perf_counter() - started)
        return [*drafts[:accepted], after]

    def stream(self, prompt: str | list[dict], *, chat: bool = True, stats: GenerationStats | None = None,
               **options) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens arrive."""
        ids = self.encode_prompt(prompt, chat=chat)
        text = TextStream(self.tokenizer)
        for token in self.generate_ids(ids, stats=stats, **_generation_options(options)):
            if delta := text.push(token):
                yield delta

    def generate(self, prompt: str | list[dict], *, chat: bool = True, **options) -> GenerationResult:
        stats = GenerationStats()
        ids = self.encode_prompt(prompt, chat=chat)
        tokens = list(self.generate_ids(ids, stats=stats, **_generation_options(options)))
        return GenerationResult(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens, stats)


def _generation_options(options: dict) -> dict:
    """Accept sampling fields (temperature, top_k, top_p, seed) directly as keyword arguments."""
    fields = {k: options.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in options}
    if fields:
        options["sampling"] = SamplingParams(**fields)
    return options


class Stepper:
    """One forward pass through head, body and tail for new token ids; returns the last logits."""

    def __init__(self, model: SplitModel, body, use_cache: bool, stats: GenerationStats, slowdown: float = 1.0):
        self.head, self.tail, self.body, self.stats = model.head, model.tail, body, stats
        self.device = model.device
        self.slowdown = slowdown
        self.use_cache = use_cache
        self.head_cache = model.head.layers.new_cache() if use_cache else None
        self.tail_cache = model.tail.layers.new_cache() if use_cache else None
        self.ids: list[int] = []
        self.pos = 0
        self.body_rows: torch.Tensor | None = None  # the body's output for the last call's rows
        self.call_pos = 0  # where the last call's rows start

    @torch.inference_mode()
    def __call__(self, new_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Logits after the last new id (V,), or after each of them (len(new_ids), V) with all_logits."""
        self.ids.extend(new_ids)
        ids, pos = (new_ids, self.pos) if self.use_cache else (self.ids, 0)
        t0 = time.perf_counter()
        hidden = self.head(torch.tensor([ids], device=self.device), self.head_cache, pos)[0]
        t = time.perf_counter()
        hidden = self.body.forward(hidden, pos)
        self.body_rows, self.call_pos = hidden, pos
        t2 = time.perf_counter()
        self.stats.body_s += t2 - t
        logits = self.tail(hidden.unsqueeze(0), self.tail_cache, pos, last_only=not all_logits)[0]
        if not all_logits:
            logits = logits[-1]
        logits = logits.cpu()  # sampling runs on the CPU (on a GPU, this waits for the step)
        compute = (t - t0) + (time.perf_counter() - t2)
        self.stats.head_tail_s += compute
        if self.slowdown > 1:  # an emulated slower device: wait (k - 1) x what this device took
            wait = (self.slowdown - 1) * compute
            time.sleep(wait)
            self.stats.emulated_wait_s += wait
        self.pos += len(new_ids)
        return logits

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on (rejected drafts); the body forgets them with the next step."""
        if not self.use_cache or not 0 <= length <= self.pos:
            raise ValueError(f"cannot roll back to {length} of {self.pos} positions"
                             + ("" if self.use_cache else " without a cache"))
        truncate_cache(self.head_cache, length)
        truncate_cache(self.tail_cache, length)
        del self.ids[length:]
        self.pos = length

    @property
    def last_body(self) -> torch.Tensor | None:
        """The body's output for the last committed position (None before any, or after a deeper rollback)."""
        last = self.pos - 1 - self.call_pos
        return self.body_rows[last] if self.body_rows is not None and last >= 0 else None


def _eos_ids(config, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
