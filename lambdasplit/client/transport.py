"""The device's connection to a body server: JSON over HTTP for sessions, frames for steps.

Steps go over one WebSocket per session (`transport="ws"`, the default) or one HTTP POST per
step (`transport="http"`, for networks where WebSockets cannot pass). Every byte either socket
carries, headers included, is counted by the kernel's TCP counters (see sockstats).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ..wire.codecs import Codec
from ..wire.frame import Frame, Limits, decode_frame, encode_frame, frame_kind, reply_bounds
from ..wire.protocol import FRAME_TYPE, SESSION_KEY_HEADER, ServerInfo, SessionOpened, SessionRequest
from .sockstats import SocketMeter


class BodyError(RuntimeError):
    """The body server refused a request or a step; `code` says why in one word."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry_after = retry_after  # seconds the server asked the client to wait (its Retry-After), if any


@dataclass
class Traffic:
    """Bytes on the sockets (headers included) and frame bytes (what lambdasplit itself wrote)."""

    socket_up: int = 0
    socket_down: int = 0
    frame_up: int = 0
    frame_down: int = 0
    steps: int = 0
    counted_at_socket: bool = True


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Verify the server's certificate and host name: against `ca_bundle` (a PEM file) if given, else the
    system's CAs."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot read the CA bundle {ca_bundle}: {exc}") from None


def _connect_error(url: str, exc: OSError) -> "BodyError":
    if isinstance(exc, ssl.SSLCertVerificationError):
        return BodyError("tls", f"the body server at {url} presented a certificate this client does not trust "
                                f"({exc.verify_message}); give its CA with --ca-bundle FILE")
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":  # the reply was not a TLS record
        plain = "http://" + url.removeprefix("https://")
        return BodyError("tls", f"the body server at {url} speaks plain HTTP, not TLS: use {plain} (hidden states "
                                "then cross unencrypted, which `serve` allows only on loopback or with --insecure)")
    if isinstance(exc, ssl.SSLError):
        return BodyError("tls", f"TLS with the body server at {url} failed: {exc}")
    return BodyError("unreachable", f"cannot reach the body server at {url}: {exc}")


def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the server at host:port completes a TLS handshake (its certificate unchecked: this only asks
    which protocol it speaks, to explain a plain-HTTP connection it closed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10)) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except (OSError, ssl.SSLError):
        return False


def http_error(status: int, content_type: str, data: bytes) -> BodyError:
    """A server's refusal as a BodyError: its JSON `error` and `message` (or FastAPI's `detail`), else the
    status and the start of the body."""
    try:
        result = json.loads(data) if "json" in content_type else {}
    except ValueError:
        result = {}
    result = result if isinstance(result, dict) else {}
    detail = result.get("detail")
    message = (result.get("message") or (detail if isinstance(detail, str) or detail is None else json.dumps(detail))
               or data.decode(errors="replace")[:500])
    return BodyError(result.get("error", f"http_{status}"), message)


