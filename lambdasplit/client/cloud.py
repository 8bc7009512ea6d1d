"""The client of a cloud-only server (`serve --cloud-only`): text up, tokens down, the baseline Λ-Split avoids."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .sockstats import SocketMeter
from .transport import BodyError, Traffic, http_error


@dataclass
class CloudResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int = 0
    seconds: float = 0.0  # from sending the request to the last token, as the client saw it
    cloud_s: float = 0.0  # of which the server's generation (prefill and decode), as it reports it
    traffic: Traffic = field(default_factory=Traffic)


class CloudClient:
    """>>> CloudClient("http://127.0.0.1:8470").generate("Hi", max_new_tokens=16).text"""

    def __init__(self, server: str, timeout: float = 300.0):
        parts = urlsplit(server)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"server URL must look like http://HOST:PORT, got {server!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout

    def stream(self, prompt: str, result: CloudResult | None = None, **options) -> Iterator[str]:
        """Yield the answer's text as the server streams it; `result` collects ids, timing and traffic."""
        result = result if result is not None else CloudResult("", [])
        started = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        meter = SocketMeter()
        try:
            try:
                conn.request("POST", "/v1/complete", json.dumps({"prompt": prompt, **options}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
            except OSError as exc:
                raise BodyError("unreachable", f"cannot reach the server at {self.host}:{self.port} ({exc})") from exc
            if response.status != 200:
                raise http_error(response.status, response.getheader("Content-Type", ""), response.read())
            for line in response:
                event = json.loads(line)
                if event.get("done"):
                    if event.get("error"):
                        raise BodyError("internal", event["error"])
                    result.prompt_tokens = event.get("prompt_tokens", 0)
                    result.cloud_s = float(event.get("compute_s", 0.0))
                    break
                result.token_ids.append(event["token"])
                result.text += event["text"]
                if event["text"]:
                    yield event["text"]
        finally:
            meter.read(conn.sock)
            conn.close()
            result.seconds = time.perf_counter() - started
            result.traffic.socket_up, result.traffic.socket_down = meter.sent, meter.received
            result.traffic.counted_at_socket = meter.available

    def generate(self, prompt: str, **options) -> CloudResult:
        result = CloudResult("", [])
        for _ in self.stream(prompt, result, **options):
            pass
        return result
