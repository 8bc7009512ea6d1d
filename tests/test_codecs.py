"""Wire codecs without a model: quantization bounds, bit packing, payload layout, rotation, outliers,
zstd, PCA basis files, codec names, and every way a damaged frame must be refused.

Error bounds come from the math of each stage, not from a run: an affine integer code is off by at
most half a step (scale / 2) of its group; the rotation is orthonormal, so it moves that error
around without growing it; fp16 / bf16 give exactly the value rounded to that type. Speed is not
tested here (the benchmarks measure it).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import save_file

from lambdasplit.wire.codecs import CodecError, get_codec, make_codec, session_codecs
from lambdasplit.wire.frame import Frame, FrameError, decode_frame, encode_frame
from lambdasplit.wire.lowrank import Basis, BasisError, fit_pca, save_basis
from lambdasplit.wire.quant import QuantError, dequantize, group_count, pack_bits, packed_size, quantize, unpack_bits
from lambdasplit.wire.rotation import Rotation, RotationError, rotation
from lambdasplit.wire.spec import CodecSpec, SpecError, parse_codec

PREFIX = struct.Struct("<4sBI")
BITS = (8, 6, 4, 3, 2)
GRANULARITIES = ("row", "tensor", "channel")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# database=None: no .hypothesis folder in the checkout; deadline=None: first calls pay torch's warm-up
PROPERTY = dict(deadline=None, database=None)

# the shapes the system sends: one new token (1, D), or a prompt (L, D), for the model's D and a small one
SHAPES = [(1, 576), (7, 576), (33, 576), (1, 64), (7, 64), (33, 64)]
# every codec that needs no basis; the pca ones are tested with a basis further down
CODECS = ["fp32", "fp16", "bf16",
          "int8", "int6", "int4", "int3", "int2",
          "int8:tensor", "int8:channel", "int4:tensor", "int4:channel", "int2:channel", "int3:tensor",
          "int8+out:4", "int4+out:1", "int3:channel+out:2", "int6:tensor+out:8",
          "had+int8", "had+int4", "had+int3+out:2", "had+int2:channel", "had+fp32", "had+fp16", "had+bf16+zstd",
          "fp16+zstd", "bf16+zstd", "fp32+zstd", "int8+zstd", "int6+zstd", "had+int4+out:2+zstd"]


def gaussian(shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def with_outlier_channels(shape, seed: int = 0, channels: int = 3, factor: float = 100.0) -> torch.Tensor:
    """Gaussian rows where a few channels (the same ones in every row, as in LLM hidden states) are 100x."""
    x = gaussian(shape, seed)
    idx = torch.randperm(shape[-1], generator=torch.Generator().manual_seed(seed + 1))[:channels]
    x[..., idx] *= factor
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def round_trip(codec, x: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    codec = get_codec(codec) if isinstance(codec, str) else codec
    return codec.decode(codec.encode(x), tuple(x.shape), out_dtype)


def int_payload(codec, payload: bytes, shape) -> dict:
    """Read an integer codec's (uncompressed) payload by the layout documented at the top of codecs.py,
    independently of the codec's own decoder."""
    spec = codec.spec
    rows, width = math.prod(shape[:-1]), spec.rank or shape[-1]
    groups, k = group_count(rows, width, spec.granularity), spec.outliers
    buf, at = memoryview(payload), 0

    def take(n: int) -> memoryview:
        nonlocal at
        at += n
        return buf[at - n:at]

    out = {"zero": np.frombuffer(take(4 * groups), "<f4"), "scale": np.frombuffer(take(4 * groups), "<f4")}
    if k:
        out["idx"] = np.frombuffer(take(2 * rows * k), "<u2").reshape(rows, k)
        out["values"] = np.frombuffer(take(2 * rows * k), "<f2").reshape(rows, k)
    out["codes"] = unpack_bits(take(packed_size(rows * width, spec.bits)), spec.bits, rows * width).reshape(rows, width)
    assert at == len(payload), f"{codec.name}: {len(payload) - at} bytes left after the documented fields"
    return out


def step_per_value(granularity: str, scale: np.ndarray, rows: int, width: int) -> torch.Tensor:
    """(rows, width) tensor of each value's group scale."""
    shape = {"row": (rows, 1), "tensor": (1, 1), "channel": (1, width)}[granularity]
    return torch.from_numpy(scale.copy()).reshape(shape).expand(rows, width)


# ==== affine quantization: the half-step bound, for any finite input ===========================