_ROUTABLE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _routing(session_id: str, key: str = "") -> dict:
    """The session's key (X-Session-Key), and Ray Serve's session header for a session id that names the
    replica holding it (`tag.random`, see server/ray_router.py): Serve's router sends the request there. A
    standalone server's ids have no '.', and its requests carry only the key."""
    headers = {SESSION_KEY_HEADER: key} if key else {}
    if "." in session_id and _ROUTABLE.fullmatch(session_id):
        headers["X-Session-Id"] = session_id
    return headers


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (the delay form; an HTTP date is not used by lambdasplit servers)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class BodyConnection:
    sessions_path = "/v1/sessions"

    def __init__(self, url: str, *, transport: str = "ws", timeout: float = 120.0, token: str | None = None,
                 ca_bundle: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must look like http://HOST:PORT or https://HOST:PORT, got {url!r}")
        if transport not in ("ws", "http"):
            raise ValueError(f"transport must be 'ws' or 'http', got {transport!r}")
        self.url, self.transport, self.timeout = url.rstrip("/"), transport, timeout
        self.tls = tls_context(ca_bundle) if parts.scheme == "https" else None
        self.host, self.port = parts.hostname, parts.port or (443 if self.tls else 80)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.traffic = Traffic()
        self._meter = SocketMeter()
        self._http: http.client.HTTPConnection | None = None
        self._ws: ClientConnection | None = None
        self.session: SessionOpened | None = None
        self._session_headers: dict = {}  # what each request of the session carries (its key, Ray Serve's routing)
        self.retry_after: float | None = None  # the latest answer's Retry-After, in seconds
        self.first_frame_up: bytes = b""
        self.last_frames: tuple[bytes, bytes] = (b"", b"")  # the latest step's uplink and downlink frames

    # ---- HTTP -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", headers: dict | None = None) -> tuple[int, str, bytes]:
        for attempt in (0, 1):
            if self._http is None:
                self._http = (http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.tls)
                              if self.tls else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))
            try:
                self._http.request(method, path, body=body,
                                   headers={**self.headers, **(headers or {}), "Content-Type": content_type})
                response = self._http.getresponse()
                data = response.read()
                self.retry_after = _retry_after(response.getheader("Retry-After"))
                self._meter.read(self._http.sock)
                return response.status, response.getheader("Content-Type", ""), data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop_http()  # a keep-alive connection the server had closed: the request never ran
                if attempt and self.tls is None and speaks_tls(self.host, self.port, self.timeout):
                    secure = "https://" + self.url.removeprefix("http://")
                    raise BodyError("tls", f"the body server at {self.url} speaks TLS (HTTPS) and closed this "
                                           f"plain-HTTP connection: use {secure}") from exc
                if attempt:
                    raise BodyError("disconnected", f"the body server at {self.url} closed the connection "
                                                    f"({type(exc).__name__})") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop_http()
                raise _connect_error(self.url, exc) from exc
        raise AssertionError("unreachable")

    def _drop_http(self) -> None:
        if self._http is not None:
            self._unmeter(self._http.sock)
            self._http.close()
            self._http = None

    def _unmeter(self, sock) -> None:
        """Count a socket's last bytes and stop watching it (before it closes)."""
        self._meter.read(sock)
        self._meter.forget(sock)

    def _json(self, method: str, path: str, payload: dict | None = None, headers: dict | None = None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        status, ctype, data = self._request(method, path, body, headers=headers)
        if status >= 400:
            error = http_error(status, ctype, data)
            error.retry_after = self.retry_after
            raise error
        return json.loads(data) if data and "json" in ctype else {}

    def info(self) -> ServerInfo:
        info = self._json("GET", "/v1/info")
        if info.get("task", "text-generation") != "text-generation":
            raise BodyError("mismatch", f"the server at {self.url} serves a {info.get('task')} model "
                                        f"({info.get('model_name')}), not a language model")
        return ServerInfo(**info)

    def open_session(self, request: SessionRequest) -> SessionOpened:
        self.session = SessionOpened(**self._json("POST", self.sessions_path, request.model_dump()))
        self._session_headers = _routing(self.session.session_id, self.session.key)
        if self.transport == "ws":
            self._connect_ws()
        return self.session

    def hand_out_session(self, request: SessionRequest) -> SessionOpened:
        """Open a session for another party to step (a device in a browser page, which cannot send this
        connection's token): its id and key are returned, not kept, and this connection never closes it."""
        return SessionOpened(**self._json("POST", self.sessions_path, request.model_dump()))

    def _connect_ws(self) -> None:
        """Open the session's WebSocket; entered at once, closed in close_session() (not by a `with` block
        around the whole session)."""
        path = f"{self.sessions_path}/{self.session.session_id}/ws"
        try:
            self._ws = connect(f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{path}",
                               additional_headers={**self.headers, **self._session_headers},
                               compression=None, ssl=self.tls,
                               max_size=self.session.max_frame_bytes + 4096, open_timeout=self.timeout,
                               close_timeout=5).__enter__()
        except InvalidStatus as exc:  # the server refused the upgrade (401, 404, 409 session_busy): its JSON says why
            response = exc.response
            raise http_error(response.status_code, response.headers.get("Content-Type", ""), response.body or b"") \
                from None
        except OSError as exc:
            raise _connect_error(self.url, exc) from exc

    # ---- steps ------------------------------------------------------------------------------
    def step(self, frame: bytes, limits: Limits = Limits(), codec: Codec | None = None,
             on_lora: Callable[[Frame], object] | None = None) -> Frame:
        """Send one uplink frame, return the downlink frame decoded with the session's downlink `codec`
        (raise BodyError on an error frame).

        A PrivateLoRA session's server asks the device mid-step ('lora' frames, WebSocket only):
        `on_lora(question)` answers each with the device's adapter, until the step's reply comes."""
        if self.session is None:
            raise BodyError("no_session", "open a session first")
        self._check_size(frame)
        if not self.first_frame_up:
            self.first_frame_up = frame
        if self._ws is not None:
            reply = self._ws_exchange(frame, limits, on_lora)
        else:
            status, ctype, reply = self._request("POST", f"/v1/sessions/{self.session.session_id}/step", frame,
                                                 FRAME_TYPE, self._session_headers)
            if status >= 400 or ctype != FRAME_TYPE:
                raise http_error(status, ctype, reply)
        self.last_frames = (frame, reply)
        self.traffic.frame_up += len(frame)
        self.traffic.frame_down += len(reply)
        self.traffic.steps += 1
        out = decode_frame(reply, limits, codec=codec, **reply_bounds(frame))  # as many rows as sent, as wide
        if out.kind == "error":
            raise BodyError(out.code, out.message)
        if out.kind == "lora":
            raise BodyError("malformed", "the server asked for PrivateLoRA adapters this session does not have")
        return out

    def _check_size(self, frame: bytes) -> None:
        if len(frame) > self.session.max_frame_bytes:
            raise BodyError("too_large", f"a frame of {len(frame)} bytes exceeds the server's limit of "
                                         f"{self.session.max_frame_bytes}")

    def _ws_send(self, frame: bytes) -> None:
        try:
            self._ws.send(frame)
        except (ConnectionClosed, OSError) as exc:
            raise BodyError("disconnected", f"the body server closed the step connection ({exc})") from exc

    def _ws_receive(self, waiting_for: str = "reply") -> bytes:
        """The next frame on the WebSocket, its bytes counted; BodyError when none comes in time."""
        try:
            reply = self._ws.recv(timeout=self.timeout)
        except TimeoutError as exc:
            raise BodyError("timeout", f"no {waiting_for} from the body server within {self.timeout:.0f} s") from exc
        except (ConnectionClosed, OSError) as exc:
            raise BodyError("disconnected", f"the body server closed the step connection ({exc})") from exc
        self._meter.read(self._ws.socket)
        if isinstance(reply, str):
            raise BodyError("malformed", "the server sent a text message instead of a frame")
        return reply

    def _ws_exchange(self, frame: bytes, limits: Limits, on_lora) -> bytes:
        """Send a step over the WebSocket; answer the server's adapter questions; return the step's reply."""
        outgoing = frame
        while True:
            self._ws_send(outgoing)
            reply = self._ws_receive()
            if on_lora is None or frame_kind(reply) != "lora":  # plain sessions: no second header parse per step
                return reply
            question = decode_frame(reply, limits, max_rows=reply_bounds(frame).get("max_rows"))
            answer = on_lora(question)
            self.traffic.frame_down += len(reply)
            outgoing = encode_frame(Frame("lora", step=question.step, pos=0, tensor=answer.float(), codec="fp32"))
            self.traffic.frame_up += len(outgoing)

    def close_session(self) -> None:
        if self._ws is not None:
            self._unmeter(self._ws.socket)
            self._ws.close()
            self._ws = None
        if self.session is not None:
            session, self.session = self.session, None
            try:
                self._json("DELETE", f"{self.sessions_path}/{session.session_id}", headers=self._session_headers)
            except BodyError:
                pass  # already gone (expired, or the server restarted)

    def close(self) -> None:
        self.close_session()
        self._drop_http()

    def measured(self) -> Traffic:
        """Traffic so far, socket counters refreshed."""
        if self._ws is not None:
            self._meter.read(self._ws.socket)
        self.traffic.socket_up, self.traffic.socket_down = self._meter.sent, self._meter.received
        self.traffic.counted_at_socket = self._meter.available
        return self.traffic

    def __enter__(self) -> "BodyConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
