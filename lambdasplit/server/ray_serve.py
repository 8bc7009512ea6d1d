"""The body server on Ray Serve: N replicas of the standalone server's app, behind Serve's HTTP proxy.

    lambdasplit serve --ray --replicas 2 --split 1:29 --port 8470

Each replica is the same FastAPI app as `lambdasplit serve` (lambdasplit.server.app.create_app over its own
BodyRuntime), so the session and frame protocol is exactly the standalone server's and
`lambdasplit generate --server URL` works unchanged against the Serve URL, over WebSocket or HTTP POST
steps. What Ray adds:

- **Affinity.** Every session id a replica hands out starts with that replica's tag, and a custom Ray
  Serve request router (lambdasplit.server.ray_router.SessionAffinityRouter, set as the deployment's
  `request_router_config`) sends each step, WebSocket and close of a session to the replica that holds
  its KV cache. New sessions are spread over the replicas.
- **Recovery.** When a replica dies, Serve starts another; a session's next step reaches a live replica,
  which answers `unknown_session`, and the client reopens a session and replays its prefix (the output
  stays identical).
- **Placement.** Each replica reserves `cpus_per_replica` Ray CPUs and runs torch with that many threads.
  The model folder is resolved here, in the driver, and the replicas load that local path (on a
  multi-node cluster it must exist at the same path on every node, with lambdasplit installed there).

The proxy listens on `host:port` (port 0: a free port picked here), with TLS when given a certificate and
key; the exposure rules are the standalone server's (check_exposure). Ray's usage stats and dashboard are
off: nothing contacts the internet.

Limits: Serve's proxy takes WebSocket messages of at most uvicorn's default `ws_max_size` (16 MiB), so the
frame limit the replicas advertise is capped there. Sessions are not migrated: a replica that dies takes
its caches with it, and its clients replay.

Python API (tests, benchmarks): `start_ray_body(...) -> RayBody` (with `.url`, `.replica_ids()`,
`.kill_replica()`, `.replica_metrics()`, `.wait_replicas()`, `.shutdown()`), and `serve_on_ray(...)`, the
CLI's entry point, which prints the ready line and blocks until interrupted.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .context import ServerSettings
from .main import READY_LINE, check_exposure

APP_NAME = "lambdasplit"
DEPLOYMENT = "LambdasplitBody"
INSTALL_HINT = "pip install 'lambdasplit[ray]'"
REPLICA_HEADER = "x-lambdasplit-replica"  # every HTTP answer of a replica names it (its tag)
_REPLICA_PREFIX = "SERVE_REPLICA::"  # Ray Serve's replica actor names: SERVE_REPLICA::<app>#<deployment>#<id>
_SERVE_NAMESPACE = "serve"
_SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"


def require_ray():
    """Import Ray Serve, or stop with how to install it. Turns off Ray's usage stats first."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
        from ray import serve  # noqa: F401
        from ray.serve.request_router import RequestRouter  # noqa: F401 - Ray >= 2.50
    except ImportError as exc:
        raise SystemExit(f"--ray needs Ray Serve 2.50 or newer ({exc}); install it with: {INSTALL_HINT}") from None
    return ray


def proxy_ws_max_bytes() -> int:
    """The largest WebSocket message Serve's HTTP proxy accepts: its uvicorn runs with the default
    `ws_max_size` (Ray does not set one)."""
    import uvicorn

    return int(uvicorn.Config(app=None).ws_max_size)


# ---- the replica ------------------------------------------------------------------------------

_BUILT_APPS: list = []  # the app a replica's constructor made, until Serve asks for it (_replica_app)


def _replica_app():
    """Serve's ASGI builder: called in the replica right after BodyReplica.__init__, returns its app."""
    return _BUILT_APPS.pop()


class _NameReplica:
    """ASGI middleware: every HTTP answer says which replica gave it (`x-lambdasplit-replica`)."""

    def __init__(self, app, tag: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), tag.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


