"""The browser's wire.js against the Python wire: the same frames, byte for byte, both ways.

Every case runs through one Node process (tests/js/wire_roundtrip.mjs): the jobs of the whole module are
collected first, sent in one batch, and each test checks its own results. Frame headers carry no
timestamp or other nondeterministic field (only kind, step, pos, shape, codec, crc, nbytes and the
caller's `extra`), so whole frames are compared byte for byte.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from lambdasplit.wire.frame import Frame, FrameError, decode_frame, encode_frame

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "js" / "wire_roundtrip.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (node) is not installed")

CODECS = ["fp32", "fp16", "bf16", "int8", "int6+out:4", "int8+out:4"]
SHAPES = [(1, 576), (7, 576), (3, 64)]
PREFIX = struct.Struct("<4sBI")


# ---- tensors: gaussian rows, massive outliers and exact ties ------------------------------------------

def tensor_variants(shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """Named float32 tensors of `shape` that stress each codec's rounding and the outlier choice."""
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    out = {"gaussian": base.clone()}

    # a few values like 3e3 among values ~1, in different channels per row, some negative
    spikes = base.clone()
    for r in range(rows):
        idx = torch.randperm(cols, generator=g)[: 2 + r % 5]
        spikes[r, idx] = torch.tensor([3e3, -2.5e3, 3.1e3, -3e3, 2e3, 1.5e3])[: len(idx)]
    out["outliers"] = spikes

    # ties: integer values (many equal magnitudes, so the topk boundary is a tie), equal spikes of both signs
    ties = torch.randint(-3, 4, (rows, cols), generator=g).float()
    for r in range(rows):
        idx = torch.randperm(cols, generator=g)[: 3 + r % 4]  # 3..6 equal largest magnitudes around k = 4
        ties[r, idx] = torch.tensor([3e3, -3e3] * 3)[: len(idx)]
    out["ties"] = ties
    out["all_equal"] = torch.ones(rows, cols)  # every magnitude ties; scale 0 -> 1

    # float values exactly halfway between fp16 / bf16 neighbours (fp16 subnormals too), and the fp16 maximum
    floats = base.clone()
    floats[:, :10] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 1 + 2**-8, 1 + 3 * 2**-8,
                                   -(1 + 2**-8), 65504.0, 6e-8, -0.0])
    out["halfway_floats"] = floats

    # quotients exactly halfway between two codes: a row from 0 to 63 (or 255) has scale 1 under int6 (int8)
    codes = torch.zeros(rows, cols)
    for r in range(rows):
        levels = 63 if r % 2 == 0 else 255
        codes[r] = (torch.arange(cols) % levels).float() + 0.5
        codes[r, 0], codes[r, 1] = 0.0, float(levels)
    out["halfway_codes"] = codes
    spiked = codes.clone()  # the same, with exactly 4 spikes for out:4 to take away
    spiked[:, 5:9] = torch.tensor([3e3, -3e3, 2e3, -1e3])
    out["halfway_codes_spiked"] = spiked

    # signed zeros at the row minimum (the stored zero point's sign follows torch.aminmax's scan)
    zeros = base.abs()
    zeros[:, ::7] = -0.0
    zeros[::2, 0] = 0.0  # even rows start with +0, odd rows with -0 (then a +0)
    zeros[1::2, 3] = 0.0
    out["signed_zero"] = zeros
    return out


def floats_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().astype("<f4").tobytes()).decode()


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().astype("<f4").view("<u4")


# ---- the cases, and one Node run for all of them --------------------------------------------------------

def frame_args(shape, index: int) -> dict:
    """step / pos / extra that exercise msgpack's int widths (fixint, uint8, uint16, uint32) and a map."""
    step, pos = [(0, 0), (3, 200), (300, 70000), (5_000_000_000, 127)][index % 4]
    extra = [{}, {"cloud_us": 12345}, {"rollback": 3, "part": "latent", "t": 0.25}, {"mirror": "ab" * 20}][index % 4]
    return {"step": step, "pos": pos, "extra": extra}


