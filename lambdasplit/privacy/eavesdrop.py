"""The eavesdropper's view: what a passive observer of the link reads, and what the attacks recover from it.

    device (SplitClient) ──▶ recording LinkProxy ──▶ body server (a real subprocess)
                                    │ raw bytes, each connection, each way
                                    ▼
                         net.tap.observe: HTTP, WebSocket, TLS, session JSON, LSPL frames -> tensors
                                    ▼
                         attacks.load_attack: states at X (uplink) and Y (downlink) -> tokens

The observer works from the recorded bytes alone. The device's own result (its prompt ids and the
tokens it generated) is used only to score the reconstruction and to print it beside the truth.
In cloud-only mode the observer simply reads the prompt and the answer; over TLS it gets records
of ciphertext and nothing else.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ..net.link import LinkProxy, LinkSpec, Recording
from ..net.tap import FrameSeen, Observation, observe
from ..wire.spec import parse_wire

CELL_WIDTH = 100  # columns of an aligned reconstruction line


@dataclass
class SplitCapture:
    """A split generation through a recording link: the recordings, and the device's own truth."""

    recordings: list[Recording]
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    x: int
    y: int
    wire: tuple[str, str]
    seconds: float

    @property
    def fed_ids(self) -> list[int]:
        """The token at each position the device sent through the body: the prompt, then every generated
        token but the last (which is never fed back)."""
        return self.prompt_ids + self.token_ids[:-1]


@dataclass
class CloudCapture:
    recordings: list[Recording]
    prompt: str
    text: str
    token_ids: list[int]
    seconds: float


