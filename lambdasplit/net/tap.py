"""A passive observer of the link: what can be read from the raw bytes each connection carried.

The observer sees only bytes, each connection's two streams as the link proxy recorded them
(`LinkProxy(record=True).recordings`), and knows nothing the program did not put on the wire:

    raw bytes ─┬─ TLS records?  -> count them, measure the ciphertext's entropy, find nothing else
               └─ HTTP/1.1      -> requests and responses (Content-Length or chunked bodies)
                    ├─ POST /v1/sessions         JSON: the split, the codecs and the rotation seed
                    ├─ POST /v1/sessions/ID/step  an LSPL frame each way (--transport http)
                    ├─ POST /v1/complete          cloud-only: the prompt, and the answer as NDJSON
                    └─ 101 upgrade -> WebSocket   unmask, reassemble, an LSPL frame per binary message

Frames carry only their codec's name; a `had` codec also needs the session's seed and a `pca:R` codec
a basis. The session's opening crosses the link too, so the observer builds the codecs exactly as the
client does (`session_codecs`) and decodes every frame's payload to a tensor. Nothing is unpickled or
torch.load-ed; frames go through `decode_frame`'s checks. Garbage never raises: what could not be
parsed is reported in `problems`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
import torch

from ..wire.codecs import Codec, CodecError, session_codecs
from ..wire.frame import MAGIC, FrameError, Limits, decode_frame
from ..wire.lowrank import Basis
from ..wire.spec import SpecError, parse_codec
from .streams import (
    MAX_HEAD,
    MAX_MESSAGE,
    HttpMessage,
    TlsSeen,
    http_request_start,
    looks_tls,
    parse_http,
    parse_tls,
    parse_websocket,
)

_PREFIX = 9  # magic, version, header length


# ---- what the observer found --------------------------------------------------------------------

@dataclass
class SessionSeen:
    """A session opening read off the link: its request (JSON) and, once answered, its id and codecs."""

    request: dict
    session_id: str | None = None
    codecs: tuple[Codec, Codec] | None = None
    problem: str = ""

    @property
    def wire(self) -> dict:
        wire = self.request.get("wire")
        return wire if isinstance(wire, dict) else {}


@dataclass
class FrameSeen:
    """One LSPL frame found on the link, decoded as far as the observer could."""

    direction: str  # "up" (device -> cloud) or "down"
    connection: int
    carrier: str  # "websocket", "http" or "raw"
    size: int  # bytes of the whole frame
    session_id: str | None = None
    kind: str = ""
    step: int = 0
    pos: int = 0
    shape: tuple[int, ...] = ()
    codec: str = ""
    tensor: torch.Tensor | None = None
    problem: str = ""


@dataclass
class Completion:
    """A cloud-only request and its streamed answer, read in plain text."""

    prompt: str
    options: dict
    answer: str = ""
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ConnectionSeen:
    index: int
    bytes_up: int
    bytes_down: int
    protocol: str = "empty"  # empty | http | http+websocket | tls | unknown
    exchanges: list[str] = field(default_factory=list)  # one line per HTTP request: what it was
    tls: TlsSeen | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Observation:
    connections: list[ConnectionSeen] = field(default_factory=list)
    sessions: list[SessionSeen] = field(default_factory=list)
    frames: list[FrameSeen] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    magic_hits: int = 0  # occurrences of the LSPL magic in the raw bytes (masking hides it in WebSocket uplinks)

    @property
    def tls(self) -> TlsSeen | None:
        seen = [c.tls for c in self.connections if c.tls is not None]
        if not seen:
            return None
        total = TlsSeen()
        for t in seen:
            total.add(t)
        return total

    @property
    def problems(self) -> list[str]:
        out = [f"connection {c.index}: {p}" for c in self.connections for p in c.problems]
        out += [f"session {s.session_id or '?'}: {s.problem}" for s in self.sessions if s.problem]
        out += [f"{f.direction} frame on connection {f.connection}: {f.problem}" for f in self.frames if f.problem]
        return out

    def decoded(self, direction: str, session_id: str | None = None) -> list[FrameSeen]:
        """The hidden frames of one direction that decoded to a tensor, in step order."""
        frames = [f for f in self.frames if f.direction == direction and f.tensor is not None
                  and (session_id is None or f.session_id == session_id)]
        return sorted(frames, key=lambda f: (f.step, f.pos))

    def main_session(self) -> str | None:
        """The session with the most decoded frames (None if frames came without a known session)."""
        counts = Counter(f.session_id for f in self.frames if f.tensor is not None)
        return counts.most_common(1)[0][0] if counts else None

    def states(self, direction: str, session_id: str | None = None) -> tuple[list[int], torch.Tensor | None]:
        """The hidden states one direction carried, one row per sequence position: (positions, (n, D)).

        Each frame's rows sit at positions pos, pos + 1, ...; a position sent twice (the no-cache mode
        resends the prefix every step) keeps its first copy."""
        rows: dict[int, torch.Tensor] = {}
        for f in self.decoded(direction, session_id):
            t = f.tensor.reshape(-1, f.tensor.shape[-1])
            for i in range(t.shape[0]):
                rows.setdefault(f.pos + i, t[i])
        if not rows:
            return [], None
        positions = sorted(rows)
        return positions, torch.stack([rows[p] for p in positions]).float()


# ---- the observer --------------------------------------------------------------------------------

def observe(recordings: Iterable, basis: Basis | None = None, limits: Limits = Limits()) -> Observation:
    """Read everything a passive observer can from recorded connections ((up, down) bytes each, or the
    link proxy's `Recording`s). Never raises on garbage: what it could not parse is in `problems`."""
    obs = Observation()
    pending: list[tuple[int, str, str, str | None, bytes]] = []  # frames to decode once sessions are known
    for index, rec in enumerate(recordings):
        up, down = (bytes(rec.up), bytes(rec.down)) if hasattr(rec, "up") else (bytes(rec[0]), bytes(rec[1]))
        conn = ConnectionSeen(index, len(up), len(down))
        obs.connections.append(conn)
        obs.magic_hits += up.count(MAGIC) + down.count(MAGIC)
        if getattr(rec, "dropped_up", 0) or getattr(rec, "dropped_down", 0):
            conn.problems.append("the recording was cut at the proxy's record limit; the end is missing")
        try:
            _read_connection(conn, up, down, obs, pending)
        except Exception as exc:  # a parser bug must not hide the rest of the capture
            conn.problems.append(f"could not be parsed ({type(exc).__name__}: {exc})")
    for session in obs.sessions:
        _build_codecs(session, basis)
    by_id = {s.session_id: s for s in obs.sessions if s.session_id}
    for index, direction, carrier, session_id, data in pending:
        try:
            seen = _decode(data, index, direction, carrier, by_id.get(session_id), session_id, limits)
        except Exception as exc:  # decode_frame's checks should catch everything; this is the backstop
            seen = FrameSeen(direction, index, carrier, len(data), session_id,
                             problem=f"could not be decoded ({type(exc).__name__}: {exc})")
        obs.frames.append(seen)
    return obs


def _read_connection(conn: ConnectionSeen, up: bytes, down: bytes, obs: Observation, pending: list) -> None:
    if not up and not down:
        return
    if looks_tls(up) or looks_tls(down):
        conn.protocol = "tls"
        conn.tls = TlsSeen()
        for name, data in (("up", up), ("down", down)):
            seen, problem = parse_tls(data)
            conn.tls.add(seen)
            if problem:
                conn.problems.append(f"{name}: {problem}")
        return
    if not http_request_start(up[:MAX_HEAD]):
        conn.protocol = "unknown"
        conn.problems.append(f"{len(up)} B up and {len(down)} B down that are neither HTTP nor TLS; "
                             "searched for frames in them")
        for direction, data in (("up", up), ("down", down)):
            pending.extend((conn.index, direction, "raw", None, frame) for frame in carve_frames(data))
        return
    conn.protocol = "http"
    requests, up_rest, problem = parse_http(up, requests=True)
    if problem:
        conn.problems.append(f"up: {problem}")
    methods = [r.method for r in requests]
    responses, down_rest, problem = parse_http(down, requests=False, methods=methods)
    if problem:
        conn.problems.append(f"down: {problem}")
    for i, req in enumerate(requests):
        resp = responses[i] if i < len(responses) else None
        conn.exchanges.append(f"{req.method} {req.path} ({len(req.body)} B) -> "
                              + (f"{resp.status} ({len(resp.body)} B)" if resp else "no response"))
        _read_exchange(conn, req, resp, obs, pending)
    upgraded = responses and responses[-1].status == 101 and requests and len(responses) <= len(requests)
    if upgraded:
        conn.protocol = "http+websocket"
        match = re.fullmatch(r"/v1/sessions/([^/?]+)/ws", requests[len(responses) - 1].path)
        session_id = match.group(1) if match else None
        for direction, data, masked in (("up", up_rest, True), ("down", down_rest, False)):
            messages, problem = parse_websocket(data, masked)
            if problem:
                conn.problems.append(f"websocket {direction}: {problem}")
            for m in messages:
                if m.opcode == 2:
                    pending.append((conn.index, direction, "websocket", session_id, m.data))
                elif m.opcode == 1:
                    conn.problems.append(f"websocket {direction}: a text message of {len(m.data)} B")
    elif up_rest or down_rest:
        conn.problems.append(f"{len(up_rest)} B up and {len(down_rest)} B down after the last HTTP message")


def _read_exchange(conn: ConnectionSeen, req: HttpMessage, resp: HttpMessage | None, obs: Observation,
                   pending: list) -> None:
    """What one HTTP request and its response tell: a session opening, a step, or a cloud-only completion."""
    path = req.path.split("?", 1)[0]
    if req.method == "POST" and path == "/v1/sessions":
        request = _json(req.body)
        if isinstance(request, dict):
            answer = _json(resp.body) if resp is not None else None
            sid = answer.get("session_id") if isinstance(answer, dict) else None
            obs.sessions.append(SessionSeen(request, sid if isinstance(sid, str) else None))
        else:
            conn.problems.append("a session request whose body is not a JSON object")
    elif req.method == "POST" and (m := re.fullmatch(r"/v1/sessions/([^/]+)/step", path)):
        if req.body.startswith(MAGIC):
            pending.append((conn.index, "up", "http", m.group(1), req.body))
        if resp is not None and resp.body.startswith(MAGIC):
            pending.append((conn.index, "down", "http", m.group(1), resp.body))
    elif req.method == "POST" and path == "/v1/complete":
        request = _json(req.body)
        if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
            conn.problems.append("a completion request without a JSON prompt")
            return
        done = Completion(request["prompt"], {k: v for k, v in request.items() if k != "prompt"})
        for line in (resp.body.splitlines() if resp is not None else []):
            event = _json(line)
            if isinstance(event, dict) and isinstance(event.get("token"), int):
                done.token_ids.append(event["token"])
                done.answer += str(event.get("text", ""))
        obs.completions.append(done)
    else:  # anything else with a frame in it is still a frame
        for direction, msg in (("up", req), ("down", resp)):
            if msg is not None and msg.body.startswith(MAGIC):
                pending.append((conn.index, direction, "http", None, msg.body))


def _json(data: bytes):
    if not data or len(data) > MAX_MESSAGE:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _build_codecs(session: SessionSeen, basis: Basis | None) -> None:
    """The session's codecs, built from its request as the client builds them."""
    r, wire = session.request, session.wire
    try:
        up, down, seed = str(wire.get("up", "fp32")), str(wire.get("down", "fp32")), int(wire.get("seed", 0))
        x, y = int(r["x"]), int(r["y"])
        session.codecs = session_codecs(up, down, seed=seed, x=x, y=y, basis=basis,
                                        basis_sha256=wire.get("basis"))
    except (KeyError, TypeError, ValueError) as exc:  # CodecError and SpecError are ValueErrors
        session.problem = f"its codecs cannot be built: {exc}"


def _decode(data: bytes, connection: int, direction: str, carrier: str, session: SessionSeen | None,
            session_id: str | None, limits: Limits) -> FrameSeen:
    seen = FrameSeen(direction, connection, carrier, len(data), session_id)
    header, problem = peek_header(data, limits)
    if header is None:
        seen.problem = problem
        return seen
    seen.kind = str(header.get("kind", ""))
    step, pos = header.get("step", 0), header.get("pos", 0)
    seen.step, seen.pos = (step if isinstance(step, int) else 0), (pos if isinstance(pos, int) else 0)
    shape = header.get("shape")
    if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
        seen.shape = tuple(shape)
    seen.codec = str(header.get("codec", ""))
    if seen.kind != "hidden":
        detail = f"{header.get('code', '')} {header.get('message', '')}".strip()
        seen.problem = f"a {seen.kind or 'malformed'} frame: {detail}"
        return seen
    codec = None
    if session is not None and session.codecs is not None:
        codec = session.codecs[0 if direction == "up" else 1]
        if codec.name != seen.codec:
            codec = None
    if codec is None:
        try:
            spec = parse_codec(seen.codec)
        except SpecError as exc:
            seen.problem = f"unknown codec {seen.codec!r}: {exc}"
            return seen
        if spec.hadamard or spec.rank:
            seen.problem = (f"codec {seen.codec} needs the session's "
                            f"{'rotation seed' if spec.hadamard else 'PCA basis'}, which the capture did not show")
            return seen
    try:
        seen.tensor = decode_frame(data, limits, codec=codec).tensor
    except (FrameError, CodecError) as exc:
        seen.problem = str(exc)
    return seen


# ---- frames --------------------------------------------------------------------------------------

def peek_header(data: bytes, limits: Limits = Limits()) -> tuple[dict | None, str]:
    """A frame's msgpack header, read with the same limits as decode_frame, without its payload."""
    if len(data) < _PREFIX or data[:4] != MAGIC:
        return None, f"{len(data)} B that do not start with the LSPL magic"
    hlen = int.from_bytes(data[5:9], "little")
    if hlen > limits.max_header_bytes or _PREFIX + hlen > len(data):
        return None, f"header length {hlen} is over the limit or past the end of the frame"
    try:
        header = msgpack.unpackb(data[_PREFIX:_PREFIX + hlen], raw=False, strict_map_key=True, max_bin_len=0,
                                 max_array_len=16, max_map_len=32, max_str_len=2048)
    except Exception as exc:
        return None, f"header is not valid msgpack ({exc})"
    if not isinstance(header, dict):
        return None, "header is not a map"
    return header, ""


def carve_frames(data: bytes, limits: Limits = Limits()) -> list[bytes]:
    """Frames found anywhere in a byte stream of unknown framing, by their magic and stated lengths."""
    out, at = [], data.find(MAGIC)
    while at >= 0:
        header, _ = peek_header(data[at:at + _PREFIX + limits.max_header_bytes], limits)
        nbytes = header.get("nbytes") if header else None
        end = at + _PREFIX + int.from_bytes(data[at + 5:at + 9], "little") + (nbytes or 0)
        if isinstance(nbytes, int) and 0 <= nbytes <= limits.max_frame_bytes and end <= len(data):
            out.append(data[at:end])
            at = data.find(MAGIC, end)
        else:
            at = data.find(MAGIC, at + 1)
    return out


# ---- HTTP/1.1 ------------------------------------------------------------------------------------