def build_cases() -> list[dict]:
    cases = []
    for codec in CODECS:
        for shape in SHAPES:
            for seed, (variant, x) in enumerate(tensor_variants(shape, seed=len(cases)).items()):
                if codec == "fp16" and x.abs().max() > 65504:
                    continue
                args = frame_args(shape, seed + len(cases))
                cases.append({"id": f"{codec}-{shape[0]}x{shape[1]}-{variant}", "codec": codec, "x": x, **args})
    return cases


CASES = build_cases()


def python_frame(case: dict) -> bytes:
    return encode_frame(Frame("hidden", step=case["step"], pos=case["pos"], tensor=case["x"], codec=case["codec"],
                              extra=case["extra"]))


def encode_job(case: dict, kind: str = "hidden") -> dict:
    rows, cols = case["x"].shape
    return {"op": "encode", "kind": kind, "step": case["step"], "pos": case["pos"], "rows": rows, "cols": cols,
            "codec": case["codec"], "extra": case["extra"], "tensor": floats_b64(case["x"])}


def decode_job(frame: bytes) -> dict:
    return {"op": "decode", "frame": base64.b64encode(frame).decode()}


def repack(frame: bytes, payload: bytes | None = None, **changes) -> bytes:
    """A frame with header fields changed (and optionally another payload): for refusals."""
    _, version, hlen = PREFIX.unpack_from(frame, 0)
    header = msgpack.unpackb(frame[PREFIX.size:PREFIX.size + hlen])
    payload = frame[PREFIX.size + hlen:] if payload is None else payload
    header.update(changes)
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(b"LSPL", version, len(packed)) + packed + payload


def header_len(frame: bytes) -> int:
    return PREFIX.size + PREFIX.unpack_from(frame, 0)[2]


def bad_frames() -> dict[str, tuple[bytes, str]]:
    """Frames Python refuses, each with a piece of the reason JS must give."""
    x = tensor_variants((2, 64), seed=99)["outliers"]
    good = encode_frame(Frame("hidden", step=1, tensor=x, codec="int6+out:4"))
    fp32 = encode_frame(Frame("hidden", step=1, tensor=x, codec="fp32"))
    start = header_len(good)
    flipped = bytearray(good)
    flipped[start + 40] ^= 0x10
    crc = msgpack.unpackb(good[PREFIX.size:start])["crc"]
    nan_payload = bytearray(fp32[header_len(fp32):])
    nan_payload[8:12] = struct.pack("<f", float("nan"))
    neg_scale = bytearray(good[start:])
    neg_scale[8:12] = struct.pack("<f", -1.0)  # the first row's scale (after 2 zero points)
    short = good[start:-1]
    return {
        "corrupted_payload_byte": (bytes(flipped), "CRC-32"),
        "wrong_crc": (repack(good, crc=(crc + 1) % 2**32), "CRC-32"),
        "bad_magic": (b"LSPX" + good[4:], "bad magic"),
        "bad_version": (good[:4] + bytes([3]) + good[5:], "version 3"),
        "payload_size": (repack(good, payload=short, nbytes=len(short), crc=zlib.crc32(short)), "must be"),
        "nbytes_mismatch": (repack(good, nbytes=len(good) - start + 1), "payload bytes"),
        "non_finite": (repack(fp32, payload=bytes(nan_payload), crc=zlib.crc32(nan_payload)), "non-finite"),
        "negative_scale": (repack(good, payload=bytes(neg_scale), crc=zlib.crc32(neg_scale)), "scale"),
        "unknown_kind": (repack(good, kind="pickle"), "unknown frame kind"),
        "float_step": (repack(good, step=1.0), "'step' must be a non-negative integer, got 1.0"),
        "extra_not_a_map": (repack(good, extra=[1]), "'extra' must be a map"),
        "bad_shape": (repack(good, shape=[2, 0]), "shape"),
    }