def _proxy_for(url: str, link: str | LinkSpec | None) -> tuple[LinkProxy, str]:
    """A started recording proxy in front of a server URL, and the URL to reach the server through it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError("the server must be given as http://HOST:PORT (or https:// for a local TLS server), "
                         f"got {url!r}")
    try:  # the proxy would only close the client's connections: say plainly who is not there
        socket.create_connection((parts.hostname, parts.port), timeout=10).close()
    except OSError as exc:
        raise RuntimeError(f"cannot reach the server at {url}: {exc.strerror or exc}") from None
    spec = link if isinstance(link, LinkSpec) else LinkSpec.parse(link) if link else LinkSpec()
    proxy = LinkProxy(parts.hostname, parts.port, spec, record=True).start()
    return proxy, f"{parts.scheme}://{proxy.listen_host}:{proxy.port}"


def capture_split(model: str | Path | None, server: str, *, split: tuple[int, int], wire: str | tuple[str, str], prompt: str,
                  max_new_tokens: int = 40, transport: str = "ws", link: str | LinkSpec | None = None,
                  basis: str | None = None, token: str | None = None, ca_bundle: str | None = None,
                  chat: bool = True, on_text: Callable[[str], None] | None = None) -> SplitCapture:
    """Generate greedily with the head and tail here and the body on `server`, through a recording proxy."""
    from ..client.generate import SplitClient, TextStream

    proxy, url = _proxy_for(server, link)
    try:
        client = SplitClient(model, server=url, split=split, wire=wire, basis=basis, transport=transport,
                             token=token, ca_bundle=ca_bundle, speculate="off")  # one position per step: aligned
        ids = client.encode_prompt(prompt, chat=chat)
        stream, tokens, started = TextStream(client.tokenizer), [], time.perf_counter()
        for token_id in client.generate_ids(ids, max_new_tokens=max_new_tokens):
            tokens.append(token_id)
            if (piece := stream.push(token_id)) and on_text:
                on_text(piece)
        seconds = time.perf_counter() - started
    finally:
        proxy.stop()
    text = client.tokenizer.decode(tokens, skip_special_tokens=True)
    return SplitCapture(proxy.recordings, prompt, ids, tokens, text, client.split.x, client.split.y,
                        (client.wire.up, client.wire.down), seconds)


def capture_cloud(server: str, *, prompt: str, max_new_tokens: int = 40, link: str | LinkSpec | None = None,
                  chat: bool = True, on_text: Callable[[str], None] | None = None) -> CloudCapture:
    """Generate on a cloud-only server (`serve --cloud-only`) through a recording proxy."""
    from ..client.cloud import CloudClient, CloudResult

    proxy, url = _proxy_for(server, link)
    try:
        result, started = CloudResult("", []), time.perf_counter()
        for piece in CloudClient(url).stream(prompt, result, max_new_tokens=max_new_tokens, chat=chat):
            if on_text:
                on_text(piece)
        seconds = time.perf_counter() - started
    finally:
        proxy.stop()
    return CloudCapture(proxy.recordings, prompt, result.text, result.token_ids, seconds)


# ---- reconstruction ------------------------------------------------------------------------------

@dataclass
class Reconstruction:
    """One attack on the states one direction carried: guesses per position, and the truth to compare with."""

    direction: str  # "uplink" or "downlink"
    layer: int  # the state entering this layer
    target: str  # "input": the token at the position; "next": the token the model produces next
    attack: str
    positions: list[int]
    guesses: torch.Tensor  # (n, k) token ids, best first
    truth: list[int] | None = None  # per position, from the device's own result (for comparison only)

    def hits(self, k: int = 1) -> int:
        if self.truth is None:
            return 0
        return sum(t in g[:k].tolist() for t, g in zip(self.truth, self.guesses))

    def rate(self, k: int = 1) -> float | None:
        return self.hits(k) / len(self.positions) if self.truth is not None and self.positions else None


def prompt_rows(obs: Observation, session_id: str | None) -> int:
    """How many positions the prompt had, as the observer reads it: the rows of the first uplink frame."""
    frames = obs.decoded("up", session_id) or obs.decoded("down", session_id)
    return frames[0].tensor.reshape(-1, frames[0].tensor.shape[-1]).shape[0] if frames else 0


def reconstruct(obs: Observation, model_folder: Path, x: int, y: int, *, capture: SplitCapture | None = None,
                k: int = 5, progress: Callable[[str], None] | None = None) -> list[Reconstruction]:
    """Run the best attack at X on the uplink states and at Y on the downlink states (input and next token).

    `capture` only supplies the truth for scoring; the states come from the observation alone."""
    from .attacks import load_attack

    session = obs.main_session()
    n_prompt = prompt_rows(obs, session)
    all_ids = capture.prompt_ids + capture.token_ids if capture else None
    jobs = [("uplink", "up", x, "input"), ("downlink", "down", y, "input"), ("downlink", "down", y, "next")]
    out = []
    for direction, way, layer, target in jobs:
        positions, states = obs.states(way, session)
        if states is None:
            continue
        if target == "next":  # what the model is about to say: the positions whose next token it generated
            keep = [i for i, p in enumerate(positions) if p >= n_prompt - 1]
            positions, states = [positions[i] for i in keep], states[keep]
        if not positions:
            continue
        if progress:
            progress(f"attacking the {direction} states at layer {layer} ({len(positions)} positions, "
                     f"target: {target} token)")
        attack = load_attack(model_folder, layer, target)
        guesses = attack.topk(states, k)
        truth = None
        if all_ids is not None:
            shift = 1 if target == "next" else 0
            truth = [all_ids[p + shift] if p + shift < len(all_ids) else -1 for p in positions]
        out.append(Reconstruction(direction, layer, target, attack.name, positions, guesses, truth))
    return out


# ---- rendering -----------------------------------------------------------------------------------

def _cell(tokenizer, token_id: int) -> str:
    if token_id < 0:
        return "∅"
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return (text.replace("\r", "␍").replace("\n", "⏎").replace("\t", "⇥") or "∅")


def _columns(text: str) -> int:
    """Terminal columns a string takes: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def aligned(tokenizer, guesses: list[int], truth: list[int] | None, indent: str = "    ",
            width: int = CELL_WIDTH) -> list[str]:
    """The reconstruction under the truth, token by token, padded to line up; ^ marks a wrong token."""
    rows: list[tuple[list[str], list[str], list[str]]] = [([], [], [])]
    used = 0
    for i, guess in enumerate(guesses):
        spied = _cell(tokenizer, guess)
        real = _cell(tokenizer, truth[i]) if truth is not None else spied
        w = max(_columns(spied), _columns(real))
        if used + w > width and used:
            rows.append(([], [], []))
            used = 0
        t, s, m = rows[-1]
        t.append(real + " " * (w - _columns(real)))
        s.append(spied + " " * (w - _columns(spied)))
        m.append(("^" if truth is not None and truth[i] != guess else " ") * w)
        used += w
    lines = []
    for t, s, m in rows:
        if truth is not None:
            lines.append(f"{indent}truth │{''.join(t)}")
        lines.append(f"{indent}spied │{''.join(s)}")
        if truth is not None and "^" in "".join(m):
            lines.append(f"{indent}      │{''.join(m).rstrip()}")
    return lines


