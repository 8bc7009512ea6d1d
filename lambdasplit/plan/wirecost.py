"""What one direction of the wire costs: bytes on the socket per step, and codec time per step.

Sizes come from the codecs themselves (`Codec.raw_size`) and from a real frame header
(`encode_frame`), plus the WebSocket framing around each frame (steps travel as one binary
WebSocket message each; the client's are masked). What the kernel puts around them (TCP/IP
headers, ACKs) is not counted, as the client's socket counters do not count it either.

A `pca:R` codec needs a basis file; for costing, a random orthonormal basis of the same rank
stands in (its sizes and its arithmetic are the same). A `zstd` codec is costed before
compression: an upper bound, as what zstd saves depends on the data.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..wire.codecs import Codec, CodecError
from ..wire.frame import Frame, decode_frame, encode_frame
from ..wire.lowrank import Projection
from ..wire.spec import SpecError, parse_codec

TYPICAL_STEP = 128  # step and position numbers written into the sample headers (their msgpack size varies a byte)
TYPICAL_CLOUD_US = 50_000  # the server's timing, which each downlink frame carries


def costing_codec(name: str, hidden_size: int) -> Codec:
    """A codec to measure sizes and times with; `pca:R` gets a random orthonormal basis of rank R."""
    try:
        spec = parse_codec(name)
        projection = None
        if spec.rank:
            if spec.rank > hidden_size:
                raise ValueError(f"{name}: rank {spec.rank} is larger than the hidden size {hidden_size}")
            generator = torch.Generator().manual_seed(0)
            q, _ = torch.linalg.qr(torch.randn(hidden_size, spec.rank, generator=generator))
            projection = Projection(torch.zeros(hidden_size), q)
        return Codec(spec, seed=1, projection=projection)
    except (SpecError, CodecError) as exc:
        raise ValueError(f"wire codec {name!r}: {exc}") from None


def websocket_overhead(nbytes: int, masked: bool) -> int:
    """Bytes of WebSocket framing around one binary message of nbytes (RFC 6455; masked from the client)."""
    extended = 0 if nbytes < 126 else 2 if nbytes < 1 << 16 else 8
    return 2 + extended + (4 if masked else 0)


def _sample_frame(codec: Codec, rows: int, hidden_size: int, downlink: bool) -> Frame:
    tensor = torch.randn(rows, hidden_size, generator=torch.Generator().manual_seed(rows))
    extra = {"cloud_us": TYPICAL_CLOUD_US} if downlink else {}
    return Frame("hidden", step=TYPICAL_STEP, pos=TYPICAL_STEP, tensor=tensor, codec=codec, extra=extra)


def message_bytes(codec: Codec, rows: int, hidden_size: int, downlink: bool) -> int:
    """Bytes one step of `rows` hidden states puts on the socket: payload, frame header, WebSocket framing."""
    frame = _sample_frame(codec, rows, hidden_size, downlink)
    header = len(encode_frame(frame)) - len(codec.encode(frame.tensor))
    frame_bytes = header + codec.raw_size((rows, hidden_size))
    return frame_bytes + websocket_overhead(frame_bytes, masked=not downlink)


def time_codec(codec: Codec, rows: int, hidden_size: int, repeats: int) -> tuple[float, float]:
    """Median seconds to encode a frame of `rows` states, and to decode (check and unpack) it."""
    frame = _sample_frame(codec, rows, hidden_size, downlink=False)
    data = encode_frame(frame)
    decode_frame(data, codec=codec)  # warm-up
    encode, decode = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        data = encode_frame(frame)
        t1 = time.perf_counter()
        decode_frame(data, codec=codec)
        encode.append(t1 - t0)
        decode.append(time.perf_counter() - t1)
    return statistics.median(encode), statistics.median(decode)


@dataclass(frozen=True)
class WireSizes:
    """Bytes on the socket for a split's decode steps and its prompt, with a given pair of codecs."""

    up_codec: str
    down_codec: str
    step_up: int  # one decode step (1 x D) up
    step_down: int
    prompt_up: int  # the prompt's L_in x D states, sent once
    prompt_down: int

    @classmethod
    def measure(cls, up: str, down: str, hidden_size: int, prompt_tokens: int) -> "WireSizes":
        up_codec, down_codec = costing_codec(up, hidden_size), costing_codec(down, hidden_size)
        return cls(up_codec.name, down_codec.name,
                   message_bytes(up_codec, 1, hidden_size, downlink=False),
                   message_bytes(down_codec, 1, hidden_size, downlink=True),
                   message_bytes(up_codec, prompt_tokens, hidden_size, downlink=False),
                   message_bytes(down_codec, prompt_tokens, hidden_size, downlink=True))
