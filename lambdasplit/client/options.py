"""How the device reaches its body servers: one set of connection options, shared by every hop.

    SplitClient("smollm2", server="https://body.example:8470", split=(2, 28),
                connection=ConnectionOptions(token="...", ca_bundle="ca.pem", retry=Retry(attempts=3)))

`SplitClient` also takes each field as a keyword of its own (`token=`, `transport=`, ...), which
fills these options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .body import Retry
from .transport import BodyConnection

HOP_MODES = ("auto", "forward", "chain")
"""How a sharded body's hops pass states on: 'forward' (each server sends its output to the next hop's:
one device round trip per step), 'chain' (every hop's output comes back to the device, which sends it
up to the next), 'auto' (forward where the servers allow it, else chain)."""


@dataclass(frozen=True)
class ConnectionOptions:
    """The connection to the body: transport, credentials, patience, and how several servers are used."""

    transport: str = "ws"
    """'ws': one WebSocket per session for the steps (the default); 'http': one POST per step, for
    networks where WebSockets cannot pass. Session management always runs over HTTP."""

    token: str | None = field(default=None, repr=False)
    """The bearer token the body servers expect (None: send none)."""

    ca_bundle: str | None = None
    """A PEM file of the CA that signed the servers' certificates, for https:// URLs (None: the
    system's CAs)."""

    timeout: float = 120.0
    """Seconds to wait for a connection or a reply before the step counts as failed."""

    retry: Retry = field(default_factory=Retry)
    """How a lost or full server is ridden out: tries per step and the backoff between them."""

    patience_s: float | None = None
    """Seconds, in all per step, the client waits for servers that are lost or full (honouring a full
    server's Retry-After) before it gives up, saying how long it waited (None: the retry's own, 120 s)."""

    hops: str = "auto"
    """How a sharded body's hops pass states on: one of HOP_MODES."""

    verify: int = 1
    """Replicas that run each step (1 to 7): with more than one, the majority decides and a server that
    disagrees is reported and excluded (client/verify.py)."""

    def __post_init__(self):
        if not 1 <= self.verify <= 7:
            raise ValueError(f"verify takes 1 (no cross-checking) to 7 replicas per step, got {self.verify}")
        if self.hops not in HOP_MODES:
            raise ValueError(f"hops must be one of {', '.join(HOP_MODES)}, got {self.hops!r}")
        if self.patience_s is not None:
            if self.patience_s <= 0:
                raise ValueError(f"patience must be positive, got {self.patience_s}")
            object.__setattr__(self, "retry", replace(self.retry, patience_s=self.patience_s))

    @classmethod
    def build(cls, base: ConnectionOptions | None = None, **shortcuts) -> ConnectionOptions:
        """`base` (or the defaults) with the fields named in `shortcuts` replaced; an unknown name is a TypeError."""
        unknown = sorted(set(shortcuts) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the connection "
                            f"options are {', '.join(f.name for f in fields(cls))}")
        return replace(base or cls(), **shortcuts)

    def connect(self, url: str, transport: str | None = None, kind: type[BodyConnection] = BodyConnection,
                timeout: float | None = None):
        """A connection to the server at `url` (`transport` and `timeout` override the options' own, e.g.
        'http' for a one-off question)."""
        return kind(url, transport=transport or self.transport, timeout=timeout or self.timeout, token=self.token,
                    ca_bundle=self.ca_bundle)