@st.composite
def float_matrices(draw) -> np.ndarray:
    """Finite float32 (rows, cols) arrays: bulk distributions drawn from a seed, or small arrays whose
    every element hypothesis picks; magnitudes up to 1e4; some rows constant."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["normal", "uniform", "spiky", "few_values", "elementwise"]))
    if kind == "elementwise":
        cols = min(cols, 24)
        x = draw(arrays(np.float32, (rows, cols), elements=st.floats(-1e4, 1e4, width=32)))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        magnitude = draw(st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e4]))
        if kind == "normal":
            x = rng.standard_normal((rows, cols)) * magnitude / 4
        elif kind == "uniform":
            x = rng.uniform(-magnitude, magnitude, (rows, cols))
        elif kind == "spiky":  # small values and a few huge ones, like hidden-state outlier channels
            x = rng.standard_normal((rows, cols)) * magnitude * 1e-3
            x[:, rng.integers(0, cols, 3)] = magnitude * rng.choice([-1, 1], (rows, 3))
        else:
            x = rng.choice(rng.uniform(-magnitude, magnitude, 3), (rows, cols))
        x = x.astype(np.float32)
    constant = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    for i, flag in enumerate(constant):
        if flag:
            x[i] = x[i, 0]
    return np.ascontiguousarray(x)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", BITS)
@settings(max_examples=60, **PROPERTY)
@given(arr=float_matrices())
def test_quantize_is_within_half_a_step(bits, granularity, arr):
    """Every value comes back within scale/2 of its group (plus float rounding), codes fit in `bits`,
    zero is the group minimum and scale its range over 2^bits - 1 (1 for a constant group)."""
    x = torch.from_numpy(arr)
    rows, cols = x.shape
    zero, scale, codes = quantize(x, bits, granularity)
    groups = group_count(rows, cols, granularity)
    assert zero.shape == scale.shape == (groups,) and zero.dtype == scale.dtype == torch.float32
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert int(codes.max()) < 2**bits

    dims = {"row": 1, "channel": 0, "tensor": None}[granularity]
    lo = x.amin(dim=dims) if dims is not None else x.min().reshape(1)
    hi = x.amax(dim=dims) if dims is not None else x.max().reshape(1)
    assert torch.equal(zero, lo)
    expected = (hi - lo) / (2**bits - 1)
    assert torch.equal(scale, torch.where(expected > 0, expected, torch.ones_like(expected)))

    y = dequantize(codes, zero, scale, granularity)
    assert y.shape == x.shape and y.dtype == torch.float32
    step = step_per_value(granularity, scale.numpy(), rows, cols)
    tol = 1e-5 * float(x.abs().max()) + 1e-6
    err = (y - x).abs()
    worst = int(torch.argmax(err - step / 2))
    assert bool((err <= step / 2 + tol).all()), \
        f"value {x.flatten()[worst]} came back {y.flatten()[worst]}, half a step is {step.flatten()[worst] / 2}"
    # constant groups (scale 1, every code 0) come back exactly
    for i in range(rows):
        if granularity == "row" and bool((x[i] == x[i, 0]).all()):
            assert torch.equal(y[i], x[i])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_non_finite_values(bad):
    x = gaussian((2, 16))
    x[1, 3] = bad
    for granularity in GRANULARITIES:
        with pytest.raises(QuantError, match="non-finite"):
            quantize(x, 4, granularity)
    with pytest.raises(CodecError, match="non-finite"):  # and the codec says which codec refused it
        get_codec("int4").encode(x)


def test_quantize_refuses_a_range_wider_than_float32():
    x = torch.tensor([[-3e38, 3e38]])  # both finite, their difference is not
    with pytest.raises(QuantError, match="range"):
        quantize(x, 8, "row")


# ==== bit packing =============================================================================

@st.composite
def code_arrays(draw):
    bits = draw(st.sampled_from(BITS))
    count = draw(st.integers(0, 1500))
    codes = draw(arrays(np.uint8, count, elements=st.integers(0, 2**bits - 1)))
    return bits, codes


@settings(max_examples=300, **PROPERTY)
@given(case=code_arrays())
def test_pack_unpack_round_trip(case):
    """Any count (not only multiples of 8) and any codes below 2^bits come back exactly, from exactly
    ceil(count * bits / 8) bytes."""
    bits, codes = case
    packed = pack_bits(torch.from_numpy(codes), bits)
    assert isinstance(packed, bytes)
    assert len(packed) == packed_size(codes.size, bits) == math.ceil(codes.size * bits / 8)
    back = unpack_bits(packed, bits, codes.size)
    assert back.dtype == torch.uint8 and back.shape == (codes.size,)
    assert np.array_equal(back.numpy(), codes)
    assert torch.equal(unpack_bits(memoryview(packed), bits, codes.size), back)  # frames hand in memoryviews


def test_pack_bits_is_dense_and_least_significant_bit_first():
    """The bit order is part of the wire format: pin it with hand-computed bytes."""
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4) == bytes([0x21])
    assert pack_bits(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2) == bytes([0b10_01_00_11])
    codes = [1, 2, 3, 4, 5, 6, 7, 0]  # int3: eight codes, 24 bits, 3 bytes
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert pack_bits(torch.tensor(codes, dtype=torch.uint8), 3) == word.to_bytes(3, "little")
    codes = [63, 0, 21, 42]  # int6: four codes, 3 bytes
    word = sum(c << (6 * i) for i, c in enumerate(codes))
    assert pack_bits(torch.tensor(codes, dtype=torch.uint8), 6) == word.to_bytes(3, "little")
    # a partial last group: 3 int3 codes take 9 bits -> 2 bytes
    assert pack_bits(torch.tensor([7, 7, 7], dtype=torch.uint8), 3) == bytes([0xFF, 0x01])
    assert pack_bits(torch.tensor([200, 7], dtype=torch.uint8), 8) == bytes([200, 7])


@pytest.mark.parametrize("bits", BITS)
def test_unpack_refuses_the_wrong_number_of_bytes(bits):
    packed = pack_bits(torch.zeros(100, dtype=torch.uint8), bits)
    for data in (packed[:-1], packed + b"\0"):
        with pytest.raises(QuantError, match=f"{packed_size(100, bits)} bytes"):
            unpack_bits(data, bits, 100)


# ==== payload sizes: the packing is real =======================================================

@pytest.mark.parametrize("codec, size", [("fp32", 16384), ("fp16", 8192), ("bf16", 8192),
                                         ("int8", 4096 + 8), ("int6", 3072 + 8), ("int4", 2048 + 8),
                                         ("int3", 1536 + 8), ("int2", 1024 + 8)])
def test_payload_of_a_4096_row(codec, size):
    """One (1, 4096) row: D * bits / 8 bytes of codes plus one float32 zero and scale."""
    x = gaussian((1, 4096))
    c = get_codec(codec)
    assert c.raw_size((1, 4096)) == size
    assert len(c.encode(x)) == size
    frame = encode_frame(Frame("hidden", tensor=x, codec=c))
    assert size < len(frame) < size + 120  # the frame is the payload plus a short header


def test_int_frames_are_a_fraction_of_fp32_frames():
    x = gaussian((1, 4096))
    size = {name: len(encode_frame(Frame("hidden", tensor=x, codec=name))) for name in ("fp32", "fp16", "int8", "int4", "int2")}
    assert size["fp16"] < 0.51 * size["fp32"]
    assert size["int8"] < 0.26 * size["fp32"]
    assert size["int4"] < 0.13 * size["fp32"]  # an eighth of fp32, a quarter of fp16
    assert size["int4"] < 0.26 * size["fp16"]
    assert size["int2"] < 0.07 * size["fp32"]


LAYOUT_CASES = [(codec, shape) for codec in ("int8", "int6", "int4", "int3", "int2", "int4:tensor", "int3:channel",
                                             "int8+out:4", "int2:channel+out:3", "int6:tensor+out:1")
                for shape in [(1, 576), (3, 7), (5, 33), (2, 3, 64), (1, 1)]]


@pytest.mark.parametrize("codec, shape", LAYOUT_CASES)
def test_raw_size_follows_the_documented_layout(codec, shape):
    """groups x (zero, scale) float32 + rows x K x (uint16 index, fp16 value) + ceil(rows x D x bits / 8)."""
    c = get_codec(codec)
    spec = c.spec
    if spec.outliers > shape[-1]:
        pytest.skip("more outliers than values in a row (refused, tested below)")
    rows, width = math.prod(shape[:-1]), shape[-1]
    groups = {"row": rows, "tensor": 1, "channel": width}[spec.granularity]
    expected = groups * 8 + rows * spec.outliers * 4 + math.ceil(rows * width * spec.bits / 8)
    assert c.raw_size(shape) == expected
    payload = c.encode(gaussian(shape, seed=3))
    assert len(payload) == expected
    int_payload(c, payload, shape)  # and it parses by the documented layout with nothing left over


def test_payload_fields_hold_what_the_layout_says():
    """zero = row minimum and scale = range / levels of the row with its outliers set to 0, outlier
    indices are the K largest |x|, their values fp16, and the codes decode to within half a step."""
    x = gaussian((3, 64), seed=5) * 4
    c = get_codec("int6+out:3")
    f = int_payload(c, c.encode(x), x.shape)
    top = x.abs().topk(3, dim=1).indices
    assert [set(r) for r in f["idx"].tolist()] == [set(r) for r in top.tolist()]
    assert np.array_equal(f["values"], np.take_along_axis(x.numpy(), f["idx"].astype(np.int64), 1).astype(np.float16))
    inner = x.scatter(1, top, 0.0)
    assert np.array_equal(f["zero"], inner.amin(1).numpy())
    assert np.allclose(f["scale"], ((inner.amax(1) - inner.amin(1)) / 63).numpy(), rtol=1e-6)
    zero, scale = torch.tensor(f["zero"])[:, None], torch.tensor(f["scale"])[:, None]
    assert bool(((zero + f["codes"].float() * scale - inner).abs() <= scale / 2 + 1e-5).all())


def test_outliers_add_four_bytes_per_row_and_outlier():
    for k in (1, 4, 16):
        base, withk = get_codec("int4"), get_codec(f"int4+out:{k}")
        for shape in [(1, 576), (33, 576), (7, 64)]:
            assert withk.raw_size(shape) - base.raw_size(shape) == shape[0] * k * 4


def test_too_many_outliers_for_a_row_is_refused():
    c = get_codec("int8+out:65")
    with pytest.raises(CodecError, match="65 outliers"):
        c.encode(gaussian((2, 64)))
    with pytest.raises(CodecError, match="65 outliers"):
        c.raw_size((2, 64))


@pytest.mark.parametrize("shape", [(), (0, 576), (3, 0)])
def test_empty_shapes_are_refused(shape):
    with pytest.raises(CodecError, match="shape"):
        get_codec("int4").raw_size(shape)


# ==== every codec round-trips every shape and dtype ===========================================

@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_every_shape_and_dtype(codec):
    """Shape and dtype come back right for every (L, D) and every input / output dtype; float codecs
    give exactly the value rounded to their type; integer codes stay within their half-step bound
    (per value, or per row in L2 after the orthonormal rotation)."""
    c = get_codec(codec)
    spec = c.spec
    for shape in SHAPES:
        for in_dtype in DTYPES:
            t = gaussian(shape, seed=shape[0] + shape[1], dtype=in_dtype) * 3
            x = t.float()  # what the codec sees
            payload = c.encode(t)
            if not spec.zstd:
                assert len(payload) == c.raw_size(shape)
            y = c.decode(payload, shape)  # float32
            assert y.shape == shape and y.dtype == torch.float32, (codec, shape, in_dtype)
            for out_dtype in DTYPES:
                z = c.decode(payload, shape, out_dtype)
                assert z.shape == shape and z.dtype == out_dtype
                assert torch.equal(z, y.to(out_dtype)), (codec, shape, in_dtype, out_dtype)
            where = f"{codec} {shape} from {in_dtype}"
            if spec.bits is None and not spec.hadamard:
                exact = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.format]
                assert torch.equal(y, x.to(exact).float()), where
                if spec.format == "fp32":
                    assert torch.equal(y.view(torch.int32), x.view(torch.int32)), where  # bit for bit
                continue
            if spec.bits is None:  # had+float: the rounding of the rotated values, unchanged by rotating back
                unit = {"fp32": 2**-24, "fp16": 2**-11, "bf16": 2**-8}[spec.format]
                err = (y - x).norm(dim=1)
                assert bool((err <= (unit + 1e-6) * x.norm(dim=1) + 1e-6).all()), where
                continue
            raw = zstandard.ZstdDecompressor().decompress(payload) if spec.zstd else payload
            f = int_payload(c, raw, shape)
            assert int(f["codes"].max()) < 2**spec.bits
            step = step_per_value(spec.granularity, f["scale"], shape[0], shape[1]).clone()
            tol = 1e-5 * float(x.abs().max()) + 1e-6
            if spec.outliers:
                idx = torch.from_numpy(f["idx"].astype(np.int64))
                step.scatter_(1, idx, 0.0)  # outliers travel as fp16: bounded below, not by the step
            if not spec.hadamard:
                err = (y - x).abs()
                if spec.outliers:
                    err.scatter_(1, idx, 0.0)
                    assert torch.equal(y.gather(1, idx), x.gather(1, idx).half().float()), where
                assert bool((err <= step / 2 + tol).all()), where
            else:  # the error of the rotated row, rotated back: its L2 norm is unchanged
                rotated = rotation(shape[1], 0).forward(x)
                bound = (step / 2).square().sum(1)
                if spec.outliers:
                    bound += (rotated.gather(1, idx).abs() * 2**-11).square().sum(1)  # fp16 rounding
                err = (y - x).norm(dim=1)
                assert bool((err <= bound.sqrt() + 1e-5 * x.norm(dim=1) + 1e-6).all()), where


@pytest.mark.parametrize("codec", ["fp32", "int4", "had+int3+out:2", "int6+zstd"])
def test_three_dimensional_tensors_are_rows_of_the_last_dimension(codec):
    x = gaussian((2, 5, 64), seed=9)
    c = get_codec(codec)
    y = round_trip(c, x)
    assert y.shape == (2, 5, 64)
    flat = round_trip(c, x.reshape(10, 64))
    assert torch.equal(y.reshape(10, 64), flat)


# ==== how much error each format makes ========================================================

@pytest.mark.parametrize("bits", [8, 6, 4, 3])
@pytest.mark.parametrize("width", [576, 64])
def test_int_error_is_what_the_step_predicts(bits, width):
    """Rounding to a step s makes an error uniform in [-s/2, s/2]: RMS s / sqrt(12). The measured
    relative L2 error is within 15% of that prediction, so an intN codec really has N bits
    (not more: the error is not far below; not fewer: not far above)."""
    x = gaussian((33, width), seed=bits)
    y = round_trip(f"int{bits}", x)
    step = (x.amax(1) - x.amin(1)) / (2**bits - 1)
    predicted = float((step.square() * width / 12).sum().sqrt() / x.norm())
    measured = rel_err(y, x)
    assert 0.85 * predicted < measured < 1.15 * predicted, (measured, predicted)


@pytest.mark.parametrize("codec, limit", [("int8", 0.01), ("int6", 0.035), ("int4", 0.14), ("int3", 0.30),
                                          ("int2", 0.70), ("int8:channel", 0.01), ("int8:tensor", 0.012),
                                          ("had+int8", 0.01), ("had+int4", 0.14)])
def test_relative_error_on_gaussian_rows(codec, limit):
    """Gaussian rows of 576 span about 6.2 sigma: the relative L2 error is about
    6.2 / (2^bits - 1) / sqrt(12) (int8: 0.007, int6: 0.028, int4: 0.12, int3: 0.26, int2: 0.6)."""
    x = gaussian((33, 576), seed=11)
    assert rel_err(round_trip(codec, x), x) < limit


def test_hadamard_rescues_int4_from_outlier_channels():
    """Three channels at 100x stretch every row's range: plain int4 flattens all the other values,
    after the rotation the range is set by the row's norm instead."""
    x = with_outlier_channels((33, 576))
    plain, rotated = rel_err(round_trip("int4", x), x), rel_err(round_trip("had+int4", x), x)
    assert rotated < 0.5 * plain, (rotated, plain)
    assert rotated < 0.15
    assert rel_err(round_trip("had+int3", x), x) < rel_err(round_trip("int3", x), x)


