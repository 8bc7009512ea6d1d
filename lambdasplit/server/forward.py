"""A sharded body, forwarded by the servers: a hop sends its output straight on to the next hop, and
the device gets the last hop's answer from the first server.

    device ──▶ hop [X, M) ──▶ hop [M, Y) ──▶ hop [X, M) ──▶ device      (one device round trip per step)

against the chained mode (client/chain.py), where every hop's output goes back to the device first
(a device round trip per hop). The first server holds the next hop's session as a client would (a
RemoteBody over that hop's replicas): when the next hop's server fails, only that hop reconnects and
replays what this server sent it.

A server forwards only to the URLs it was started with (`serve --peers`): a session cannot make it
open connections to arbitrary addresses.
"""

from __future__ import annotations

import asyncio
import time

import torch

from ..client.body import RemoteBody, Retry
from ..client.transport import BodyConnection, BodyError
from ..wire.codecs import Codec, CodecError, get_codec, session_codecs
from ..wire.frame import Frame, decode_frame, encode_frame
from ..wire.lowrank import Basis
from ..wire.protocol import SessionRequest
from .sessions import StepError

LOSSLESS = get_codec("fp32")  # the session's own output, in-process, before it goes on


class Forwarder:
    """A forwarding session's link to the next hop: its output goes there, the last hop's comes back."""

    def __init__(self, request: SessionRequest, dtype: torch.dtype, reply: Codec, peers: frozenset[str],
                 basis: Basis | None = None, token: str | None = None, timeout: float = 120.0,
                 retry: Retry = Retry(attempts=4, base_s=0.25, patience_s=30.0)):
        hop, rest = request.forward[0], request.forward[1:]
        strangers = [url for h in request.forward for url in h.urls if url.rstrip("/") not in peers]
        if strangers:
            raise StepError("no_forward", f"this server forwards only to its peers (serve --peers); not to "
                                          f"{', '.join(strangers)}", 403)
        if hop.x != request.y:
            raise StepError("mismatch", f"the next hop must start where this one ends (layer {request.y}), "
                                        f"not at {hop.x}", 409)
        self.reply, self.dtype = reply, dtype
        downstream = request.model_copy(update={"x": hop.x, "y": hop.y, "model_fingerprint": hop.model_fingerprint,
                                                "forward": rest})
        end = rest[-1].y if rest else hop.y
        # up: this server's output, as the state entering the next hop; down: the last hop's output, coded as
        # the device asked (re-coding it with the same codec for the device changes nothing but float rounding)
        try:
            up, down = session_codecs(request.wire.up, request.wire.down, seed=request.wire.seed, x=hop.x, y=end,
                                      basis=basis, basis_sha256=request.wire.basis)
        except CodecError as exc:
            raise StepError("mismatch", f"the next hop's codecs: {exc}", 409) from None
        try:
            self.next = RemoteBody(list(hop.urls), lambda url: BodyConnection(url, timeout=timeout, token=token),
                                   downstream, (up, down), dtype, retry)
        except BodyError as exc:
            raise StepError("mismatch" if exc.code == "mismatch" else "unreachable",
                            f"the next hop, layers [{hop.x}, {hop.y}): {exc}", 409 if exc.code == "mismatch" else 502) \
                from None

    async def relay(self, data: bytes) -> bytes:
        """This server's reply frame (lossless, in-process) -> the next hop -> the reply the device gets."""
        frame = decode_frame(data, codec=LOSSLESS)
        before = self.next.cloud_s
        started = time.perf_counter()
        try:
            out = await asyncio.to_thread(self.next.forward, frame.tensor.to(self.dtype), frame.pos)
        except BodyError as exc:
            raise StepError("internal", f"the next hop failed ({exc}); session closed", 502) from None
        hop_us = int((time.perf_counter() - started) * 1e6)
        own_us = frame.extra.get("cloud_us", 0)
        return encode_frame(Frame(frame.kind, step=frame.step, pos=frame.pos, tensor=out, codec=self.reply,
                                  extra={"cloud_us": own_us + int((self.next.cloud_s - before) * 1e6),
                                         "hop_us": hop_us}))

    def close(self) -> None:
        self.next.close()
