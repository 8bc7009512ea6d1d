"""Frames and codecs (round trips and every rejection path), and token sampling."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
import torch

from lambdasplit.client.sampling import Sampler, SamplingParams
from lambdasplit.wire.codecs import PARTS, CodecError, get_codec
from lambdasplit.wire.frame import MAGIC, VERSION, Frame, FrameError, Limits, decode_frame, encode_frame

PREFIX = struct.Struct("<4sBI")


def raw_frame(header: dict, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = VERSION,
              hlen: int | None = None) -> bytes:
    """Build a frame by hand, so that every field can be made wrong on purpose (a right CRC unless given)."""
    if header.get("kind") == "hidden":
        header = {"crc": zlib.crc32(payload), **header}
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(magic, version, len(packed) if hlen is None else hlen) + packed + payload


def good_header(shape=(2, 4), codec="fp32", **over) -> dict:
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}.get(codec, 4)
    n = 1
    for s in shape:
        n *= s
    header = {"kind": "hidden", "step": 3, "pos": 7, "shape": list(shape), "codec": codec, "nbytes": n * itemsize}
    header.update(over)
    return header


def rejects(data: bytes, code: str, limits: Limits = Limits(), *words: str) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_frame(data, limits)
    assert info.value.code == code, f"code {info.value.code!r} ({info.value}), expected {code!r}"
    for word in words:
        assert word.lower() in str(info.value).lower(), f"{word!r} not in message {str(info.value)!r}"
    return info.value


# ---- round trips ----------------------------------------------------------------------------

def test_fp32_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 576, generator=g) * 100
    t[0, 0], t[0, 1], t[0, 2] = 3.4e38, -0.0, 1e-40  # extremes and a subnormal survive (NaN and inf are refused)
    data = encode_frame(Frame("hidden", step=4, pos=11, tensor=t, codec="fp32"))
    assert data[:4] == b"LSPL" and data[4] == VERSION
    f = decode_frame(data)
    assert f.kind == "hidden" and f.step == 4 and f.pos == 11 and f.codec == "fp32"
    assert f.tensor.dtype == torch.float32 and tuple(f.tensor.shape) == (5, 576)
    assert torch.equal(f.tensor.view(torch.int32), t.view(torch.int32))  # bit for bit
    # the payload is exactly the little-endian float32 bytes, after the header
    assert data.endswith(t.numpy().astype("<f4").tobytes())
    assert len(data) - 5 * 576 * 4 < 100


@pytest.mark.parametrize("codec, dtype, rtol", [("fp16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 8e-3)])
def test_half_codecs_round_trip_within_tolerance(codec, dtype, rtol):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 64, generator=g) * 4
    data = encode_frame(Frame("hidden", step=0, pos=0, tensor=t, codec=codec))
    assert len(data) - 3 * 64 * 2 < 100  # two bytes a value on the wire
    f = decode_frame(data)
    assert f.codec == codec and f.tensor.dtype == torch.float32 and f.tensor.shape == t.shape
    torch.testing.assert_close(f.tensor, t, rtol=rtol, atol=1e-3)
    # and it is exactly the value rounded to the codec's type
    assert torch.equal(f.tensor, t.to(dtype).float())
    assert not torch.equal(f.tensor, t)  # it really was narrowed


def test_decode_to_requested_dtype():
    t = torch.randn(2, 8)
    f = decode_frame(encode_frame(Frame("hidden", tensor=t)), out_dtype=torch.bfloat16)
    assert f.tensor.dtype == torch.bfloat16
    assert torch.equal(f.tensor, t.to(torch.bfloat16))


def test_error_frame_round_trip():
    f = decode_frame(encode_frame(Frame.error("bad_step", "expected step 3, got 5", step=5)))
    assert f.kind == "error" and f.code == "bad_step" and f.message == "expected step 3, got 5" and f.step == 5
    assert f.tensor is None


def test_codec_registry():
    assert set(PARTS) >= {"fp32", "fp16", "bf16", "int8", "int4", "had", "zstd"}
    assert get_codec("fp16").raw_size((3, 5)) == 30
    with pytest.raises(CodecError, match="int5"):
        get_codec("int5")
    with pytest.raises(CodecError):
        get_codec("fp32").decode(b"\0" * 7, (2,), torch.float32)


def test_hand_built_frame_is_accepted():
    """The reference for the rejections below: the same construction with nothing wrong decodes."""
    payload = torch.arange(8, dtype=torch.float32).numpy().astype("<f4").tobytes()
    f = decode_frame(raw_frame(good_header(), payload))
    assert f.tensor.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and f.step == 3 and f.pos == 7


# ---- rejections -----------------------------------------------------------------------------

PAYLOAD = b"\0" * 32  # 2 x 4 float32


def test_bad_magic():
    rejects(raw_frame(good_header(), PAYLOAD, magic=b"PKL\x80"), "malformed", Limits(), "magic")


def test_unsupported_version():
    rejects(raw_frame(good_header(), PAYLOAD, version=9), "version", Limits(), "version 9")


@pytest.mark.parametrize("n", [0, 3, 8])
def test_truncated_prefix(n):
    data = raw_frame(good_header(), PAYLOAD)[:n]
    rejects(data, "malformed", Limits(), "prefix")


def test_header_length_past_end():
    packed = msgpack.packb(good_header(), use_bin_type=True)
    data = PREFIX.pack(MAGIC, VERSION, len(packed) + len(PAYLOAD) + 1) + packed + PAYLOAD
    rejects(data, "malformed", Limits(), "header length")


def test_header_over_max_header_bytes():
    header = good_header(extra={"pad": "x" * 2000})
    data = raw_frame(header, PAYLOAD)
    decode_frame(data)  # fine under the default 4096-byte header limit
    rejects(data, "malformed", Limits(max_header_bytes=1024), "header length")


@pytest.mark.parametrize("garbage", [b"\xc1\xc1\xc1\xc1", b"\x92\x01", b"\xa3abc", b"\xde\xff\xff"])
def test_garbage_msgpack_header(garbage):
    data = PREFIX.pack(MAGIC, VERSION, len(garbage)) + garbage
    rejects(data, "malformed")


def test_header_with_binary_blob_refused():
    data = raw_frame(good_header(extra={"blob": b"\x80\x04pickle"}), PAYLOAD)
    rejects(data, "malformed")


@pytest.mark.parametrize("kind", ["tensor", "", None, 3])
def test_unknown_kind(kind):
    rejects(raw_frame(good_header(kind=kind), PAYLOAD), "malformed", Limits(), "kind")


def test_missing_kind():
    header = good_header()
    del header["kind"]
    rejects(raw_frame(header, PAYLOAD), "malformed", Limits(), "kind")


@pytest.mark.parametrize("codec", ["int5", "fp64", "", None])
def test_unknown_codec(codec):
    rejects(raw_frame(good_header(codec=codec), PAYLOAD), "codec", Limits(), "codec")


@pytest.mark.parametrize("nbytes", [31, 33, 0])
def test_nbytes_mismatch(nbytes):
    rejects(raw_frame(good_header(nbytes=nbytes), PAYLOAD), "malformed", Limits(), "payload bytes")


@pytest.mark.parametrize("field, value", [("step", -1), ("pos", -5), ("step", 1.5), ("pos", "7"),
                                          ("step", True), ("nbytes", -32)])
def test_bad_integer_fields(field, value):
    rejects(raw_frame(good_header(**{field: value}), PAYLOAD), "malformed", Limits(), field)


def test_payload_size_vs_shape_mismatch():
    # header and frame agree on 32 bytes, but a (3, 4) float32 tensor needs 48
    header = good_header(shape=(3, 4), nbytes=32)
    rejects(raw_frame(header, PAYLOAD), "codec", Limits(), "48")
    # and fp16 of shape (2, 4) needs 16, not 32
    rejects(raw_frame(good_header(codec="fp16", nbytes=32), PAYLOAD), "codec", Limits(), "16")


@pytest.mark.parametrize("shape", [[-2, 4], [0, 4], [2, 0], [2.0, 4], ["2", 4], [True, 4], [], None, "2x4", {"a": 1}])
def test_bad_shape(shape):
    header = good_header()
    header["shape"] = shape
    rejects(raw_frame(header, PAYLOAD), "shape", Limits(), "shape")


def test_too_many_dims():
    header = good_header(shape=(1, 2, 2, 2))
    payload = b"\0" * header["nbytes"]
    rejects(raw_frame(header, payload), "shape", Limits(), "shape")
    assert decode_frame(raw_frame(header, payload), Limits(max_dims=4)).tensor.shape == (1, 2, 2, 2)


def test_too_many_rows():
    header = good_header(shape=(9, 1))
    payload = b"\0" * header["nbytes"]
    rejects(raw_frame(header, payload), "shape", Limits(max_rows=8), "rows")


def test_over_max_frame_bytes():
    data = encode_frame(Frame("hidden", tensor=torch.zeros(16, 64)))
    assert decode_frame(data, Limits(max_frame_bytes=len(data))).tensor.shape == (16, 64)
    err = rejects(data, "too_large", Limits(max_frame_bytes=len(data) - 1), str(len(data)))
    assert str(len(data) - 1) in str(err)


@pytest.mark.parametrize("extra", [[1, 2], "x", 5])
def test_extra_must_be_a_map(extra):
    rejects(raw_frame(good_header(extra=extra), PAYLOAD), "malformed", Limits(), "extra")


def test_header_must_be_a_map():
    packed = msgpack.packb([1, 2, 3])
    rejects(PREFIX.pack(MAGIC, VERSION, len(packed)) + packed, "malformed", Limits(), "map")


def test_huge_declared_shape_is_refused_before_allocation():
    # 100000 x 100000 floats would be 40 GB; it must be refused from the sizes alone
    header = good_header(shape=(100000, 100000), nbytes=32)
    rejects(raw_frame(header, PAYLOAD), "too_large", Limits(), "values")
    header = good_header(shape=(1000, 64), nbytes=32)  # small enough, but not what 32 bytes carry
    rejects(raw_frame(header, PAYLOAD), "codec")


# ---- sampling -------------------------------------------------------------------------------

def _logits(seed=0, n=50):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    s = Sampler(SamplingParams())
    for seed in range(5):
        logits = _logits(seed)
        assert s(logits) == int(torch.argmax(logits))


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, seed=1234)
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(_logits(i % 3)) for i in range(40)]
    seq2 = [s2(_logits(i % 3)) for i in range(40)]
    assert seq1 == seq2
    other = Sampler(SamplingParams(temperature=1.0, seed=99))
    assert [other(_logits(i % 3)) for i in range(40)] != seq1  # a different seed, different draws
    assert len(set(seq1)) > 1  # it really samples


def test_top_k_one_is_greedy():
    s = Sampler(SamplingParams(temperature=2.0, top_k=1, seed=0))
    for seed in range(10):
        logits = _logits(seed)
        assert s(logits) == int(torch.argmax(logits))


def test_top_k_restricts_to_the_k_likeliest():
    logits = _logits(3)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    draws = {s(logits) for _ in range(200)}
    assert draws <= allowed and len(draws) > 1


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    draws = {s(logits) for _ in range(300)}
    assert draws == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {s(logits) for _ in range(50)} == {0}


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_p=-0.2)])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
