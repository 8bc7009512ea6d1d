"""Frames: the only bytes that cross the network during inference.

    offset 0  magic   b"LSPL"
    offset 4  version u8 (= 2)
    offset 5  hlen    u32 little-endian, length of the header
    offset 9  header  msgpack map: kind, step, pos, shape, codec, nbytes, crc (+ code/message for errors)
    then      payload nbytes raw little-endian bytes, as the codec wrote them

`codec` is the codec's canonical name (see spec.py); `crc` is the CRC-32 of the payload, so a
corrupted payload is refused instead of decoding to a silently wrong tensor. Every header field is
checked against `Limits` before a byte of payload is looked at or a tensor is allocated. Nothing
here unpickles anything.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import msgpack
import torch

from .codecs import Codec, CodecError, get_codec

MAGIC = b"LSPL"
VERSION = 2
_PREFIX = struct.Struct("<4sBI")
KINDS = ("hidden", "grad", "lora", "error")  # grad: a gradient (training); lora: a PrivateLoRA exchange


class FrameError(ValueError):
    """A frame that is malformed or breaks a limit. `code` is a short machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 64 << 20
    max_header_bytes: int = 4096
    max_rows: int = 1 << 17  # rows: the product of every dimension but the last
    max_dims: int = 3

    @property
    def max_values(self) -> int:
        """The most values a frame's tensor may hold: what the largest fp32 frame carries. A codec of fewer
        bytes per value (int2, pca, zstd) does not let a frame of the same size ask for a larger tensor."""
        return self.max_frame_bytes // 4


@dataclass
class Frame:
    kind: str
    step: int = 0
    pos: int = 0
    tensor: torch.Tensor | None = None
    codec: str | Codec = "fp32"  # a Codec to encode with session state; decoded frames carry the name
    code: str = ""  # for error frames
    message: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def error(cls, code: str, message: str, step: int = 0) -> "Frame":
        return cls("error", step=step, code=code, message=message)


def encode_frame(frame: Frame) -> bytes:
    header: dict = {"kind": frame.kind, "step": frame.step, "pos": frame.pos}
    payload = b""
    if frame.kind == "error":
        header.update(code=frame.code, message=frame.message[:1000])
    if frame.tensor is not None:
        codec = frame.codec if isinstance(frame.codec, Codec) else get_codec(frame.codec)
        payload = codec.encode(frame.tensor)
        header.update(shape=list(frame.tensor.shape), codec=codec.name, crc=zlib.crc32(payload))
    header["nbytes"] = len(payload)
    if frame.extra:
        header["extra"] = frame.extra
    packed = msgpack.packb(header, use_bin_type=True)
    return _PREFIX.pack(MAGIC, VERSION, len(packed)) + packed + payload


def decode_frame(data: bytes | bytearray | memoryview, limits: Limits = Limits(),
                 out_dtype: torch.dtype = torch.float32, codec: Codec | None = None, *,
                 width: int | None = None, max_rows: int | None = None, max_positions: int | None = None) -> Frame:
    """Parse and validate a frame; raise FrameError naming what was wrong and what was expected.

    `codec` is the codec the session agreed on for this direction: a frame in any other is refused
    (code "bad_codec"). Without it, only codecs that need no session state can be decoded.

    What a session allows bounds the frame before a byte of it is inflated or a tensor allocated:
    `width`, the only row width it takes (its hidden size); `max_rows`, the most rows (a reply: the rows
    of the step it answers); `max_positions`, where the sequence must end (its header's `pos` + rows).
    """
    if len(data) > limits.max_frame_bytes:
        raise FrameError("too_large", f"frame of {len(data)} bytes exceeds the limit of {limits.max_frame_bytes}")
    header, payload = _split(data, limits)
    kind = header.get("kind")
    if kind not in KINDS:
        raise FrameError("malformed", f"unknown frame kind {kind!r}; expected one of {KINDS}")
    step, pos, nbytes = (_int_field(header, k) for k in ("step", "pos", "nbytes"))
    if nbytes != len(payload):
        raise FrameError("malformed", f"header says {nbytes} payload bytes, frame carries {len(payload)}")
    extra = header.get("extra") or {}
    if not isinstance(extra, dict):
        raise FrameError("malformed", "'extra' must be a map")
    if kind == "error":
        return Frame("error", step=step, pos=pos, code=str(header.get("code", "")),
                     message=str(header.get("message", "")), extra=extra)

    shape = _bounded_shape(header.get("shape"), pos, limits, width, max_rows, max_positions)
    name = header.get("codec")
    if codec is not None and name != codec.name:
        raise FrameError("bad_codec", f"this session's codec for the direction is {codec.name}, the frame is {name}")
    crc = header.get("crc")
    if not isinstance(crc, int) or isinstance(crc, bool):
        raise FrameError("malformed", "a hidden frame needs the integer 'crc' of its payload")
    try:
        codec = codec or get_codec(str(name))
        codec.check_size(tuple(shape), len(payload))  # before the CRC is computed or anything is inflated
    except CodecError as exc:
        raise FrameError(exc.code, str(exc)) from None
    if zlib.crc32(payload) != crc:
        raise FrameError("corrupt", f"payload CRC-32 is {zlib.crc32(payload):08x}, the header says {crc:08x}: "
                                    "the frame was damaged on the way")
    try:
        tensor = codec.decode(payload, tuple(shape), out_dtype)
    except CodecError as exc:
        raise FrameError(exc.code, str(exc)) from None
    return Frame(kind, step=step, pos=pos, tensor=tensor, codec=codec.name, extra=extra)


