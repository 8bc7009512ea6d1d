"""What the adversarial tests watch: a server process's resident memory, read from /proc/PID/status."""

from __future__ import annotations

import time
from pathlib import Path

MB = 2**20


def rss_bytes(pid: int) -> int:
    """VmRSS of a live process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most the process has held since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class RssWatch:
    """The growth of a process's resident memory over a block: `with RssWatch(pid) as w: ...; w.growth`.
    It samples every `every` seconds on the test's own thread when `sample()` is called, and at the end."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = self.peak = 0

    def __enter__(self):
        self.start = self.peak = rss_bytes(self.pid)
        return self

    def sample(self) -> int:
        now = rss_bytes(self.pid)
        self.peak = max(self.peak, now)
        return now

    def __exit__(self, *exc) -> None:
        time.sleep(0.05)
        self.sample()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def refill_floats(frame: bytes, value: float, where: slice = slice(0, 1)) -> bytes:
    """A copy of a float-coded frame (fp32, fp16 or bf16, no zstd) whose values at `where` (flat indices) are
    `value` (NaN, inf...), its CRC made right again: what a peer that skips the encoder's checks can send."""
    import struct
    import zlib

    import msgpack
    import numpy as np
    import torch

    magic, version, hlen = struct.unpack_from("<4sBI", frame, 0)
    header = msgpack.unpackb(frame[9:9 + hlen], raw=False)
    payload = bytearray(frame[9 + hlen:])
    fmt = header["codec"]
    if fmt == "bf16":
        values = np.frombuffer(payload, "<i2").copy()
        special = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy()[0]
    else:
        values = np.frombuffer(payload, {"fp32": "<f4", "fp16": "<f2"}[fmt]).copy()
        special = value
    values[where] = special
    payload = values.tobytes()
    header["crc"] = zlib.crc32(payload)
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<4sBI", magic, version, len(packed)) + packed + payload