def render_reconstruction(r: Reconstruction, tokenizer, n_prompt: int) -> list[str]:
    what = {"input": "the token at each position", "next": "the token the model says next"}[r.target]
    head = f"{r.direction} (layer {r.layer}), {r.attack} attack, reading {what}"
    lines = [head]
    if r.truth is not None:
        n = len(r.positions)
        lines.append(f"  recovered {r.hits(1)}/{n} tokens ({r.rate(1):.0%}) at top-1, {r.hits(5)}/{n} "
                     f"({r.rate(5):.0%}) among the 5 best guesses (a lower bound: stronger attacks exist)")
    best = r.guesses[:, 0].tolist()
    if r.target == "next":
        lines.append("  the answer, read off the downlink before the device's tail produced it:")
        lines += aligned(tokenizer, best, r.truth)
        return lines
    cut = sum(p < n_prompt for p in r.positions)
    if cut:
        lines.append(f"  the prompt ({cut} positions, as the model saw it):")
        lines += aligned(tokenizer, best[:cut], r.truth[:cut] if r.truth else None)
    if len(best) > cut:
        lines.append(f"  the answer as the device fed it back ({len(best) - cut} positions):")
        lines += aligned(tokenizer, best[cut:], r.truth[cut:] if r.truth else None)
    return lines


def _kb(n: int) -> str:
    return f"{n / 1e3:.1f} kB"


def _frames_line(frames: list[FrameSeen]) -> str:
    if not frames:
        return "none"
    shapes = Counter("×".join(map(str, f.shape)) for f in frames)
    codecs = sorted({f.codec for f in frames})
    parts = ", ".join(f"{n} of [{s}]" for s, n in shapes.items())
    return f"{len(frames)} ({parts}; codec {', '.join(codecs)}; {_kb(sum(f.size for f in frames))})"


def render_observation(obs: Observation, recordings: list[Recording] = (), secret: str = "") -> list[str]:
    """What the observer found on the link, connection by connection. `secret` (the user's prompt, known
    to the device only) is searched for in the recorded bytes, to show whether it crossed in plain text."""
    up = sum(c.bytes_up for c in obs.connections)
    down = sum(c.bytes_down for c in obs.connections)
    lines = [f"{len(obs.connections)} connection(s), {_kb(up)} up, {_kb(down)} down"]
    for c in obs.connections:
        lines.append(f"  connection {c.index}: {c.protocol}, {_kb(c.bytes_up)} up, {_kb(c.bytes_down)} down")
        lines += [f"    {e}" for e in c.exchanges[:6]]
        if len(c.exchanges) > 6:
            lines.append(f"    … and {len(c.exchanges) - 6} more requests")
    tls = obs.tls
    if tls is not None:
        types = ", ".join(f"{n} {t}" for t, n in tls.types.most_common())
        lines.append(f"  TLS: {tls.records} records ({types}), {_kb(tls.bytes)}, of which {_kb(tls.ciphertext)} "
                     f"encrypted application data; entropy {tls.entropy:.3f} bits/byte (8 = random)")
    for s in obs.sessions:
        w = s.wire
        lines.append(f"  session opened in plain JSON: layers [{s.request.get('x')}, {s.request.get('y')}), "
                     f"wire up {w.get('up')}, down {w.get('down')}, rotation seed {w.get('seed')}"
                     + (f" ({s.problem})" if s.problem else " -> the observer builds the same codecs"))
    hidden = [f for f in obs.frames if f.tensor is not None]
    if hidden or not (obs.completions or tls):
        lines.append(f"  frames decoded up: {_frames_line([f for f in hidden if f.direction == 'up'])}")
        lines.append(f"  frames decoded down: {_frames_line([f for f in hidden if f.direction == 'down'])}")
    for c in obs.completions:
        lines.append(f"  cloud-only request, read in plain text: prompt {c.prompt!r}")
        lines.append(f"  cloud-only answer, read in plain text ({len(c.token_ids)} tokens): {c.answer!r}")
    if tls is not None and not hidden and not obs.completions:
        lines.append("  -> ciphertext only: no HTTP request, no session JSON, no frame "
                     f"({obs.magic_hits} occurrences of the LSPL magic), no text")
        lines.append("  -> still visible: when and how much each side sent (record sizes and counts track the "
                     "prompt's length and the steps)")
    if secret:
        found = in_plain_text(recordings, secret)
        lines.append(f"  the prompt {secret[:40]!r}{'…' if len(secret) > 40 else ''} is in the captured bytes: "
                     f"{'YES, in plain text' if found else 'no'}")
    problems = obs.problems
    lines += [f"  could not parse: {p}" for p in problems[:8]]
    if len(problems) > 8:
        lines.append(f"  … and {len(problems) - 8} more problems")
    return lines