# codecs Python decodes that wire.js does not implement: refused by name, never decoded wrongly
UNSUPPORTED = ["had+int8", "int4:channel", "fp16+zstd", "int8:tensor+out:2"]


BAD = bad_frames()


def double_rounding_frame() -> bytes:
    """An int8 frame whose dequantization needs a single rounding (see test_dequantize_rounds_once_like_torch)."""
    scale = 5237765 * 2.0**-54
    codes = bytes([205, 0, 255, 1] * 16)
    payload = struct.pack("<ff", 1.0, scale) + codes
    header = {"kind": "hidden", "step": 0, "pos": 0, "shape": [1, 64], "codec": "int8", "crc": zlib.crc32(payload),
              "nbytes": len(payload)}
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(b"LSPL", 2, len(packed)) + packed + payload


DOUBLE_ROUNDING = double_rounding_frame()
ERROR_FRAME = Frame.error("bad_shape", "rows of 575 values; this session's are 576 wide — é " * 40, step=7)


def all_jobs() -> list[dict]:
    jobs = []
    for case in CASES:
        jobs += [decode_job(python_frame(case)), encode_job(case)]
    jobs += [decode_job(frame) for frame, _ in BAD.values()]
    x = tensor_variants((2, 64), seed=5)["gaussian"]
    jobs += [decode_job(encode_frame(Frame("hidden", tensor=x, codec=name))) for name in UNSUPPORTED]
    jobs.append(decode_job(DOUBLE_ROUNDING))
    jobs += [decode_job(encode_frame(ERROR_FRAME)),
             {"op": "encode", "kind": "error", "step": 7, "code": ERROR_FRAME.code, "message": ERROR_FRAME.message,
              "tensor": None}]
    return jobs


