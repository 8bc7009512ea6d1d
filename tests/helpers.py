"""Test helpers: a greedy reference with the unsplit model, a step-by-step driver of a body session,
and plain-socket HTTP / WebSocket calls that bypass the package's own client."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import torch
from transformers import DynamicCache

from lambdasplit.models.llm import cache_keyword
from lambdasplit.wire.frame import Frame, decode_frame, encode_frame
from lambdasplit.wire.protocol import SESSION_KEY_HEADER

# the keys of the sessions opened through these helpers (post_json, http_call, Driver): a raw request that names
# one of them carries its key (X-Session-Key) unless the caller gives `headers` of its own
SESSION_KEYS: dict[str, str] = {}


def session_key(session_id: str) -> dict:
    """The X-Session-Key header of a session opened through these helpers (empty for any other)."""
    key = SESSION_KEYS.get(session_id)
    return {SESSION_KEY_HEADER: key} if key else {}


def _keyed(path: str) -> dict:
    parts = path.split("/")  # /v1/sessions/ID[/step]
    return session_key(parts[3]) if len(parts) > 3 and parts[2] in ("sessions", "images") else {}


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens from the unsplit transformers model: argmax every step, EOS not special."""
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids])
    out = []
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=True, **{cache_keyword(model.forward): cache}).logits[0, -1]
        token = int(torch.argmax(logits))
        out.append(token)
        ids = torch.tensor([[token]])
    return out


def hidden_frame(rows: int, dim: int, *, step: int, pos: int, codec: str = "fp32", seed: int = 0) -> bytes:
    """A well-formed frame carrying a random (rows, dim) hidden state."""
    g = torch.Generator().manual_seed(seed)
    return encode_frame(Frame("hidden", step=step, pos=pos, tensor=torch.randn(rows, dim, generator=g), codec=codec))


class Driver:
    """Head and tail in this process, body over a BodyConnection, greedy, one step at a time.

    Unlike SplitClient it exposes every frame, so tests can look at what crossed the wire and
    interleave bad frames on the same connection between good steps.
    """

    def __init__(self, model, connection, request):
        self.model, self.conn, self.request = model, connection, request
        self.opened = connection.open_session(request)
        SESSION_KEYS[self.opened.session_id] = self.opened.key
        self.head_cache = model.head.layers.new_cache() if request.cache else None
        self.tail_cache = model.tail.layers.new_cache() if request.cache else None
        self.step = 0
        self.pos = 0
        self.ids: list[int] = []
        self.up_frames: list[bytes] = []

    @torch.inference_mode()
    def advance(self, new_ids: list[int]) -> int:
        """Send new_ids through head -> body (remote) -> tail; return the greedy next token."""
        self.ids.extend(new_ids)
        ids, pos = (new_ids, self.pos) if self.request.cache else (self.ids, 0)
        hidden = self.model.head(torch.tensor([ids]), self.head_cache, pos)[0]
        frame = encode_frame(Frame("hidden", step=self.step, pos=pos, tensor=hidden, codec=self.request.wire.up))
        self.up_frames.append(frame)
        reply = self.conn.step(frame)
        assert reply.kind == "hidden"
        assert tuple(reply.tensor.shape) == tuple(hidden.shape), (reply.tensor.shape, hidden.shape)
        assert reply.step == self.step and reply.pos == pos
        assert reply.codec == self.request.wire.down
        logits = self.model.tail(reply.tensor.unsqueeze(0), self.tail_cache, pos)[0, -1]
        self.step += 1
        self.pos += len(new_ids)
        return int(torch.argmax(logits))


def http_call(url: str, method: str, path: str, body: bytes | None = None,
              content_type: str = "application/json", headers: dict | None = None,
              chunked: bool = False, tls=None) -> tuple[int, dict | bytes, dict]:
    """One HTTP request on a fresh connection; JSON bodies come back parsed. `tls`: an SSLContext (https)."""
    parts = urlsplit(url)
    conn = (http.client.HTTPSConnection(parts.hostname, parts.port, timeout=60, context=tls) if tls else
            http.client.HTTPConnection(parts.hostname, parts.port, timeout=60))
    try:
        hdrs = {"Content-Type": content_type, **(headers if headers is not None else _keyed(path))}
        if chunked:
            def gen(data=body, size=8192):
                for i in range(0, len(data), size):
                    yield data[i:i + size]
            conn.request(method, path, body=gen(), headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        parsed = json.loads(data) if "json" in ctype and data else data
        if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str) and parsed.get("key"):
            SESSION_KEYS[parsed["session_id"]] = parsed["key"]
        return resp.status, parsed, dict(resp.getheaders())
    finally:
        conn.close()


def metric(url: str, name: str) -> float:
    """One unlabelled sample of a server's /metrics."""
    _, data, _ = http_call(url, "GET", "/metrics")
    for line in data.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def post_json(url: str, path: str, payload: dict) -> tuple[int, dict | bytes]:
    status, data, _ = http_call(url, "POST", path, json.dumps(payload).encode())
    return status, data


def ws_url(url: str, session_id: str) -> str:
    parts = urlsplit(url)
    return f"ws://{parts.hostname}:{parts.port}/v1/sessions/{session_id}/ws"


def decode_reply(data: bytes) -> Frame:
    assert isinstance(data, bytes), f"expected a binary frame, got {type(data).__name__}: {data!r}"
    return decode_frame(data)


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA (trustme) and a server certificate it signed for 127.0.0.1 and localhost, written to
    `folder`: (ca.pem, cert.pem, key.pem)."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    folder.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(paths[0]))
    issued.cert_chain_pems[0].write_to_path(str(paths[1]))
    issued.private_key_pem.write_to_path(str(paths[2]))
    paths[2].chmod(0o600)
    return paths
