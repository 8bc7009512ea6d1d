"""The testbed the end-to-end benches run on: a real server process behind an emulated link.

    client (this process) --loopback--> LinkProxy (rate, delay; counts bytes) --loopback--> server process

Each measurement can also run under a packet capture of the proxy's port, so that the traffic
figures can be checked against what tcpdump saw, as the paper measured them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..net.capture import Capture, CaptureError
from ..net.link import LinkProxy, LinkSpec
from ..server.process import ServerProcess


@dataclass
class Observed:
    """Bytes one measurement put on the emulated link, as the proxy and (optionally) a capture counted them."""
    link_up: int = 0
    link_down: int = 0
    capture_up: int | None = None
    capture_down: int | None = None


class LinkedServer:
    """`lambdasplit serve` in a subprocess with a LinkProxy in front; clients use `url` (the proxy's)."""

    def __init__(self, model: str | None, split: str, *extra: str, link: LinkSpec, env: dict | None = None):
        self.server = ServerProcess(model, split, *extra, env=env)
        try:
            self.proxy = LinkProxy("127.0.0.1", int(self.server.url.rsplit(":", 1)[1]), link).start()
        except BaseException:
            self.server.stop()
            raise

    @property
    def url(self) -> str:
        return self.proxy.url

    @contextmanager
    def observe(self, capture: bool = False) -> Iterator[Observed]:
        """Count what crosses the link inside the block (and capture it, with `capture`)."""
        seen = Observed()
        up, down = self.proxy.bytes_up, self.proxy.bytes_down
        if capture:
            with Capture(self.proxy.port) as cap:
                yield seen
            seen.capture_up, seen.capture_down = cap.to_port, cap.from_port
        else:
            yield seen
        seen.link_up, seen.link_down = self.proxy.bytes_up - up, self.proxy.bytes_down - down

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()

    def __enter__(self) -> "LinkedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_together(workers: list, line) -> tuple[float, float]:
    """Start `workers` (threads that wait at the barrier `line` once ready), release them at once and join them:
    the release's perf_counter time, and the wall time from it. A worker that failed before the start breaks the barrier; the caller reports
    its error."""
    for worker in workers:
        worker.start()
    try:
        line.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for worker in workers:
        worker.join()
    return t0, time.perf_counter() - t0


def serve_compute(args) -> list[str]:
    """The bench's --device and --weights as `lambdasplit serve` arguments (no --weights: the device's default)."""
    return ["--device", args.device, *(["--weights", args.weights] if args.weights else [])]


def client_compute(args) -> dict:
    """The bench's --device and --weights as SplitClient (and load_split) keywords."""
    return dict(device=args.device, weights=args.weights)


def compute_meta(args) -> dict:
    """What the bench's --device and --weights resolve to on this machine, for its report."""
    from ..models.device import device_name, resolve_device
    from ..models.formats import choose_format

    device = resolve_device(args.device)
    fmt = choose_format(args.weights, device)
    return {"device": device_name(device), "weights": fmt.name}


def reference_compute(args, bench: str, why: str) -> dict:
    """For a bench that always computes on the CPU in fp32 (`why`): the options are accepted, the output says
    what ran, a request for anything else is named as not taken, and `args` is set to what runs."""
    asked = [f"--{name} {value}" for name, value, same in (("device", args.device, ("auto", "cpu")),
                                                           ("weights", args.weights, (None, "fp32")))
             if value not in same]
    note = f" ({', '.join(asked)} not taken)" if asked else ""
    print(f"bench {bench}: computes on the CPU in fp32{note}: {why}", flush=True)
    args.device, args.weights = "cpu", "fp32"
    return client_compute(args)


def check_capture() -> None:
    """Fail early, with the reason, when a bench asked for --capture and this machine cannot capture."""
    try:
        with Capture(9):  # the discard port: nothing to see, only whether tcpdump starts
            pass
    except CaptureError as exc:
        raise RuntimeError(f"--capture: {exc}") from None