def in_plain_text(recordings: list[Recording], text: str) -> bool:
    """Whether `text` occurs in the recorded bytes as UTF-8 or as a JSON string would carry it."""
    import json

    forms = {text.encode(), json.dumps(text)[1:-1].encode()}
    return any(form in data for r in recordings for data in (r.up, r.down) for form in forms)


# ---- the command ---------------------------------------------------------------------------------

def _say(message: str) -> None:
    print(f"[eavesdrop] {message}", file=sys.stderr, flush=True)


def _stream_to_stderr(label: str) -> Callable[[str], None]:
    """A progress callback: the device's answer as it arrives, on one stderr line."""
    started = []

    def show(piece: str) -> None:
        if not started:
            started.append(True)
            print(f"[eavesdrop] {label}: ", end="", file=sys.stderr)
        print(piece.replace("\n", " "), end="", file=sys.stderr, flush=True)

    return show


def _print(lines: list[str] | str = "") -> None:
    print("\n".join(lines) if isinstance(lines, list) else lines, flush=True)


def _servers(args, mode: str, folder: Path, certs: tuple | None) -> dict:
    """Start the server processes the run needs, at once (each loads its model in its own process)."""
    from ..server.process import ServerProcess

    wanted = {}
    if mode in ("split", "both") and not args.server:
        tls = ["--tls-cert", str(certs[1]), "--tls-key", str(certs[2])] if certs else []
        basis = ["--basis", args.basis] if args.basis else []
        wanted["split"] = (args.split, *tls, *basis)
    if mode in ("cloud-only", "both") and not args.cloud_server:
        wanted["cloud-only"] = (args.split, "--cloud-only")
    started, errors = {}, []

    def start(kind: str, argv: tuple) -> None:
        try:
            started[kind] = ServerProcess(str(folder), *argv)
        except RuntimeError as exc:
            errors.append(f"the {kind} server: {exc}")

    if wanted:
        _say(f"starting {' and '.join(f'a {k} server' for k in wanted)} on free loopback ports…")
    threads = [threading.Thread(target=start, args=(k, v)) for k, v in wanted.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for server in started.values():
            server.stop()
        raise RuntimeError("; ".join(errors))
    return started


def run_eavesdrop(args, token: str | None = None) -> None:
    from transformers import AutoTokenizer

    from ..models.llm import resolve_split
    from ..wire.lowrank import Basis

    folder, _, split = resolve_split(args.model, args.split)
    mode = args.mode
    for flag, url in (("--server", args.server), ("--cloud-server", args.cloud_server)):
        if url and not url.startswith("http://"):
            raise ValueError(f"{flag} must be http://HOST:PORT (the recording proxy passes TLS through, but its "
                             f"address would not match the server's certificate), got {url!r}; --tls starts a "
                             "local TLS server instead")
    if args.tls and args.server:
        raise ValueError("--tls starts its own TLS server with a throwaway certificate; leave out --server")
    if args.tls and mode != "split":
        if mode == "cloud-only":
            raise ValueError("--tls runs in split mode only: the cloud-only client speaks plain HTTP")
        _say("--tls: running split mode only (the cloud-only client speaks plain HTTP; over TLS its "
             "bytes would be ciphertext all the same)")
        mode = "split"
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    wire = parse_wire(args.wire)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    basis = Basis.load(args.basis) if args.basis else None
    with tempfile.TemporaryDirectory(prefix="lambdasplit-eavesdrop-") as tmp:
        certs = None
        if args.tls:
            from ..net.certs import make_certs

            certs = make_certs(Path(tmp))
            _say("made a throwaway CA and a certificate for 127.0.0.1")
        servers = _servers(args, mode, folder, certs)
        try:
            if mode in ("cloud-only", "both"):
                _cloud_only(args, servers["cloud-only"].url if "cloud-only" in servers else args.cloud_server)
            if mode in ("split", "both"):
                url = args.server or servers["split"].url
                _split(args, folder, url, (split.x, split.y), wire, basis, tokenizer, certs, token)
        finally:
            for server in servers.values():
                server.stop()


def _cloud_only(args, url: str) -> None:
    _say(f"cloud-only: the device sends the prompt as text through the recording link to {url}…")
    cap = capture_cloud(url, prompt=args.prompt, max_new_tokens=args.max_new_tokens, link=args.link,
                        chat=not args.no_chat, on_text=_stream_to_stderr("the device receives"))
    print(file=sys.stderr)
    obs = observe(cap.recordings)
    _dump(args, "cloud-only", cap.recordings)
    _print("=== cloud-only: what the observer of the link reads ===")
    _print(render_observation(obs, cap.recordings, cap.prompt))
    same = any(c.token_ids == cap.token_ids for c in obs.completions)
    _print(f"  the observer's copy of the answer is the device's, token for token: {'yes' if same else 'no'}")
    _print()


def _split(args, folder: Path, url: str, split: tuple[int, int], wire: tuple[str, str], basis, tokenizer,
           certs, token: str | None) -> None:
    _say(f"split {split[0]}:{split[1]}: the device generates up to {args.max_new_tokens} tokens through the "
         f"recording link to {url} (wire {wire[0]} up, {wire[1]} down, transport {args.transport})…")
    cap = capture_split(folder, url, split=split, wire=wire, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                        transport=args.transport, link=args.link, basis=args.basis, token=token,
                        ca_bundle=str(certs[0]) if certs else None, chat=not args.no_chat,
                        on_text=_stream_to_stderr("the device's tail produces"))
    print(file=sys.stderr)
    _say(f"generated {len(cap.token_ids)} tokens in {cap.seconds:.1f} s; the observer parses the capture…")
    obs = observe(cap.recordings, basis)
    _dump(args, "split", cap.recordings)
    title = f"Λ-Split {cap.x}:{cap.y}" + (" over TLS" if certs else "")
    _print(f"=== {title}: what the observer of the link reads ===")
    _print(render_observation(obs, cap.recordings, cap.prompt))
    _print()
    _print(f"the device's answer (its own output, for comparison): {cap.text.strip()!r}")
    _print()
    if not obs.decoded("up") and not obs.decoded("down"):
        _print("no hidden state could be read off the link: there is nothing to attack.")
        return
    recons = reconstruct(obs, folder, cap.x, cap.y, capture=cap, progress=_say)
    n_prompt = prompt_rows(obs, obs.main_session())
    _print("=== the best attack on what the observer captured (truth: the device's own tokens) ===")
    for r in recons:
        _print(render_reconstruction(r, tokenizer, n_prompt))
        _print()


def _dump(args, name: str, recordings: list[Recording]) -> None:
    """Write the raw recordings (conn<i>.up / .down) for a hex dump or another tool, if --dump DIR was given."""
    if not args.dump:
        return
    out = Path(args.dump) / name
    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(recordings):
        (out / f"conn{i}.up").write_bytes(r.up)
        (out / f"conn{i}.down").write_bytes(r.down)
    _say(f"wrote the raw bytes of {len(recordings)} connection(s) to {out}")