def test_outlier_channels_make_int8_much_better():
    x = with_outlier_channels((33, 576))
    plain, kept = rel_err(round_trip("int8", x), x), rel_err(round_trip("int8+out:4", x), x)
    assert kept < plain / 10, (kept, plain)


def test_outliers_come_back_exactly_as_fp16():
    """The K largest |x| of each row travel as fp16 beside the codes and come back as exactly that."""
    x = with_outlier_channels((7, 576), seed=4) * 7
    for k in (1, 4, 16):
        for codec in (f"int4+out:{k}", f"int2:channel+out:{k}", f"int8:tensor+out:{k}"):
            y = round_trip(codec, x)
            idx = x.abs().topk(k, dim=1).indices
            assert torch.equal(y.gather(1, idx), x.gather(1, idx).half().float()), codec


def test_outlier_beyond_fp16_range_is_refused():
    x = gaussian((2, 64))
    x[1, 5] = 1e5
    with pytest.raises(CodecError, match="fp16 range"):
        get_codec("int8+out:2").encode(x)


# ==== the rotation =============================================================================

@pytest.mark.parametrize("n", [1, 2, 64, 96, 576, 1000, 3 * 1024, 4096])
def test_rotation_is_orthonormal(n):
    """forward is an orthonormal matrix Q (Q Q^T is the identity), inverse is Q^T; for the big widths
    checked on 32 random vectors (their Gram matrix is unchanged)."""
    r = Rotation(n, seed=7)
    if n <= 1024:
        eye = torch.eye(n)
        q = r.forward(eye)  # row i = Q e_i, i.e. Q^T
        torch.testing.assert_close(q @ q.T, eye, atol=2e-5, rtol=0)
        torch.testing.assert_close(r.inverse(q), eye, atol=2e-5, rtol=0)
    else:
        v = gaussian((32, n), seed=1)
        w = r.forward(v)
        torch.testing.assert_close(w @ w.T, v @ v.T, atol=2e-2, rtol=1e-5)
    x = gaussian((5, n), seed=n) * 10
    y = r.forward(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.inverse(y), x, rtol=0, atol=1e-4)
    if n > 1:
        assert rel_err(y, x) > 0.5  # it really rotates


