"""Codec names: a small grammar that says what a codec does, in the order it does it.

    CODEC  := PART ('+' PART)*
    PART   := fp32 | fp16 | bf16                 plain floats (fp32 is lossless)
            | int{8,6,4,3,2}[:row|:tensor|:channel]
                                                 affine integers, bit-packed; one scale and zero per
                                                 row (default), per tensor, or per channel
            | out:K                              the K largest-magnitude channels of each row travel
                                                 in fp16 beside the integer codes (int formats only)
            | had                                a random Hadamard rotation, seeded per session, before
                                                 quantizing (undone after); with out:K, the outliers
                                                 are taken out first and only the rest is rotated
            | pca:R                              R coefficients in a shared PCA basis instead of D values
                                                 (needs a basis file on both sides; default format fp16)
            | zstd                               a lossless zstd pass over the payload
            | noise:S                            the noise defence: Gaussian noise of S x each row's RMS
                                                 added by the sender before anything else (0 < S <= 10,
                                                 e.g. noise:0.1); drawn from the OS's randomness, never
                                                 from the session seed, so the receiver cannot remove it

Examples: ``int8``, ``int8+out:4``, ``had+int4``, ``pca:128+int8``, ``fp16+zstd``. Parts may come in
any order; `CodecSpec.name` writes the canonical one (noise, pca, had, format, out, zstd), which is what
frames carry and what the two sides compare.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_FORMATS = ("fp32", "fp16", "bf16")
INT_BITS = (8, 6, 4, 3, 2)
GRANULARITIES = ("row", "tensor", "channel")
MAX_OUTLIERS = 256
MAX_RANK = 1 << 16
MAX_NOISE = 10.0
DEFAULT_WIRE = "int6+out:4,int8+out:4"  # UP,DOWN unless a session asks for others (docs/wire.md)


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class CodecSpec:
    format: str = "fp32"  # fp32 | fp16 | bf16 | int8 | int6 | int4 | int3 | int2
    granularity: str = "row"
    outliers: int = 0
    hadamard: bool = False
    rank: int = 0  # 0: no low-rank projection
    zstd: bool = False
    noise: float = 0.0  # std of the added Gaussian noise, relative to each row's RMS (0: none)

    @property
    def bits(self) -> int | None:
        return int(self.format[3:]) if self.format.startswith("int") else None

    @property
    def lossless(self) -> bool:
        return self.format == "fp32" and not self.rank and not self.hadamard and not self.noise

    @property
    def name(self) -> str:
        parts = []
        if self.noise:
            parts.append(f"noise:{self.noise:g}")
        if self.rank:
            parts.append(f"pca:{self.rank}")
        if self.hadamard:
            parts.append("had")
        fmt = self.format
        if self.bits is not None and self.granularity != "row":
            fmt += f":{self.granularity}"
        parts.append(fmt)
        if self.outliers:
            parts.append(f"out:{self.outliers}")
        if self.zstd:
            parts.append("zstd")
        return "+".join(parts)

    def __str__(self) -> str:
        return self.name


def parse_codec(text: str) -> CodecSpec:
    """Parse a codec name; the error says what was wrong and what the grammar allows."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"a codec name is needed, got {text!r}")
    fields: dict = {}
    for raw in text.strip().lower().split("+"):
        part, colon, arg = raw.strip().partition(":")
        if colon and not arg:
            raise SpecError(f"{raw!r} in {text!r} has a colon with nothing after it")
        if part in FLOAT_FORMATS or (part.startswith("int") and _is_number(part[3:])):
            _once(fields, "format", part, text)
            if part.startswith("int"):
                if int(part[3:]) not in INT_BITS:
                    raise SpecError(f"{part} is not offered; integer codecs have {', '.join(map(str, INT_BITS))} bits")
                if arg:
                    if arg not in GRANULARITIES:
                        raise SpecError(f"granularity {arg!r} in {raw!r}: choose one of {', '.join(GRANULARITIES)}")
                    fields["granularity"] = arg
            elif arg:
                raise SpecError(f"{part} takes no option, got {raw!r}")
        elif part == "out":
            _once(fields, "outliers", _count(arg, raw, MAX_OUTLIERS), text)
        elif part == "pca":
            _once(fields, "rank", _count(arg, raw, MAX_RANK), text)
        elif part == "noise":
            _once(fields, "noise", _scale(arg, raw), text)
        elif part in ("had", "zstd") and not arg:
            _once(fields, "hadamard" if part == "had" else "zstd", True, text)
        else:
            raise SpecError(f"unknown codec part {raw!r} in {text!r}; parts are fp32, fp16, bf16, "
                            "int8/6/4/3/2[:row|:tensor|:channel], out:K, had, pca:R, zstd and noise:S, joined by '+'")
    if "format" not in fields:
        if "rank" not in fields:
            raise SpecError(f"{text!r} names no number format (fp32, fp16, bf16 or int8/6/4/3/2)")
        fields["format"] = "fp16"
    spec = CodecSpec(**fields)
    if spec.outliers and spec.bits is None:
        raise SpecError(f"out:K keeps outliers beside integer codes; {spec.format} has no integer codes")
    return spec


def parse_wire(value: str | tuple[str, str] | list[str]) -> tuple[str, str]:
    """A wire: 'CODEC' (both directions), 'UP,DOWN', or an (up, down) pair -> canonical (up, down) names.

    The one parser of wire strings, for the CLI, the client, the planner and the benches alike; bad
    input raises SpecError (a ValueError) that says what a wire looks like.
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (tuple, list)):
        parts = [p.strip() if isinstance(p, str) else p for p in value]
    else:
        raise SpecError(f"a wire is CODEC or UP,DOWN (for example {DEFAULT_WIRE}), got {value!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise SpecError(f"a wire is CODEC or UP,DOWN (for example {DEFAULT_WIRE}), got {value!r}")
    try:
        return parse_codec(parts[0]).name, parse_codec(parts[1]).name
    except SpecError as exc:
        raise SpecError(f"wire {value!r}: {exc}") from None


def _is_number(text: str) -> bool:
    """Plain ASCII digits, no leading zero ('²', '٨' and '08' are not numbers here)."""
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def _scale(arg: str, raw: str) -> float:
    """A noise scale: ASCII digits with at most one point, in (0, MAX_NOISE]; written back as %g."""
    whole, _, frac = arg.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (frac and not (frac.isascii() and frac.isdigit())):
        raise SpecError(f"{raw!r} needs a decimal number after the colon, e.g. noise:0.1")
    value = float(arg)
    if not 0 < value <= MAX_NOISE:
        raise SpecError(f"{raw!r}: the noise scale must be above 0 and at most {MAX_NOISE:g}")
    return float(f"{value:g}")  # what the canonical name says is exactly what is applied


def _once(fields: dict, key: str, value, text: str) -> None:
    if key in fields:
        raise SpecError(f"{text!r} sets {key} twice")
    fields[key] = value


def _count(arg: str, raw: str, limit: int) -> int:
    if not _is_number(arg) or not 1 <= int(arg) <= limit:
        raise SpecError(f"{raw!r} needs a whole number from 1 to {limit} after the colon")
    return int(arg)
