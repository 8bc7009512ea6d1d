"""Codecs: how a hidden-state tensor becomes payload bytes, and back.

A codec is named by the grammar of `spec.py` and built per session and direction, because two of
its stages need session state: the rotation seed (`had`) and the PCA basis (`pca:R`). Encoding is
a pipeline over rows of the last dimension:

    x (rows, D) -> [noise: + N(0, (S rms)^2), sender only] -> [pca: (rows, R)] -> [out: top-k apart] -> [had: rotate the rest] -> fp or int codes -> [zstd]

Payload layout, little-endian, in this order (each part present only if the codec has it):
    zero, scale   float32 x groups each   (int formats; groups = rows, 1 or channels)
    outlier idx   uint16 x rows x K       (out:K)
    outlier value float16 x rows x K
    codes         bit-packed, or the floats themselves
The whole is then zstd-compressed if the codec says `zstd`. From the frame's shape alone a codec
knows how many (uncompressed) bytes must arrive, so nothing is allocated from an unchecked size.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .lowrank import Basis, BasisError, Projection
from .noise import add_noise, private_generator
from .quant import QuantError, dequantize, group_count, pack_bits, packed_size, quantize, unpack_bits
from .rotation import Rotation, RotationError, rotation
from .spec import CodecSpec, SpecError, parse_codec

PARTS = ("fp32", "fp16", "bf16", "int8", "int6", "int4", "int3", "int2", "out:K", "had", "pca:R", "zstd", "noise:S")
_FLOATS = {"fp32": (4, "<f4", torch.float32), "fp16": (2, "<f2", torch.float16), "bf16": (2, "<i2", torch.bfloat16)}
_FP16_MAX = 65504.0
_ZSTD_LEVEL = 3
_ZSTD_MAX_WINDOW = 1 << 23  # what a zstd frame may ask the receiver to hold as its window (level 3 uses 2 MiB)


class CodecError(ValueError):
    """A tensor or payload a codec refuses; `code` is the frame error code it becomes ("codec", "non_finite")."""

    def __init__(self, message: str, code: str = "codec"):
        super().__init__(message)
        self.code = code


def _refuse_non_finite(x: torch.Tensor, name: str, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"{name}: {what} holds non-finite values (NaN or infinity); they are never sent or "
                         "accepted", "non_finite")


class Codec:
    """One direction's codec of one session: `encode(tensor) -> bytes`, `decode(bytes, shape) -> tensor`."""

    def __init__(self, spec: CodecSpec, *, seed: int = 0, projection: Projection | None = None):
        if spec.rank and projection is None:
            raise CodecError(f"{spec.name} needs a PCA basis file on both sides (--basis FILE; make one with "
                             "lambdasplit fit-basis)")
        if projection is not None and projection.rank != spec.rank:
            raise CodecError(f"{spec.name} asks rank {spec.rank}, the projection has {projection.rank}")
        self.spec, self.seed, self.projection = spec, seed, projection
        self.name = spec.name
        # the noise defence draws from the OS's randomness: the session seed is known to the receiver
        self._noise = private_generator() if spec.noise else None
        self._rotation: Rotation | None = None  # `had`: the one width this codec codes (built once it is checked)

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"

    # ---- sizes ------------------------------------------------------------------------------
    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(rows, width on the wire) of a tensor of this shape."""
        if not shape or any(s <= 0 for s in shape):
            raise CodecError(f"cannot code a tensor of shape {list(shape)}")
        n = shape[-1]
        if self.projection is not None and n != self.projection.mean.shape[0]:
            raise CodecError(f"{self.name}: the basis is for width {self.projection.mean.shape[0]}, the tensor has {n}")
        if self.spec.outliers > (self.spec.rank or n):
            raise CodecError(f"{self.name}: {self.spec.outliers} outliers per row, but a row has {self.spec.rank or n} values")
        rows = 1
        for s in shape[:-1]:
            rows *= s
        return rows, self.spec.rank or n

    def raw_size(self, shape: tuple[int, ...]) -> int:
        """Bytes of the payload before the lossless stage."""
        rows, width = self._dims(shape)
        spec = self.spec
        if spec.bits is None:
            return rows * width * _FLOATS[spec.format][0]
        return (group_count(rows, width, spec.granularity) * 8 + rows * spec.outliers * 4
                + packed_size(rows * width, spec.bits))

    def max_payload(self, shape: tuple[int, ...]) -> int:
        """The most payload bytes a frame of this shape may carry: the raw size, or zstd's bound on it."""
        raw = self.raw_size(shape)
        return raw + (raw >> 7) + 1024 if self.spec.zstd else raw  # zstd's worst case is raw + raw/256 + a header

    def check_size(self, shape: tuple[int, ...], nbytes: int) -> None:
        """Refuse a payload whose length cannot be this shape's, before it is read (or inflated)."""
        raw = self.raw_size(shape)
        if not self.spec.zstd and nbytes != raw:
            raise CodecError(f"{self.name} payload of shape {list(shape)} must be {raw} bytes, got {nbytes}")
        if nbytes > self.max_payload(shape):
            raise CodecError(f"{self.name}: a payload of shape {list(shape)} takes at most {self.max_payload(shape)} "
                             f"bytes, the frame carries {nbytes}")

    def _rotate(self, width: int) -> Rotation:
        """This codec's rotation (the session's seed); one width at a time, so nothing piles up by width."""
        rot = self._rotation
        if rot is None or rot.n != width:
            rot = self._rotation = rotation(width, self.seed)  # shared with codecs of the same seed (tools)
        return rot

    # ---- encode -----------------------------------------------------------------------------
    def encode(self, tensor: torch.Tensor) -> bytes:
        shape = tuple(tensor.shape)
        rows, width = self._dims(shape)
        x = tensor.detach().to("cpu", torch.float32).reshape(rows, -1)
        _refuse_non_finite(x, self.name, "the tensor to send")
        if self._noise is not None:
            x = add_noise(x, self.spec.noise, self._noise)
        try:
            if self.projection is not None:
                x = self.projection.encode(x)
            payload = self._encode_values(x, width)
        except (QuantError, RotationError) as exc:
            raise CodecError(f"{self.name}: {exc}") from None
        if self.spec.zstd:
            payload = _zstd().compress(payload)
        return payload

    def _encode_values(self, x: torch.Tensor, width: int) -> bytes:
        spec = self.spec
        rotate = self._rotate(width).forward if spec.hadamard else None
        if spec.bits is None:
            x = rotate(x) if rotate else x
            if spec.format == "fp16" and bool((x.abs() > _FP16_MAX).any()):  # would silently become inf
                raise CodecError(f"{self.name}: a value exceeds the fp16 range (65504); use bf16 or fp32")
            return _float_bytes(x, spec.format)
        parts = []
        if spec.outliers:
            idx = x.abs().topk(spec.outliers, dim=1, sorted=False).indices
            values = x.gather(1, idx)
            if bool((values.abs() > _FP16_MAX).any()):
                raise CodecError(f"{self.name}: an outlier exceeds the fp16 range; use a float codec")
            x = x.scatter(1, idx, 0.0)  # the outliers travel apart; the rotation only sees the rest
        if rotate:
            x = rotate(x)
        zero, scale, codes = quantize(x, spec.bits, spec.granularity)
        parts += [zero.numpy().astype("<f4").tobytes(), scale.numpy().astype("<f4").tobytes()]
        if spec.outliers:
            parts += [idx.to(torch.int32).numpy().astype("<u2").tobytes(), _float_bytes(values, "fp16")]
        parts.append(pack_bits(codes, spec.bits))
        return b"".join(parts)

    # ---- decode -----------------------------------------------------------------------------
    def decode(self, payload: bytes | memoryview, shape: tuple[int, ...],
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Payload bytes -> tensor of `shape`; any inconsistency raises CodecError, never a wrong tensor."""
        shape = tuple(shape)
        rows, width = self._dims(shape)
        raw = self.raw_size(shape)
        if self.spec.zstd:
            payload = _unzstd(payload, raw, self.name)
        if len(payload) != raw:
            raise CodecError(f"{self.name} payload of shape {list(shape)} must be {raw} bytes, got {len(payload)}")
        try:
            x = self._decode_values(memoryview(payload), rows, width)
        except (QuantError, RotationError) as exc:
            raise CodecError(f"{self.name}: {exc}") from None
        if self.projection is not None:
            x = self.projection.decode(x)
        return x.reshape(shape).to(out_dtype)

    def _decode_values(self, buf: memoryview, rows: int, width: int) -> torch.Tensor:
        spec = self.spec
        unrotate = self._rotate(width).inverse if spec.hadamard else None
        if spec.bits is None:
            x = _float_tensor(buf, spec.format).reshape(rows, width).to(torch.float32)
            _refuse_non_finite(x, self.name, "the payload")
            return unrotate(x) if unrotate else x
        groups, k = group_count(rows, width, spec.granularity), spec.outliers
        offset = 0

        def take(nbytes: int) -> memoryview:
            nonlocal offset
            part = buf[offset:offset + nbytes]
            offset += nbytes
            return part

        zero = _float_tensor(take(4 * groups), "fp32")
        scale = _float_tensor(take(4 * groups), "fp32")
        if not bool(torch.isfinite(zero).all() and torch.isfinite(scale).all() and (scale >= 0).all()):
            raise CodecError(f"{self.name}: corrupt payload (a scale or zero point is negative or not finite)")
        if k:
            idx = torch.from_numpy(np.frombuffer(take(2 * rows * k), dtype="<u2").astype(np.int64)).reshape(rows, k)
            values = _float_tensor(take(2 * rows * k), "fp16").to(torch.float32).reshape(rows, k)
            if bool((idx >= width).any()):
                raise CodecError(f"{self.name}: corrupt payload (an outlier index is past the row's {width} values)")
        codes = unpack_bits(take(len(buf) - offset), spec.bits, rows * width).reshape(rows, width)
        x = dequantize(codes, zero, scale, spec.granularity)
        if unrotate:
            x = unrotate(x)
        if k:
            x.scatter_(1, idx, values)
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"{self.name}: corrupt payload (it decodes to values that are not finite)")
        return x


def make_codec(name: str, *, seed: int = 0, basis: Basis | None = None, point: int | None = None) -> Codec:
    """Build a codec from its name; `pca:R` codecs need the basis and the split point they code."""
    try:
        spec = parse_codec(name)
        projection = None
        if spec.rank:
            if basis is None:
                raise CodecError(f"{spec.name} needs a PCA basis file on both sides (--basis FILE; make one with "
                                 "lambdasplit fit-basis)")
            if point is None:
                raise CodecError(f"{spec.name} needs the split point it codes")
            projection = basis.projection(point, spec.rank)
        return Codec(spec, seed=seed, projection=projection)
    except (SpecError, BasisError) as exc:
        raise CodecError(str(exc)) from None


def session_codecs(up: str, down: str, *, seed: int, x: int, y: int, basis: Basis | None = None,
                   basis_sha256: str | None = None) -> tuple[Codec, Codec]:
    """Both directions' codecs of a session: uplink codes the state entering layer x, downlink the
    state leaving layer y - 1. A `pca` codec needs `basis`, and the session's stated hash must be its."""
    codecs, problems = [], []
    for direction, name, point in (("uplink", up, x), ("downlink", down, y)):
        try:
            if parse_codec(name).rank and basis is not None and basis_sha256 != basis.sha256:
                raise CodecError(f"basis mismatch: the session uses basis {str(basis_sha256)[:16]}…, this side "
                                 f"loaded {basis.path.name} ({basis.sha256[:16]}…)")
            codecs.append(make_codec(name, seed=seed, basis=basis, point=point))
        except (SpecError, CodecError) as exc:
            problems.append(f"{direction} codec {name!r}: {exc}")
    if problems:
        raise CodecError("; ".join(problems))
    return codecs[0], codecs[1]


def get_codec(name: str) -> Codec:
    """A codec that needs no session state (no `pca`; `had` with seed 0): for tools and tests."""
    return make_codec(name)


def _float_bytes(x: torch.Tensor, fmt: str) -> bytes:
    _, np_dtype, torch_dtype = _FLOATS[fmt]
    t = x.to(torch_dtype).contiguous()
    if torch_dtype != torch.float32:  # a float32 value past the format's range would go out as infinity
        _refuse_non_finite(t, fmt, "the tensor to send (in this format)")
    if torch_dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(np_dtype, copy=False).tobytes()


def _float_tensor(buf: bytes | memoryview, fmt: str) -> torch.Tensor:
    _, np_dtype, torch_dtype = _FLOATS[fmt]
    arr = np.frombuffer(buf, dtype=np_dtype).astype(np_dtype[1:], copy=True)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else t


_local = threading.local()  # zstd contexts are not thread-safe: one pair per thread


def _zstd():
    if not hasattr(_local, "compress"):
        import zstandard
        _local.compress = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
        _local.decompress = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        _local.error = zstandard.ZstdError
    return _local.compress


def _unzstd(payload: bytes | memoryview, raw: int, name: str) -> bytes:
    """Inflate a payload that must give exactly `raw` bytes (a size the receiver worked out from a shape it
    has already bounded). The zstd frame's own statement of its size is never trusted: the stream is read
    through a reader that stops at `raw` + 1 bytes, with a bounded window, so a small frame cannot make
    this side allocate more than `raw`."""
    import zstandard

    _zstd()
    try:
        stated = zstandard.frame_content_size(payload)
    except _local.error as exc:
        raise CodecError(f"{name}: the payload is not a zstd frame ({exc})") from None
    if stated >= 0 and stated != raw:
        raise CodecError(f"{name}: the zstd frame states {stated} bytes of content; this shape needs exactly {raw}")
    try:
        with _local.decompress.stream_reader(payload, read_across_frames=False) as reader:
            data = reader.read(raw + 1)
    except _local.error as exc:
        raise CodecError(f"{name}: the zstd payload does not decompress to {raw} bytes ({exc})") from None
    if len(data) != raw:
        got = f"more than {raw}" if len(data) > raw else str(len(data))
        raise CodecError(f"{name}: the zstd payload decompresses to {got} bytes; this shape needs exactly {raw}")
    return data