def test_rotation_depends_on_the_seed_only():
    x = gaussian((3, 576))
    a, b, c = Rotation(576, 1), Rotation(576, 1), Rotation(576, 2)
    assert torch.equal(a.forward(x), b.forward(x))
    assert not torch.allclose(a.forward(x), c.forward(x), atol=1e-3)
    assert rotation(576, 1) is rotation(576, 1)  # cached per (width, seed)
    torch.testing.assert_close(c.inverse(c.forward(x)), x, atol=1e-4, rtol=0)


def test_rotation_spreads_a_one_hot_outlier():
    """A single huge channel becomes small values in every channel: no entry of Q e_j is bigger than
    sqrt(2 / n) (exactly 1 / sqrt(n) when n is a power of two)."""
    for n in (64, 4096, 576):
        r = Rotation(n, seed=3)
        for j in (0, 5, n - 1):
            e = torch.zeros(1, n)
            e[0, j] = 1000.0
            y = r.forward(e)
            assert float(y.abs().max()) <= 1000.0 * math.sqrt(2 / n) + 1e-3
            assert int((y.abs() > 1000.0 / (4 * math.sqrt(n))).sum()) > n / 2  # spread over most channels
            if n & (n - 1) == 0:
                torch.testing.assert_close(y.abs(), torch.full((1, n), 1000.0 / math.sqrt(n)))


@pytest.mark.parametrize("n", [0, 2051, 1025 * 4])
def test_rotation_refuses_widths_it_cannot_rotate(n):
    with pytest.raises(RotationError, match=str(n)):
        Rotation(n, seed=0)
    if n:
        with pytest.raises(CodecError, match="odd factor"):
            get_codec("had+int8").encode(torch.zeros(1, n))


def test_had_codec_is_rotate_then_the_plain_codec():
    """had+F sends exactly F's payload of the rotated rows, with the session's seed."""
    x = with_outlier_channels((7, 576), seed=2)
    for seed in (0, 12345):
        for fmt in ("int4", "int3", "int8:channel"):
            had, plain = make_codec(f"had+{fmt}", seed=seed), get_codec(fmt)
            payload = had.encode(x)
            assert payload == plain.encode(rotation(576, seed).forward(x))
            assert torch.equal(had.decode(payload, x.shape), rotation(576, seed).inverse(plain.decode(payload, x.shape)))
    assert make_codec("had+int4", seed=1).encode(x) != make_codec("had+int4", seed=2).encode(x)


def test_had_with_outliers_rotates_only_the_rest():
    """had+int3+out:2: the outliers are taken out before the rotation, travel as fp16 and come back
    exactly; the rotation then works on a row without them, so the error is lower than rotating all."""
    x = with_outlier_channels((7, 576), seed=2)
    codec = make_codec("had+int3+out:2", seed=5)
    y = codec.decode(codec.encode(x), x.shape)
    top = x.abs().topk(2, dim=1).indices
    assert torch.equal(y.gather(1, top), x.gather(1, top).half().float())
    plain_had = make_codec("had+int3", seed=5)
    assert rel_err(y, x) < rel_err(plain_had.decode(plain_had.encode(x), x.shape), x)


