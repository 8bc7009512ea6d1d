"""A sharded body, chained by the client: each hop's output comes back to the device and goes up to the
next hop.

    device ──▶ hop [X, M) ──▶ device ──▶ hop [M, Y) ──▶ device

Each hop is its own body (a RemoteBody over the hop's replicas, or a VerifiedBody that cross-checks
them), with its own session and its own replay prefix: when a hop's server fails, only that hop
reconnects and replays (as Petals does); the others keep their caches. The alternative, where a hop
forwards its output straight to the next server (`hops="forward"`), is a session option the first
server carries out (server/forward.py); this class is the client's side of the chained mode.
"""

from __future__ import annotations

import torch

from .body import add_traffic
from .transport import Traffic


class ChainBody:
    """Hops in layer order, run one after another; the same face as a RemoteBody."""

    def __init__(self, hops: list):
        if not hops:
            raise ValueError("a chain needs at least one hop")
        self.hops = hops

    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        for hop in self.hops:
            hidden = hop.forward(hidden, pos)
        return hidden

    @property
    def cloud_s(self) -> float:
        return sum(h.cloud_s for h in self.hops)

    @property
    def recoveries(self) -> int:
        return sum(h.recoveries for h in self.hops)

    @property
    def rollback(self) -> bool:
        return all(h.rollback for h in self.hops)

    @property
    def first_frame_up(self) -> bytes:
        return self.hops[0].first_frame_up

    @property
    def up(self):
        """The codec of what leaves the device (for the first hop)."""
        return self.hops[0].up

    @property
    def down(self):
        """The codec of what comes back from the last hop."""
        return self.hops[-1].down

    @property
    def last_frames(self) -> tuple[bytes, bytes]:
        """What left the device for the first hop, and what came back from the last one."""
        return self.hops[0].last_frames[0], self.hops[-1].last_frames[1]

    @property
    def disagreements(self) -> list:
        """Servers caught disagreeing with their hop's majority (hops that cross-check)."""
        return [d for h in self.hops for d in getattr(h, "disagreements", [])]

    def measured(self) -> Traffic:
        total = Traffic()
        for hop in self.hops:
            add_traffic(total, hop.measured())
        return total

    def close(self) -> None:
        for hop in self.hops:
            hop.close()