class BodyReplica:
    """One replica: layers [x, y) of the model in `folder`, served by the standalone server's app, with
    session ids that start with this replica's tag."""

    def __init__(self, folder: str, x: int, y: int, dtype: str, settings: ServerSettings, basis: str | None,
                 threads: int):
        import torch
        from ray import serve

        from ..util.threads import hand_over
        from .app import BodyRuntime, create_app
        from .ray_router import replica_tag, session_prefix

        torch.set_num_threads(threads)
        hand_over()  # the body computes on the scheduler's thread (util/threads.py)
        unique_id = serve.get_replica_context().replica_id.unique_id
        if not Path(folder).exists():
            raise FileNotFoundError(f"model {folder} not found on this node ({socket.gethostname()}): every "
                                    "node of the cluster needs the model at the same path")
        self._ls_tag = replica_tag(unique_id)
        runtime = BodyRuntime(Path(folder), x, y, dtype, basis=basis, device=settings.device)
        if settings.compile:
            runtime.compile()
        app = create_app(runtime, dataclasses.replace(settings, session_prefix=session_prefix(unique_id)))
        app.add_middleware(_NameReplica, tag=self._ls_tag)
        _BUILT_APPS.append(app)


def _deployment(replicas: int, cpus_per_replica: float, settings: ServerSettings):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ray_router import SessionAffinityRouter

    ingress = serve.ingress(_replica_app)(BodyReplica)
    return serve.deployment(
        ingress, name=DEPLOYMENT, num_replicas=replicas,
        # a replica computing on CUDA asks Ray for a GPU of its own (Ray then sets its CUDA_VISIBLE_DEVICES)
        ray_actor_options={"num_cpus": cpus_per_replica,
                           **({"num_gpus": 1} if settings.device.startswith("cuda") else {})},
        # each WebSocket session holds one request open for its whole life; HTTP steps hold one per step
        max_ongoing_requests=2 * settings.max_sessions + 16,
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
        graceful_shutdown_timeout_s=5.0, graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=2,  # a model that cannot load fails the start, not retried forever
    )


# ---- the driver -------------------------------------------------------------------------------