@pytest.mark.parametrize("codec, unit", [("had+fp32", 2**-24), ("had+fp16", 2**-11), ("had+bf16", 2**-8)])
def test_had_with_floats_round_trips(codec, unit):
    """A rotated float payload decodes back to float32 and rotates back: the error is the rounding of
    the rotated values to the format (at most `unit` of each), unchanged in L2 by the inverse rotation.
    (HEAD 9c11c82 decoded fp16/bf16 payloads to half tensors and the float32 rotation raised.)"""
    x = with_outlier_channels((7, 576), seed=8)
    y = round_trip(codec, x)
    assert y.dtype == torch.float32
    err = (y - x).norm(dim=1)
    assert bool((err <= (unit + 1e-6) * x.norm(dim=1)).all()), (err / x.norm(dim=1)).max()
    if unit > 2**-24:
        assert rel_err(y, x) > unit / 16  # it really was narrowed


# ==== zstd ======================================================================================

@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int6", "int4:channel", "had+int4+out:2",
                                   "int3:tensor"])
def test_zstd_is_lossless_over_the_payload(codec):
    """codec+zstd decodes to exactly what codec gives, and its payload decompresses to codec's payload."""
    plain, packed = get_codec(codec), get_codec(codec + "+zstd")
    assert packed.name == parse_codec(codec + "+zstd").name and packed.spec.zstd
    for shape in [(1, 576), (33, 576), (7, 64)]:
        x = with_outlier_channels(shape, seed=shape[0])
        raw, z = plain.encode(x), packed.encode(x)
        assert zstandard.ZstdDecompressor().decompress(z) == raw
        assert packed.raw_size(shape) == plain.raw_size(shape)
        assert torch.equal(packed.decode(z, shape), plain.decode(raw, shape))


def test_zstd_shrinks_redundant_payloads():
    x = torch.zeros(33, 576)
    x[:, 7] = 3.0
    assert len(get_codec("fp32+zstd").encode(x)) < len(get_codec("fp32").encode(x)) / 20
    assert len(get_codec("int8+zstd").encode(x)) < len(get_codec("int8").encode(x)) / 5


# ==== PCA basis files ===========================================================================

D_PCA, R_PCA = 64, 8


def subspace_rows(n: int, space: int, draw: int = 0, rank: int = R_PCA, width: int = D_PCA) -> torch.Tensor:
    """n rows mean + c @ B^T of the affine subspace number `space` (B an orthonormal (width, rank)
    basis, coefficient scales 10 down to 1); `draw` picks the coefficients."""
    g = torch.Generator().manual_seed(space)
    basis, _ = torch.linalg.qr(torch.randn(width, rank, generator=g))
    mean = torch.randn(width, generator=g) * 3
    coeffs = torch.randn(n, rank, generator=torch.Generator().manual_seed(1000 + draw)) * torch.linspace(10, 1, rank)
    return mean + coeffs @ basis.T


@pytest.fixture(scope="module")
def basis(tmp_path_factory) -> Basis:
    """A basis for points 3 and 5 of a width-64 'model', each fitted on data in an 8-dim subspace."""
    path = tmp_path_factory.mktemp("basis") / "test.basis.safetensors"
    fits = {3: fit_pca(subspace_rows(300, space=3), R_PCA), 5: fit_pca(subspace_rows(300, space=5), R_PCA)}
    assert save_basis(path, fits, model="test-model", hidden_size=D_PCA, about="test") == path
    return Basis.load(path)


def test_basis_file_round_trip(basis):
    data = basis.path.read_bytes()
    assert basis.sha256 == hashlib.sha256(data).hexdigest()
    assert data[8:9] == b"{"  # a safetensors file: 8-byte length, then a JSON header (no pickle)
    assert basis.points == [3, 5] and basis.max_rank == R_PCA
    assert basis.hidden_size == D_PCA and basis.model == "test-model" and basis.meta["about"] == "test"
    for p in basis.points:
        comps = basis.components[p]
        assert comps.shape == (D_PCA, R_PCA)
        torch.testing.assert_close(comps.T @ comps, torch.eye(R_PCA), atol=1e-5, rtol=0)
        var = basis.variances[p]
        assert bool((var[:-1] >= var[1:]).all())  # sorted by variance
        assert basis.explained(p, R_PCA) > 0.999999  # the data is exactly rank 8
        # coefficient scales 10, 8.7, ..., 1: the first direction holds 100 / 311 of the variance
        assert abs(basis.explained(p, 1) - 100 / 311) < 0.08
        assert basis.explained(p, 1) < basis.explained(p, 4) < basis.explained(p, 7) < 1


def test_saving_the_same_basis_twice_gives_the_same_hash(tmp_path):
    fits = {3: fit_pca(subspace_rows(300, space=3), R_PCA)}
    hashes = {Basis.load(save_basis(tmp_path / f"b{i}.safetensors", fits, model="m", hidden_size=D_PCA,
                                    about="same")).sha256 for i in range(4)}
    assert len(hashes) == 1, hashes


def test_pca_reconstructs_data_in_the_subspace(basis):
    """Rank-R coefficients of data that lies in the fitted R-dim subspace (plus the mean) rebuild it."""
    x = subspace_rows(33, space=3, draw=1)  # fresh rows of the subspace point 3 was fitted on
    c = make_codec(f"pca:{R_PCA}+fp32", basis=basis, point=3)
    payload = c.encode(x)
    assert len(payload) == c.raw_size(x.shape) == 33 * R_PCA * 4  # R float32 per row instead of D
    y = c.decode(payload, x.shape)
    assert y.shape == x.shape and rel_err(y, x) < 1e-5
    assert rel_err(round_trip(make_codec(f"pca:{R_PCA}+int8", basis=basis, point=3), x), x) < 0.01
    # the projection is what crosses: pca:R+int8 sends int8's payload of the R coefficients
    projection = basis.projection(3, R_PCA)
    assert make_codec(f"pca:{R_PCA}+int8", basis=basis, point=3).encode(x) == get_codec("int8").encode(projection.encode(x))


def test_pca_lower_rank_loses_exactly_the_dropped_variance(basis):
    x = subspace_rows(300, space=3)
    for rank in (2, 4, 6):
        y = round_trip(make_codec(f"pca:{rank}+fp32", basis=basis, point=3), x)
        lost = float((y - x).square().sum() / (x - x.mean(0)).square().sum())
        assert abs(lost - (1 - basis.explained(3, rank))) < 1e-3, rank


