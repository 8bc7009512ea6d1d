"""`lambdasplit generate`: the device's head and tail here, the body on a server; the answer streams out."""

from __future__ import annotations

import sys

from .options import (
    add_adapter,
    add_compute,
    add_connection,
    add_model,
    add_route,
    add_sampling,
    add_split,
    add_wire,
    client_token,
    compute_options,
    retry_policy,
    sampling_options,
    wire_pair,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text through a body server",
                       description="Run the head and tail here, the body on --server, and stream the answer.")
    p.add_argument("prompt", help="the prompt (instruct models get their chat template); '-' reads it from stdin")
    add_device_options(p)
    p.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    p.add_argument("--cloud-only", action="store_true",
                   help="talk to a 'serve --cloud-only' server: send the prompt as text (the paper's baseline, "
                        "no privacy)")
    p.add_argument("--stats", action="store_true", help="print speed and traffic to stderr at the end")
    p.set_defaults(run=run)


def add_device_options(p) -> None:
    """The options of a command that runs the head and tail here over a body server (generate, chat)."""
    p.add_argument("--server", default=None, metavar="URL[,URL...]",
                   help="body server URL, e.g. http://127.0.0.1:8470 or https://body.example:8470; several, comma-"
                        "separated, are tried in turn when one fails (omit to run the whole model locally)")
    add_connection(p)
    add_model(p)
    add_split(p, None)
    add_sampling(p)
    add_wire(p)
    add_adapter(p)
    add_compute(p, "head and tail", body_weights=True, compile=True)
    add_route(p)
    p.add_argument("--device-slowdown", type=float, default=1.0, metavar="K",
                   help="EMULATE a device K times slower than this machine: after each head and tail pass, wait "
                        "(K - 1) x the time it took (default 1: no emulation)")


def start_link(args):
    """The emulated link of --link to the one --server (a loopback proxy), or None."""
    if not args.link:
        return None
    if not args.server:
        raise SystemExit("--link emulates the link to a body server: give --server too")
    if "," in args.server:
        raise SystemExit("--link emulates the link to one server: give a single --server URL")
    from ..net.link import link_to

    return link_to(args.server, args.link)


def open_client(args, split: tuple[int, int] | None, link=None):
    """A SplitClient from the device options (through `link` when there is one); loads the head and tail."""
    from ..client.generate import SplitClient

    return SplitClient(args.model, server=link.url if link else args.server, split=split, wire=wire_pair(args),
                       basis=args.basis, cache=not args.no_cache, transport=args.transport,
                       device_slowdown=args.device_slowdown, token=client_token(args), ca_bundle=args.ca_bundle,
                       retry=retry_policy(args), on_event=lambda message: print(f"[lambdasplit] {message}",
                                                                               file=sys.stderr),
                       speculate=args.speculate, max_draft=args.max_draft, adapter=args.adapter,
                       verify=args.verify, hops=args.hops, **compute_options(args))


def read_prompt(prompt: str) -> str:
    """The prompt argument, or stdin's whole text for '-'."""
    if prompt != "-":
        return prompt
    text = sys.stdin.read().strip()
    if not text:
        raise ValueError("the prompt on stdin ('-') is empty")
    return text


def run(args) -> None:
    from ..client.generate import GenerationStats
    from ..models.llm import parse_split

    args.prompt = read_prompt(args.prompt)
    if args.cloud_only:
        return _cloud_only(args)
    split = parse_split(args.split) if args.split else None
    wire_pair(args)  # a malformed --wire fails before the link starts or anything loads
    link = start_link(args)
    try:
        client = open_client(args, split, link)
        stats = GenerationStats()
        for piece in client.stream(args.prompt, chat=not args.no_chat, stats=stats, **sampling_options(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        if link is not None:
            link.stop()
    if args.stats:
        print(format_stats(stats), file=sys.stderr)
        if link is not None:
            print(f"emulated link ({link.spec}): the proxy forwarded {link.bytes_up / 1e3:.1f} kB up and "
                  f"{link.bytes_down / 1e3:.1f} kB down", file=sys.stderr)


def _cloud_only(args) -> None:
    from ..client.cloud import CloudClient, CloudResult

    if not args.server:
        raise SystemExit("--cloud-only needs --server (a 'lambdasplit serve --cloud-only' server)")
    result = CloudResult("", [])
    for piece in CloudClient(args.server).stream(args.prompt, result, chat=not args.no_chat, **sampling_options(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        t = result.traffic
        print(f"cloud-only: {result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated in "
              f"{result.seconds:.2f} s; traffic (counted at the socket): up {t.socket_up / 1e3:.1f} kB, "
              f"down {t.socket_down / 1e3:.1f} kB; the prompt and the answer crossed in plain text", file=sys.stderr)


def format_stats(stats) -> str:
    """The --stats lines: speed, where the time went, speculation and the traffic."""
    lines = [f"{stats.prompt_tokens} prompt tokens, {stats.new_tokens} generated, "
             f"{stats.tokens_per_s:.1f} tokens/s (decode); prefill {stats.prefill_s * 1000:.0f} ms; "
             f"time: device {stats.device_s:.2f} s, network {stats.network_s:.2f} s, cloud {stats.cloud_s:.2f} s"]
    t = stats.traffic
    if stats.weights[0]:
        lines.append(f"weights: head and tail {stats.weights[0]}, body {stats.weights[1]}")
    if stats.recoveries:
        lines.append(f"the body server was lost {stats.recoveries} time(s); each time a new session replayed the prefix")
    if stats.device_slowdown > 1:
        lines.append(f"EMULATED device {stats.device_slowdown:g}x slower than this machine: {stats.head_tail_s:.2f} s "
                     f"of head and tail compute, {stats.emulated_wait_s:.2f} s of added waiting (counted as device time)")
    spec = stats.speculation
    if spec.rounds:
        lines.append(f"speculation: {stats.decode_rounds} decode round trips for {stats.new_tokens - 1} tokens "
                     f"({stats.tokens_per_round_trip:.2f} per round trip); {spec.accepted} of {spec.drafted} drafts "
                     f"accepted ({spec.acceptance:.0%}), {spec.draft_s * 1000:.0f} ms spent drafting")
    if t is not None:
        where = "counted at the socket, headers included" if t.counted_at_socket else "frame bytes only"
        up, down = (t.socket_up, t.socket_down) if t.counted_at_socket else (t.frame_up, t.frame_down)
        lines.append(f"traffic ({where}): up {up / 1e3:.1f} kB, down {down / 1e3:.1f} kB in {t.steps} steps "
                     f"(frames alone: up {t.frame_up / 1e3:.1f} kB, down {t.frame_down / 1e3:.1f} kB)")
    return "\n".join(lines)