def run_node(jobs: list[dict]) -> list[dict]:
    proc = subprocess.run([NODE, str(DRIVER)], input=json.dumps({"jobs": jobs}).encode(), capture_output=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()
    results = json.loads(proc.stdout)["results"]
    assert len(results) == len(jobs)
    return results


@pytest.fixture(scope="module")
def js() -> dict:
    """Every job of this module, run once: results keyed by what asked for them."""
    results = iter(run_node(all_jobs()))
    out = {}
    for case in CASES:
        out[("decode", case["id"])] = next(results)
        out[("encode", case["id"])] = next(results)
    for name in BAD:
        out[("bad", name)] = next(results)
    for name in UNSUPPORTED:
        out[("unsupported", name)] = next(results)
    out["double_rounding"] = next(results)
    out["error_decode"], out["error_encode"] = next(results), next(results)
    return out


def js_tensor(result: dict, shape) -> torch.Tensor:
    assert result["ok"], result
    arr = np.frombuffer(base64.b64decode(result["tensor"]), dtype="<f4").reshape(shape)
    return torch.from_numpy(arr.copy())


# ---- (a) Python encodes, JS decodes -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_js_decodes_python_frames_bit_exactly(js, case):
    frame = python_frame(case)
    expected = decode_frame(frame, codec=None)
    got = js[("decode", case["id"])]
    assert got["ok"], got["message"]
    assert (got["kind"], got["step"], got["pos"], got["codec"]) == ("hidden", case["step"], case["pos"], case["codec"])
    assert (got["rows"], got["cols"]) == tuple(case["x"].shape)
    assert got["extra"] == case["extra"]
    np.testing.assert_array_equal(bits(js_tensor(got, case["x"].shape)), bits(expected.tensor))


# ---- (b) JS encodes, the bytes are Python's ------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_js_encodes_python_bytes(js, case):
    got = js[("encode", case["id"])]
    assert got["ok"], got["message"]
    frame, expected = base64.b64decode(got["frame"]), python_frame(case)
    if frame != expected:  # say where: the header or which payload byte
        hj, hp = header_len(frame), header_len(expected)
        assert frame[:hj] == expected[:hp], "headers differ"
        diff = np.flatnonzero(np.frombuffer(frame[hj:], np.uint8) != np.frombuffer(expected[hp:], np.uint8))
        pytest.fail(f"{len(diff)} payload bytes differ, first at {diff[:8].tolist()}")
    decode_frame(frame)  # and Python accepts it


def test_error_frames_both_ways(js):
    expected = encode_frame(ERROR_FRAME)
    assert len(ERROR_FRAME.message) > 1000  # Python sends the first 1000 characters
    encoded = js["error_encode"]
    assert encoded["ok"], encoded
    assert base64.b64decode(encoded["frame"]) == expected
    decoded = js["error_decode"]
    assert decoded["ok"], decoded
    assert (decoded["kind"], decoded["step"], decoded["code"]) == ("error", 7, "bad_shape")
    assert decoded["message"] == ERROR_FRAME.message[:1000] and decoded["tensor"] is None


def test_dequantize_rounds_once_like_torch(js):
    """zero + code * scale is one fused multiply-add in torch's addcmul (this CPU build): 1 + 205 * s, for
    s = 5237765 * 2^-54, is exactly 1 + 2^-24 + 2^-54; rounded to a double first it would be the tie 1 + 2^-24
    and then round to even (1.0), but rounded once it is 1 + 2^-23. wire.js must do the latter."""
    frame = DOUBLE_ROUNDING
    expected = decode_frame(frame).tensor
    assert expected[0, 0].item() == 1 + 2**-23, "torch no longer fuses addcmul here: wire.js's fmaF32 is wrong"
    np.testing.assert_array_equal(bits(js_tensor(js["double_rounding"], expected.shape)), bits(expected))


# ---- (c) what Python refuses, JS refuses, saying why ----------------------------------------------------

@pytest.mark.parametrize("name", list(BAD))
def test_js_refuses_what_python_refuses(js, name):
    frame, reason = BAD[name]
    with pytest.raises(FrameError) as python:
        decode_frame(frame)
    got = js[("bad", name)]
    assert not got["ok"], f"wire.js accepted a frame Python refuses ({python.value})"
    assert reason in got["message"], got["message"]
    assert got["code"] == python.value.code, (got, python.value.code)


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_js_refuses_codecs_it_does_not_implement(js, name):
    got = js[("unsupported", name)]
    assert not got["ok"] and got["code"] == "codec", got
    assert "not implemented" in got["message"] or "not supported" in got["message"], got["message"]


# ---- many more random rows: ties at the topk boundary, other widths and K, every bit width ----------------

def test_many_random_rows_match():
    rng = np.random.default_rng(7)
    codecs = ["int6+out:4", "int8+out:4", "int4+out:8", "int3+out:1", "int2", "int8+out:16", "fp16", "bf16"]
    cases, jobs = [], []
    for i in range(240):
        codec = codecs[i % len(codecs)]
        cols = int(rng.choice([16, 64, 100, 255, 256, 257, 576, 1000]))
        rows = int(rng.integers(1, 5))
        if rng.random() < 0.5:  # few distinct magnitudes: ties everywhere
            x = rng.integers(-4, 5, (rows, cols)).astype(np.float32) * np.float32(rng.choice([1, 0.5, 1e3]))
        else:
            x = (rng.standard_normal((rows, cols)) * np.exp(rng.standard_normal((rows, cols)) * 2)).astype(np.float32)
        x = np.clip(x, -6e4, 6e4)
        case = {"x": torch.from_numpy(x), "codec": codec, **frame_args((rows, cols), i)}
        cases.append(case)
        jobs += [encode_job(case), decode_job(python_frame(case))]
    results = run_node(jobs)
    for n, case in enumerate(cases):
        encoded, decoded = results[2 * n], results[2 * n + 1]
        expected = python_frame(case)
        assert encoded["ok"] and base64.b64decode(encoded["frame"]) == expected, (n, case["codec"], encoded)
        want = decode_frame(expected).tensor
        np.testing.assert_array_equal(bits(js_tensor(decoded, case["x"].shape)), bits(want), err_msg=str(n))