def test_pca_codec_of_another_point_is_another_codec(basis):
    x = subspace_rows(10, space=3, draw=2)
    at3 = make_codec(f"pca:{R_PCA}+fp32", basis=basis, point=3)
    at5 = make_codec(f"pca:{R_PCA}+fp32", basis=basis, point=5)
    assert at3.name == at5.name  # the name does not say the point; the session does
    assert rel_err(round_trip(at5, x), x) > 0.1


@pytest.mark.parametrize("fmt, unit", [("", 2**-11), ("+fp16", 2**-11), ("+bf16", 2**-8), ("+had+fp16", 2**-11)])
def test_pca_with_half_float_coefficients(basis, fmt, unit):
    """pca:R sends fp16 coefficients by default; they come back as float32 and rebuild the row up to
    their rounding. (HEAD 9c11c82 decoded them to a half tensor that Projection.decode refused.)"""
    c = make_codec(f"pca:{R_PCA}{fmt}", basis=basis, point=3)
    assert c.spec.format == ("bf16" if "bf16" in fmt else "fp16")
    x = subspace_rows(5, space=3, draw=3)
    y = round_trip(c, x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    coeffs = basis.projection(3, R_PCA).encode(x)
    assert float((y - x).norm()) <= (unit + 1e-5) * float(coeffs.norm()) + 1e-4
    assert len(c.encode(x)) == 5 * R_PCA * 2


def test_pca_codecs_need_a_basis_and_a_point(basis):
    with pytest.raises(CodecError, match="basis"):
        make_codec("pca:8")
    with pytest.raises(CodecError, match="split point"):
        make_codec("pca:8", basis=basis)
    with pytest.raises(CodecError, match="basis"):
        get_codec("pca:8+int8")


def test_basis_lacks_a_point_or_a_rank(basis):
    with pytest.raises(BasisError, match="split point 7") as info:
        basis.projection(7, 4)
    assert "3, 5" in str(info.value)  # and says which points it has
    with pytest.raises(BasisError, match=f"rank {R_PCA + 1}.*up to {R_PCA}"):
        basis.projection(3, R_PCA + 1)
    with pytest.raises(CodecError, match=f"rank {R_PCA + 1}"):
        make_codec(f"pca:{R_PCA + 1}", basis=basis, point=3)
    with pytest.raises(CodecError, match="split point 4"):
        make_codec("pca:4", basis=basis, point=4)


def test_pca_codec_refuses_another_width(basis):
    with pytest.raises(CodecError, match=f"width {D_PCA}"):
        make_codec("pca:4+int8", basis=basis, point=3).encode(torch.zeros(1, 576))


def test_session_codecs_check_the_basis_hash(basis):
    up, down = session_codecs(f"pca:{R_PCA}+int8", "fp32", seed=1, x=3, y=5, basis=basis, basis_sha256=basis.sha256)
    assert up.name == f"pca:{R_PCA}+int8" and up.projection is not None and down.name == "fp32"
    one_off = basis.sha256[:-1] + ("1" if basis.sha256.endswith("0") else "0")
    for stated in (None, "0" * 64, one_off, basis.sha256.upper()):
        with pytest.raises(CodecError, match="basis mismatch") as info:
            session_codecs("fp32", f"pca:{R_PCA}", seed=1, x=3, y=5, basis=basis, basis_sha256=stated)
        assert "downlink" in str(info.value)
    # codecs without pca do not care about the hash
    session_codecs("int8", "had+int4", seed=1, x=3, y=5, basis=basis, basis_sha256=None)


def test_loading_a_bad_basis_file_says_what_is_wrong(basis, tmp_path):
    with pytest.raises(BasisError, match="no basis file"):
        Basis.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04 this is not a safetensors file" * 10)
    with pytest.raises(BasisError, match="not a readable safetensors"):
        Basis.load(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(basis.path.read_bytes()[:-100])
    with pytest.raises(BasisError, match="not a readable safetensors"):
        Basis.load(truncated)
    other = tmp_path / "weights.safetensors"  # a valid safetensors file that is not a basis
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(BasisError, match="not a lambdasplit PCA basis"):
        Basis.load(other)
    meta = {"lambdasplit": json.dumps({"format": "lambdasplit-pca/1", "hidden_size": 64})}
    odd = tmp_path / "odd.safetensors"
    save_file({"mean.3": torch.zeros(64), "components.3": torch.zeros(32, 4), "variance.3": torch.zeros(4)},
              str(odd), metadata=meta)
    with pytest.raises(BasisError, match="split point 3 do not fit"):
        Basis.load(odd)
    stray = tmp_path / "stray.safetensors"
    save_file({"mean.3": torch.zeros(64), "extra": torch.zeros(1)}, str(stray), metadata=meta)
    with pytest.raises(BasisError, match="unexpected tensor 'extra'"):
        Basis.load(stray)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata=meta)
    with pytest.raises(BasisError, match="holds no basis"):
        Basis.load(empty)


# ==== codec names ===============================================================================

@pytest.mark.parametrize("text, name", [
    ("int4+had", "had+int4"), ("zstd+int8+out:4", "int8+out:4+zstd"), ("pca:64", "pca:64+fp16"),
    ("int8:row", "int8"), ("out:2+int4:channel+had", "had+int4:channel+out:2"),
    ("zstd+int8+had+pca:32", "pca:32+had+int8+zstd"), ("FP16", "fp16"), (" int4 + had ", "had+int4"),
    ("out:1+int3:tensor", "int3:tensor+out:1"), ("fp32", "fp32"), ("bf16+zstd", "bf16+zstd"),
    ("pca:128+int8", "pca:128+int8"), ("had+fp32", "had+fp32"),
])
def test_canonical_names(text, name):
    spec = parse_codec(text)
    assert spec.name == str(spec) == name
    assert parse_codec(name) == spec  # the canonical name is a fixed point
    if not spec.rank:
        assert get_codec(text).name == name


@st.composite
def specs(draw) -> CodecSpec:
    fmt = draw(st.sampled_from(["fp32", "fp16", "bf16", "int8", "int6", "int4", "int3", "int2"]))
    is_int = fmt.startswith("int")
    return CodecSpec(format=fmt, granularity=draw(st.sampled_from(GRANULARITIES)) if is_int else "row",
                     outliers=draw(st.integers(0, 256)) if is_int else 0, hadamard=draw(st.booleans()),
                     rank=draw(st.sampled_from([0, 1, 32, 65536])), zstd=draw(st.booleans()))


@settings(max_examples=300, **PROPERTY)
@given(spec=specs(), data=st.data())
def test_parts_may_come_in_any_order_and_case(spec, data):
    parts = data.draw(st.permutations(spec.name.split("+")))
    text = "+".join(p.upper() if data.draw(st.booleans()) else p for p in parts)
    assert parse_codec(text) == spec
    assert parse_codec(text).name == spec.name
    assert spec.lossless == (spec.format == "fp32" and not spec.hadamard and not spec.rank)


@pytest.mark.parametrize("text, words", [
    ("int5", ["int5 is not offered", "8, 6, 4, 3, 2"]),
    ("int4:diag", ["granularity 'diag'", "row, tensor, channel"]),
    ("out:0", ["'out:0'", "1 to 256"]),
    ("int8+out:257", ["1 to 256"]),
    ("fp16+out:4", ["fp16 has no integer codes"]),
    ("int8+int4", ["sets format twice"]),
    ("int8+zstd+zstd", ["sets zstd twice"]),
    ("had:3", ["unknown codec part 'had:3'", "joined by '+'"]),
    ("", ["a codec name is needed"]),
    ("   ", ["a codec name is needed"]),
    ("pca:x", ["'pca:x' needs a whole number"]),
    ("pca:65537", ["1 to 65536"]),
    ("fp16:row", ["fp16 takes no option"]),
    ("out:4", ["names no number format"]),
    ("had+zstd", ["names no number format"]),
    ("int8++zstd", ["unknown codec part ''"]),
    ("fp64", ["unknown codec part 'fp64'"]),
    ("int-4", ["unknown codec part 'int-4'"]),
])
def test_bad_names_are_refused_clearly(text, words):
    with pytest.raises(SpecError) as info:
        parse_codec(text)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    with pytest.raises(CodecError):  # the codec layer turns it into its own error, message kept
        get_codec(text)


def test_non_string_names_are_refused():
    for value in (None, 4, b"int4"):
        with pytest.raises(SpecError, match="a codec name is needed"):
            parse_codec(value)


@pytest.mark.parametrize("text", ["int\u00b2", "int8+out:\u00b2", "pca:\u00b9", "int08", "int\u0668"])
def test_digits_are_ascii_digits(text):
    try:
        spec = parse_codec(text)
    except SpecError:
        return
    assert spec.name in ("int8",), f"{text!r} parsed to the non-canonical name {spec.name!r}"


# ==== damaged frames ============================================================================

DAMAGE_CODECS = ["int4", "had+int3", "int8+out:4", "fp16+zstd", "int6+zstd", "int2:channel", "fp32"]


def frame_of(codec: str, shape=(3, 64), seed: int = 0) -> tuple[bytes, object, torch.Tensor]:
    c = make_codec(codec, seed=seed)
    x = with_outlier_channels(shape, seed=seed)
    return encode_frame(Frame("hidden", step=2, pos=5, tensor=x, codec=c)), c, x


def split_frame(data: bytes) -> tuple[dict, bytes]:
    magic, version, hlen = PREFIX.unpack_from(data)
    return msgpack.unpackb(data[9:9 + hlen]), data[9 + hlen:]


def with_payload(data: bytes, payload: bytes, **header_fields) -> bytes:
    """The same frame with another payload, a correct CRC and byte count: only the codec can object."""
    header, _ = split_frame(data)
    header.update(nbytes=len(payload), crc=zlib.crc32(payload), **header_fields)
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(b"LSPL", 2, len(packed)) + packed + payload


def refused(data: bytes, code: str | None, *words: str, codec=None) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_frame(data, codec=codec)
    if code is not None:
        assert info.value.code == code, f"code {info.value.code!r} ({info.value}), expected {code!r}"
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    return info.value


@pytest.mark.parametrize("codec", DAMAGE_CODECS)
def test_good_frames_decode_with_their_session_codec(codec):
    """The reference for the damage below: the frame carries the canonical name, and decodes."""
    data, c, x = frame_of(codec, seed=77)
    header, payload = split_frame(data)
    assert header["codec"] == c.name == parse_codec(codec).name and header["shape"] == [3, 64]
    assert header["nbytes"] == len(payload) and header["crc"] == zlib.crc32(payload)
    f = decode_frame(data, codec=c)
    assert f.codec == c.name and f.step == 2 and f.pos == 5 and f.tensor.shape == (3, 64)
    assert torch.equal(f.tensor, c.decode(payload, (3, 64)))


@pytest.mark.parametrize("codec", DAMAGE_CODECS)
def test_any_flipped_payload_byte_is_caught_by_the_crc(codec):
    data, c, _ = frame_of(codec)
    _, payload = split_frame(data)
    start = len(data) - len(payload)
    for i in range(start, len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            refused(bytes(bad), "corrupt", "CRC", codec=c)


@pytest.mark.parametrize("codec", DAMAGE_CODECS)
def test_every_truncation_is_refused(codec):
    data, c, _ = frame_of(codec)
    for n in range(len(data)):
        err = refused(data[:n], None, codec=c)
        assert err.code in ("malformed", "corrupt", "codec") and len(str(err)) > 10, (n, err.code, str(err))


def test_valid_crc_over_bad_scales_is_a_codec_error():
    data, c, _ = frame_of("int4")
    _, payload = split_frame(data)
    rows = 3
    for name, value, offset in [("negative scale", -1.0, 4 * rows), ("nan scale", float("nan"), 4 * rows + 4),
                                ("inf zero", float("inf"), 0), ("nan zero", float("nan"), 8)]:
        bad = payload[:offset] + struct.pack("<f", value) + payload[offset + 4:]
        refused(with_payload(data, bad), "codec", "int4", "corrupt payload", "scale or zero", codec=c)
    data, c, _ = frame_of("had+int3", seed=4)  # the same through the rotation
    _, payload = split_frame(data)
    bad = payload[:12] + struct.pack("<f", -0.5) + payload[16:]
    refused(with_payload(data, bad), "codec", "had+int3", "negative", codec=c)


def test_valid_crc_over_an_outlier_index_past_the_row_is_a_codec_error():
    data, c, _ = frame_of("int8+out:4")
    _, payload = split_frame(data)
    at = 8 * 3 + 2 * 5  # after zero and scale of 3 rows: the 6th index (row 1, second outlier)
    for index in (64, 65535):
        bad = payload[:at] + struct.pack("<H", index) + payload[at + 2:]
        refused(with_payload(data, bad), "codec", "outlier index", "64", codec=c)


def test_valid_crc_over_bad_zstd_is_a_codec_error():
    for codec in ("fp16+zstd", "int6+zstd"):
        data, c, x = frame_of(codec)
        raw = get_codec(codec.replace("+zstd", "")).encode(x)
        assert zstandard.ZstdDecompressor().decompress(split_frame(data)[1]) == raw
        z = zstandard.ZstdCompressor(write_content_size=True)
        refused(with_payload(data, b"this is not zstd at all"), "codec", codec, "zstd", codec=c)
        refused(with_payload(data, z.compress(raw)[:-3]), "codec", "zstd", codec=c)  # cut short
        refused(with_payload(data, z.compress(raw[:-2])), "codec", str(len(raw)), codec=c)  # too little
        refused(with_payload(data, z.compress(raw + b"\0\0")), "codec", str(len(raw)), codec=c)  # too much
        refused(with_payload(data, b""), "codec", codec=c)
    data, c, x = frame_of("int6+zstd")  # well-formed zstd around a payload with a negative scale
    raw = bytearray(get_codec("int6").encode(x))
    raw[12:16] = struct.pack("<f", -2.0)
    refused(with_payload(data, zstandard.ZstdCompressor().compress(bytes(raw))), "codec", "negative", codec=c)


@pytest.mark.parametrize("codec", ["int4", "fp16", "int8+out:4"])
def test_valid_crc_over_a_payload_of_the_wrong_length_is_a_codec_error(codec):
    data, c, _ = frame_of(codec)
    _, payload = split_frame(data)
    for bad in (payload[:-1], payload + b"\0", b""):
        refused(with_payload(data, bad), "codec", f"must be {len(payload)} bytes", codec=c)


def test_a_frame_in_another_codec_is_refused():
    for sent, agreed in [("int4", "int8"), ("had+int3", "int3"), ("int8+out:4", "int8+out:2"),
                         ("fp16+zstd", "fp16"), ("int6+zstd", "int6:tensor+zstd")]:
        data, _, _ = frame_of(sent)
        refused(data, "bad_codec", parse_codec(agreed).name, parse_codec(sent).name, codec=get_codec(agreed))


def test_a_pca_frame_needs_the_session_codec(basis):
    c = make_codec(f"pca:{R_PCA}+int8", basis=basis, point=3)
    x = subspace_rows(4, space=3, draw=4)
    data = encode_frame(Frame("hidden", tensor=x, codec=c))
    assert decode_frame(data, codec=c).tensor.shape == (4, D_PCA)
    refused(data, "codec", "basis")  # without the session's codec there is no basis to decode with


@pytest.mark.parametrize("codec", ["int4", "had+int3", "int8+out:4", "fp16+zstd", "int6+zstd", "bf16",
                                   "int2:channel+out:1"])
@settings(max_examples=120, **PROPERTY)
@given(data=st.data())
def test_arbitrary_payload_with_a_valid_crc_never_crashes(codec, data):
    """Whatever bytes arrive with a right CRC (a sender that is buggy or hostile), the decoder gives a
    tensor of the frame's shape, or a FrameError: never another exception."""
    frame, c, _ = frame_of(codec, shape=(2, 64))
    _, payload = split_frame(frame)
    how = data.draw(st.sampled_from(["random", "overwrite", "resize"]))
    if how == "random":
        bad = data.draw(st.binary(min_size=0, max_size=len(payload) + 16))
    elif how == "overwrite":
        # zstd codecs: damage what is inside the zstd frame (its own header is damaged, exhaustively,
        # in test_damaged_zstd_frame_header_is_a_frame_error)
        inner = zstandard.ZstdDecompressor().decompress(payload) if c.spec.zstd else payload
        bad = bytearray(inner)
        for _ in range(data.draw(st.integers(1, 8))):
            bad[data.draw(st.integers(0, len(bad) - 1))] = data.draw(st.integers(0, 255))
        bad = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(bad)) if c.spec.zstd else bytes(bad)
    else:
        n = data.draw(st.integers(0, len(payload) + 8))
        bad = (payload + bytes(8))[:n]
    try:
        f = decode_frame(with_payload(frame, bad), codec=c)
    except FrameError as exc:
        assert exc.code in ("codec", "malformed", "non_finite") and str(exc)
    else:
        assert f.kind == "hidden" and f.tensor.shape == (2, 64) and f.tensor.dtype == torch.float32


@pytest.mark.parametrize("codec", ["fp16+zstd", "int6+zstd"])
def test_damaged_zstd_frame_header_is_a_frame_error(codec):
    """Every value of every byte of the zstd frame header (magic, descriptor, sizes), under a valid CRC:
    a FrameError or a tensor, never another exception."""
    data, c, _ = frame_of(codec, shape=(2, 64))
    _, payload = split_frame(data)
    escaped = []
    for at in range(12):
        for value in range(256):
            bad = bytearray(payload)
            bad[at] = value
            try:
                decode_frame(with_payload(data, bytes(bad)), codec=c)
            except FrameError:
                pass
            except Exception as exc:  # noqa: BLE001 - this is what the test looks for
                escaped.append(f"byte {at} = {value:#04x}: {type(exc).__name__}")
    assert not escaped, f"{len(escaped)} damaged headers escaped as other exceptions: {escaped[:5]}"


def test_zstd_payload_is_not_decompressed_past_the_expected_size():
    """A small zstd payload that expands to far more than the shape allows is refused before it is
    expanded: the decoder's memory stays near the frame's size."""
    data, c, _ = frame_of("fp16+zstd", shape=(1, 576))
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    assert len(bomb) < 32 << 10
    frame = with_payload(data, bomb)
    tracemalloc.start()
    try:
        refused(frame, "codec", codec=c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decoding a {len(frame)}-byte frame took {peak >> 20} MiB"


# ==== values that would decode to a silently wrong tensor ========================================

def test_fp16_refuses_values_it_cannot_hold():
    """fp16 tops out at 65504: a larger value would arrive as inf, so the sender refuses it."""
    x = gaussian((2, 64))
    x[1, 5] = 70000.0
    with pytest.raises(CodecError, match="fp16 range"):
        get_codec("fp16").encode(x)
    assert torch.isinf(get_codec("bf16").decode(get_codec("bf16").encode(x), x.shape)).sum() == 0  # bf16 holds it


def test_valid_crc_over_a_huge_scale_is_a_codec_error():
    """A finite but absurd scale would decode to inf: refused, not passed on."""
    data, codec, _ = frame_of("int8", shape=(1, 64))
    header, payload = split_frame(data)
    payload = bytearray(payload)
    payload[4:8] = struct.pack("<f", 3e38)  # the row's scale
    refused(with_payload(data, bytes(payload)), "codec", "not finite", codec=codec)


@pytest.mark.parametrize("text", ["int8:", "fp16:", "out:+int4", "int4+pca:"])
def test_a_colon_needs_something_after_it(text):
    with pytest.raises(SpecError):
        parse_codec(text)
