"""A packet capture of a loopback port, to cross-check the byte counts the client reads from its sockets.

`Capture(port)` runs Debian's `tcpdump` on the loopback interface while the block runs, then reads
the pcap file itself (no extra library): for every TCP segment to or from the port, the payload is the
IP length less the IP and TCP headers. Loopback carries each segment once and never retransmits, so
the sums are the bytes each direction carried, comparable with the kernel's per-socket counters.
Capturing needs tcpdump and the right to capture (root or CAP_NET_RAW); without them, CaptureError
says which is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

_LINKTYPES = {1: (14, 12), 113: (16, 14)}  # Ethernet, Linux cooked: header length, offset of the ethertype


class CaptureError(RuntimeError):
    pass


class Capture:
    """>>> with Capture(8470) as cap: ...   then cap.to_port, cap.from_port (TCP payload bytes)"""

    def __init__(self, port: int, interface: str = "lo"):
        self.port, self.interface = port, interface
        self.to_port = self.from_port = self.segments = 0
        self._proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="lambdasplit-capture-")
        self.path = Path(self._dir.name) / "capture.pcap"

    def __enter__(self) -> "Capture":
        exe = shutil.which("tcpdump")
        if exe is None:
            raise CaptureError("tcpdump is not installed (Debian: apt-get install tcpdump)")
        os.chmod(self._dir.name, 0o777)  # tcpdump may drop privileges to its own user before writing
        self._proc = subprocess.Popen([exe, "-i", self.interface, "-U", "-n", "-s", "128", "-w", str(self.path),
                                       f"tcp port {self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
        line = self._proc.stderr.readline()  # "listening on lo, ..." once it captures, or the reason it cannot
        if "listening on" not in line:
            self._proc.wait(5)
            rest = self._proc.stderr.read()
            raise CaptureError(f"tcpdump cannot capture on {self.interface}: {(line + rest).strip()}")
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1.0)  # the last segments reach the capture (tcpdump reads its buffer in batches)
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.to_port, self.from_port, self.segments = tcp_payload_bytes(self.path, self.port)
        self._dir.cleanup()


def tcp_payload_bytes(path: str | Path, port: int) -> tuple[int, int, int]:
    """(payload bytes to `port`, payload bytes from `port`, TCP segments) in a classic pcap file."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise CaptureError(f"{path} is not a pcap file")
    magic = struct.unpack_from("<I", data)[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        endian = "<"
    elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
        endian = ">"
    else:
        raise CaptureError(f"{path}: unknown pcap magic {magic:#x}")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    if linktype not in _LINKTYPES:
        raise CaptureError(f"{path}: link type {linktype} is not handled (Ethernet and Linux cooked are)")
    link_len, type_at = _LINKTYPES[linktype]
    to_port = from_port = segments = 0
    offset = 24
    while offset + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, offset + 8)[0]
        packet = data[offset + 16:offset + 16 + incl]
        offset += 16 + incl
        if len(packet) < link_len + 20:
            continue
        ethertype = struct.unpack_from(">H", packet, type_at)[0]
        ip = link_len
        if ethertype == 0x0800 and packet[ip + 9] == 6:  # IPv4, TCP
            ip_header = (packet[ip] & 0x0F) * 4
            ip_payload = struct.unpack_from(">H", packet, ip + 2)[0] - ip_header
        elif ethertype == 0x86DD and packet[ip + 6] == 6:  # IPv6 without extension headers, TCP
            ip_header, ip_payload = 40, struct.unpack_from(">H", packet, ip + 4)[0]
        else:
            continue
        tcp = ip + ip_header
        if len(packet) < tcp + 13:
            continue
        src, dst = struct.unpack_from(">HH", packet, tcp)
        payload = ip_payload - (packet[tcp + 12] >> 4) * 4
        segments += 1
        if dst == port:
            to_port += payload
        elif src == port:
            from_port += payload
    return to_port, from_port, segments