@dataclass
class RayBody:
    """A running body deployment on Ray Serve. `url` is the Serve proxy's, for any lambdasplit client."""

    url: str
    replicas: int
    app_name: str = APP_NAME
    owns_ray: bool = False  # this process started Ray (shutdown() stops it)
    owns_serve: bool = False  # this process started Serve (shutdown() stops it, else only deletes the app)
    tls: ssl.SSLContext | None = field(default=None, repr=False)  # for replica_metrics() over https
    started_s: float = 0.0  # seconds from the call to a serving deployment

    def _actor_prefix(self) -> str:
        return f"{_REPLICA_PREFIX}{self.app_name}#{DEPLOYMENT}#"

    def replica_ids(self) -> list[str]:
        """Ray's ids of the live replica actors (starting or running), sorted; a session of replica `i`
        has an id that starts with `i + '.'`."""
        import ray

        prefix = self._actor_prefix()
        return sorted(a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a.get("namespace") == _SERVE_NAMESPACE and a["name"].startswith(prefix))

    def replica_of(self, session_id: str) -> str:
        """The replica id a session id names."""
        from .ray_router import tag_of

        return tag_of(session_id)

    def kill_replica(self, which: int | str) -> str:
        """Kill a replica actor at once (ray.kill, no restart; Serve then starts a replacement). `which`: an
        index into replica_ids(), a replica id, or a session id (its replica). Returns the id killed."""
        import ray

        ids = self.replica_ids()
        replica = ids[which] if isinstance(which, int) else self.replica_of(which)
        if replica not in ids:
            raise ValueError(f"no live replica {replica!r} (live: {', '.join(ids) or 'none'})")
        ray.kill(ray.get_actor(self._actor_prefix() + replica, namespace=_SERVE_NAMESPACE), no_restart=True)
        return replica

    def running(self) -> int:
        """How many replicas Serve reports RUNNING."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        deployment = app.deployments.get(DEPLOYMENT) if app else None
        return deployment.replica_states.get("RUNNING", 0) if deployment else 0

    def wait_replicas(self, n: int | None = None, timeout: float = 120.0) -> list[str]:
        """Wait until `n` (default: the configured number of) replicas run and are live; their ids."""
        n = self.replicas if n is None else n
        deadline = time.monotonic() + timeout
        while True:
            ids = self.replica_ids()
            if self.running() == n and len(ids) == n:
                return ids
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.running()} of {n} replicas running after {timeout:.0f} s")
            time.sleep(0.2)

    def replica_metrics(self, replica: str, token: str | None = None) -> str:
        """The Prometheus text of one replica's /metrics (routed there by a session header naming it,
        `X-Session-Id: <replica>.`; checked by the answer's `x-lambdasplit-replica` header)."""
        from .ray_router import SEPARATOR, SESSION_HEADER

        status, headers, body = _get(self.url, "/metrics", token, self.tls,
                                     headers={SESSION_HEADER: replica + SEPARATOR})
        if status != 200:
            raise RuntimeError(f"/metrics of replica {replica}: HTTP {status}: {body[:200]!r}")
        if headers.get(REPLICA_HEADER) != replica:
            raise RuntimeError(f"asked replica {replica}, {headers.get(REPLICA_HEADER)} answered")
        return body.decode()

    def shutdown(self) -> None:
        """Take the deployment down (and Serve and Ray, where this process started them). Idempotent."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            if self.owns_serve:
                serve.shutdown()
            else:
                serve.delete(self.app_name)
        finally:
            if self.owns_ray:
                ray.shutdown()

    def __enter__(self) -> "RayBody":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_ray_body(folder: str | Path, x: int, y: int, *, replicas: int = 2, host: str = "127.0.0.1",
                   port: int = 0, settings: ServerSettings = ServerSettings(), insecure: bool = False,
                   dtype: str = "float32",
                   basis: str | None = None, cpus_per_replica: float = 1.0, address: str | None = None,
                   num_cpus: int | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                   log_to_driver: bool = True, log_level: str = "warning", app_name: str = APP_NAME,
                   start_timeout: float = 300.0) -> RayBody:
    """Serve layers [x, y) of the model in the local `folder` from `replicas` Ray Serve replicas, behind
    Serve's HTTP proxy on host:port (0, the default here: a free port), and return once every replica serves and the proxy
    answers.

    Ray: the instance this process is already connected to (ray.init() before, as the tests do), else the
    cluster at `address`, else a new local instance with `num_cpus` CPUs (default: all), no dashboard and
    no usage stats. `log_level` is Serve's (controller, proxy, replicas; access logs only at debug and info).
    `settings` are the standalone server's (tokens, limits, batching); its
    `max_frame_bytes` is capped at what the proxy's WebSockets take. Each replica reserves
    `cpus_per_replica` CPUs and runs torch with as many threads (at least 1). Beyond loopback the proxy
    needs TLS and tokens, unless `insecure` (the standalone server's rule: SystemExit otherwise).
    """
    if problem := _option_problem(replicas, cpus_per_replica, tls_cert, tls_key):
        raise ValueError(problem)
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
        raise ValueError("RAY_SERVE_ENABLE_DIRECT_INGRESS=1 bypasses Serve's Python proxy, and with it the session "
                         "router: unset it")
    warning = check_exposure(host, bool(tls_cert), settings.tokens is not None, insecure)
    if warning:
        print(warning, file=sys.stderr)
    # port 0: a free port; a local proxy's own port is checked now, with the standalone server's words, not after
    # a timeout (a cluster's proxy runs elsewhere)
    if port == 0 or not address:
        port = _free_port(host, port)
    started = time.monotonic()
    ray = require_ray()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        where = {"address": address} if address else {"address": "local", "num_cpus": num_cpus}
        ray.init(**where, include_dashboard=False, log_to_driver=log_to_driver, configure_logging=True,
                 logging_level="warning")
    body = None
    try:
        body, logging_config = _start_serve(host, port, tls_cert, tls_key, log_level, replicas, app_name, owns_ray)
        capped = dataclasses.replace(settings, max_frame_bytes=body_frame_cap(settings))
        app = _deployment(replicas, cpus_per_replica, capped).bind(str(folder), x, y, dtype, capped,
                                                                   str(basis) if basis else None,
                                                                   max(1, int(cpus_per_replica)))
        _run_app(body, app, logging_config, deadline=started + start_timeout)
        body.started_s = time.monotonic() - started
        return body
    except BaseException:
        if body is not None:
            body.shutdown()
        elif owns_ray:
            ray.shutdown()
        raise


def _start_serve(host: str, port: int, tls_cert: str | None, tls_key: str | None, log_level: str, replicas: int,
                 app_name: str, owns_ray: bool) -> tuple[RayBody, dict]:
    """Start Serve's proxy on host:port (unless this Ray has Serve already); the body to be, and the
    logging config its deployment runs with."""
    from ray import serve

    owns_serve = not _serve_running()
    http_options = {"host": host, "port": port}
    if tls_cert:
        http_options.update(ssl_certfile=str(tls_cert), ssl_keyfile=str(tls_key))
    level = log_level.upper() if log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "WARNING"
    logging_config = {"log_level": level, "enable_access_log": level in ("DEBUG", "INFO")}
    serve.start(http_options=http_options, proxy_location="HeadOnly", logging_config=logging_config)
    scheme = "https" if tls_cert else "http"
    url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
    tls = None
    if tls_cert:  # the driver's own checks of the proxy it started, at the address it chose
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    return RayBody(url, replicas, app_name, owns_ray, owns_serve, tls), logging_config


def _run_app(body: RayBody, app, logging_config: dict, deadline: float) -> None:
    """Deploy `app` as the body's application; wait until the proxy answers and every replica runs."""
    from ray import serve

    try:
        serve.run(app, name=body.app_name, route_prefix="/", logging_config=logging_config)
    except RuntimeError as exc:  # Serve says only that the deployment failed: add the replicas' reason
        raise RuntimeError(f"{exc} {_deployment_message(body.app_name)}".strip()) from None
    _wait_http(body.url, body.tls, deadline=deadline)
    body.wait_replicas(timeout=max(1.0, deadline - time.monotonic()))


def serve_on_ray(model: str, x: int, y: int, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 8470,
                 dtype: str = "float32", settings: ServerSettings = ServerSettings(), insecure: bool = False,
                 basis: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 cpus_per_replica: float = 1.0, address: str | None = None, log_level: str = "warning") -> None:
    """`lambdasplit serve --ray`: resolve the model here, start the deployment (start_ray_body), print the
    standalone server's ready line with the Serve URL, and serve until interrupted (Ctrl-C or SIGTERM),
    then take everything down."""
    from ..models.source import resolve_model
    from .logs import configure as configure_logging

    if problem := _option_problem(replicas, cpus_per_replica, tls_cert, tls_key, _CLI_NAMES):
        raise SystemExit(problem)
    if tls_cert:
        from .main import _tls_context

        _tls_context(tls_cert, tls_key)  # a bad file fails here, with its name
    check_exposure(host, bool(tls_cert), settings.tokens is not None, insecure)  # refuse before Ray starts
    require_ray()
    folder = resolve_model(model)
    configure_logging(log_level)
    try:
        body = start_ray_body(folder, x, y, replicas=replicas, host=host, port=port, settings=settings,
                              insecure=insecure, dtype=dtype,
                              basis=basis, cpus_per_replica=cpus_per_replica, address=address,
                              tls_cert=tls_cert, tls_key=tls_key, log_level=log_level)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"cannot start the body on Ray Serve: {exc}") from None
    try:
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
        limit = ""
        if body_frame_cap(settings) < settings.max_frame_bytes:
            limit = f"; frames capped at {body_frame_cap(settings) >> 20} MiB by the Serve proxy's WebSockets"
        print(f"{READY_LINE} {body.url} (Ray Serve: {replicas} replica(s) of model {Path(folder).name}, layers "
              f"[{x}, {y}), {cpus_per_replica:g} CPU each, started in {body.started_s:.1f} s{limit})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        body.shutdown()


def serve_from_args(args, settings: ServerSettings) -> None:
    """`lambdasplit serve` with any Ray option: check the options (before any model loads), then serve_on_ray."""
    from ..models.llm import resolve_split
    from ..models.source import is_image_model

    if not args.ray:
        raise SystemExit("--replicas, --ray-address and --ray-cpus-per-replica go with --ray")
    if args.cloud_only:
        raise SystemExit("--ray serves the split body; --cloud-only (the whole model, text in and out) runs only "
                         "as a standalone server: drop --ray")
    if is_image_model(args.model):
        raise SystemExit("--ray serves language models; a text-to-image U-Net runs only as a standalone server: "
                         "drop --ray")
    replicas = 2 if args.replicas is None else args.replicas
    cpus = 1.0 if args.ray_cpus_per_replica is None else args.ray_cpus_per_replica
    if problem := _option_problem(replicas, cpus, names=_CLI_NAMES):
        raise SystemExit(problem)
    require_ray()
    folder, _, split = resolve_split(args.model, args.split)
    serve_on_ray(str(folder), split.x, split.y, replicas=replicas, host=args.host, port=args.port, dtype=args.weights,
                 settings=settings, insecure=args.insecure, basis=args.basis, tls_cert=args.tls_cert,
                 tls_key=args.tls_key, cpus_per_replica=cpus, address=args.ray_address, log_level=args.log_level)


def body_frame_cap(settings: ServerSettings) -> int:
    """The frame limit the replicas advertise for these settings."""
    return min(settings.max_frame_bytes, proxy_ws_max_bytes())


_API_NAMES = ("replicas", "cpus_per_replica", "a certificate and a key")
_CLI_NAMES = ("--replicas", "--ray-cpus-per-replica", "--tls-cert and --tls-key")


def _option_problem(replicas: int, cpus_per_replica: float, tls_cert: str | None = None, tls_key: str | None = None,
                    names: tuple[str, str, str] = _API_NAMES) -> str | None:
    """What is wrong with these options, in the words of the Python API or of the CLI (`names`); None: nothing."""
    if replicas < 1:
        return f"{names[0]} must be at least 1, got {replicas}"
    if cpus_per_replica <= 0:
        return f"{names[1]} must be positive, got {cpus_per_replica:g}"
    if bool(tls_cert) != bool(tls_key):
        return f"TLS needs both {names[2]}"
    return None


def _deployment_message(app_name: str) -> str:
    """The last line of what Serve recorded about the deployment's failure (a replica's exception)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
        message = app.deployments[DEPLOYMENT].message if app and DEPLOYMENT in app.deployments else ""
    except Exception:  # noqa: BLE001 - only a better error message is at stake
        return ""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve_running() -> bool:
    import ray

    try:
        ray.get_actor(_SERVE_CONTROLLER, namespace=_SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _free_port(host: str, port: int = 0) -> int:
    """`port` (0: any port) if it is free on host now, else ValueError (Serve's proxy binds it itself, so it
    cannot be handed a socket)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}{f':{port}' if port else ''}: {exc.strerror or exc}") from None
        return s.getsockname()[1]


def _get(url: str, path: str, token: str | None = None, tls: ssl.SSLContext | None = None,
         timeout: float = 30.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = (http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=tls) if tls else
            http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout))
    try:
        conn.request("GET", path, headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                           **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _wait_http(url: str, tls: ssl.SSLContext | None, deadline: float) -> None:
    """Wait until the proxy at url reaches a replica (/healthz answers 200)."""
    last = None
    while time.monotonic() < deadline:
        try:
            status, _, _ = _get(url, "/healthz", tls=tls, timeout=5.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"Serve's proxy does not answer at {url} ({last}); is another Serve instance on this "
                       "cluster listening elsewhere?")