def _split(data: bytes | bytearray | memoryview, limits: Limits) -> tuple[dict, memoryview]:
    """The prefix checked, the header parsed: (header, payload)."""
    if len(data) < _PREFIX.size:
        raise FrameError("malformed", f"frame of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, hlen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameError("malformed", f"bad magic {bytes(magic)!r}; expected {MAGIC!r} (is this a lambdasplit frame?)")
    if version != VERSION:
        raise FrameError("version", f"frame version {version} is not supported; this side speaks {VERSION}")
    if hlen > limits.max_header_bytes or _PREFIX.size + hlen > len(data):
        raise FrameError("malformed", f"header length {hlen} is over the limit or past the end of the frame")
    view = memoryview(data)
    try:
        header = msgpack.unpackb(view[_PREFIX.size:_PREFIX.size + hlen], raw=False, strict_map_key=True,
                                 max_bin_len=0, max_array_len=16, max_map_len=32, max_str_len=2048)
    except Exception as exc:
        raise FrameError("malformed", f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("malformed", "header must be a map")
    return header, view[_PREFIX.size + hlen:]


def _bounded_shape(shape, pos: int, limits: Limits, width: int | None, max_rows: int | None,
                   max_positions: int | None) -> list[int]:
    """The header's shape, refused unless its total size fits the limits and what the session allows."""
    if (not isinstance(shape, list) or not 1 <= len(shape) <= limits.max_dims
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise FrameError("shape", f"shape must be 1..{limits.max_dims} positive integers, got {shape!r}")
    rows = math.prod(shape[:-1])
    if width is not None and shape[-1] != width:
        raise FrameError("bad_shape", f"rows of {shape[-1]} values; this session's are {width} wide "
                                      f"(shape {shape})")
    if max_rows is not None and rows > max_rows:
        raise FrameError("bad_shape", f"{rows} rows; at most {max_rows} are expected here (shape {shape})")
    if max_positions is not None and pos + rows > max_positions:
        raise FrameError("too_long", f"the sequence would reach {pos + rows} positions; this session allows "
                                     f"{max_positions} (the model's context or the server's limit)")
    if rows > limits.max_rows:
        raise FrameError("shape", f"{rows} rows exceed the limit of {limits.max_rows}")
    if rows * shape[-1] > limits.max_values:
        raise FrameError("too_large", f"a tensor of shape {shape} holds {rows * shape[-1]} values, over the limit "
                                      f"of {limits.max_values} (what a {limits.max_frame_bytes}-byte fp32 frame holds)")
    return shape


def max_frame_size(codec: Codec, width: int, rows: int, limits: Limits = Limits()) -> int:
    """The largest frame of at most `rows` rows of `width` that a session with this codec may send
    (never more than the server's limit): what a server buffers of one step before it refuses it."""
    return min(limits.max_frame_bytes, _PREFIX.size + limits.max_header_bytes + codec.max_payload((rows, width)))


def reply_bounds(sent: bytes | bytearray | memoryview) -> dict:
    """The bounds of the reply to a frame this side encoded (a step is answered by as many rows as it sent,
    of the same width): decode_frame(reply, ..., **reply_bounds(sent))."""
    try:
        header, _ = _split(sent, Limits(max_frame_bytes=len(sent)))
        shape = header["shape"]
        return {"max_rows": math.prod(shape[:-1]), "width": shape[-1]}
    except (FrameError, KeyError, TypeError, IndexError):
        return {}


def payload_size(data: bytes) -> int:
    """Bytes of a well-formed frame's payload (the frame less its prefix and header)."""
    _, _, hlen = _PREFIX.unpack_from(data, 0)
    return len(data) - _PREFIX.size - hlen


def frame_kind(data: bytes) -> str | None:
    """The kind a frame's header names, without decoding its payload (None: not a readable frame)."""
    try:
        magic, _, hlen = _PREFIX.unpack_from(data, 0)
        if magic != MAGIC or hlen > 65536:
            return None
        header = msgpack.unpackb(bytes(data[_PREFIX.size:_PREFIX.size + hlen]), raw=False, max_bin_len=0)
    except Exception:  # noqa: BLE001 - anything unreadable is "not a frame" here; decode_frame says why
        return None
    return header.get("kind") if isinstance(header, dict) else None


def _int_field(header: dict, key: str) -> int:
    value = header.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 40:
        raise FrameError("malformed", f"header field {key!r} must be a non-negative integer, got {value!r}")
    return value
