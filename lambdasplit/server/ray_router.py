"""Session affinity for the body server on Ray Serve: a custom Ray Serve request router.

A session's KV cache lives in one replica, so every step of the session must reach that replica. Each
replica puts its own tag in front of the session ids it hands out (`<tag>.<random>`, see
`ServerSettings.session_prefix`). The client sends a session's id in Ray Serve's session header
(`X-Session-Id`, on the step POSTs, the WebSocket and the DELETE; client/transport.py sends it only for
such tagged ids), Serve's HTTP proxy puts it in the request's metadata (`PendingRequest.metadata.session_id`),
and this router, which Serve runs in its proxy for every request, reads the tag from it:

- a request that names a session goes to the replica that holds it, and only there (if that replica is
  busy, the request waits for it). If that replica is gone (it died, or was replaced), the request goes
  to another replica: that one answers `unknown_session` (404), and the client reopens a session and
  replays its prefix (lambdasplit.client.body.RemoteBody), which is how recovery already works;
- `X-Session-Id: <tag>.` with any other request (per-replica `/metrics` or `/v1/info`) reaches that
  replica too (the answer's `x-lambdasplit-replica` header says which one answered);
- anything else (opening a session, /v1/info, /healthz) goes round-robin over the live replicas, so new
  sessions spread evenly.

The base class's routing loop is used as it is; the FIFO mixin is deliberately not, because it hands a
chosen replica to whichever request waits longest, which would send one session's step to another's
replica. Nothing here reads the request's body or unpickles anything: the key is a header string.

This module imports only the standard library and Ray, so the proxy never imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SEPARATOR = "."  # between a replica's tag and the random part of a session id (token_urlsafe never has one)
SESSION_HEADER = "X-Session-Id"  # Ray Serve's session header (RAY_SERVE_SESSION_ID_HEADER_KEY, default x-session-id)
_TAG = re.compile(r"[A-Za-z0-9_-]{1,32}")


def replica_tag(unique_id: str) -> str:
    """A replica's short URL-safe tag: Ray's replica id itself (8 lower-case letters and digits), or a hash
    of it should that ever change shape."""
    return unique_id if _TAG.fullmatch(unique_id) else hashlib.sha256(unique_id.encode()).hexdigest()[:16]


def session_prefix(unique_id: str) -> str:
    """What every session id of the replica `unique_id` starts with."""
    return replica_tag(unique_id) + SEPARATOR


def tag_of(session_id: str) -> str:
    """The replica tag a session id starts with ("" for an untagged id, e.g. a standalone server's)."""
    tag, sep, _ = (session_id or "").partition(SEPARATOR)
    return tag if sep and _TAG.fullmatch(tag) else ""


def request_tag(pending: Optional[PendingRequest]) -> str:
    """The replica a pending request must reach, from the session id Serve's proxy read off its header."""
    metadata = getattr(pending, "metadata", None)
    return tag_of(getattr(metadata, "session_id", "") or "")


class SessionAffinityRouter(RequestRouter):
    """Routes each request of a session to the replica that holds the session (module docstring)."""

    def initialize_state(self, **kwargs) -> None:
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # one pass over all replicas is all there is: back off between passes, never spin
            pending_request.routing_context.should_backoff = True
        tag = request_tag(pending_request)
        if tag:
            for replica in candidate_replicas:
                if replica_tag(replica.replica_id.unique_id) == tag:
                    return [[replica]]  # only that replica: a step anywhere else would find no session
        # no session, or its replica is gone (the one chosen answers unknown_session and the client replays):
        # round-robin, with the others as fall-backs
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        first = next(self._turn) % len(ordered)
        return [[ordered[first]], ordered[first + 1:] + ordered[:first]]
