"""`lambdasplit demo`: a body server on loopback, the paper's prompt through the split, and what the wire saw."""

from __future__ import annotations

import contextlib
import json
import sys

from ..data import IMAGE_PROMPT, PAPER_PROMPT
from .imagine import add_image_options
from .options import add_compute, add_model, add_sampling, add_split, add_wire, sampling_options, wire_pair


def register(sub) -> None:
    p = sub.add_parser("demo", help="start a body server and generate through it, showing what the wire carries",
                       description="Start a body server on a free loopback port, run the paper's prompt through "
                                   "the split model, and show the answer, the speed, the traffic and the bytes "
                                   "the network saw.")
    p.add_argument("prompt", nargs="?", default=PAPER_PROMPT, help=f"default: {PAPER_PROMPT!r}")
    add_model(p)
    add_split(p, "1:-1")
    add_sampling(p)
    add_wire(p)
    add_compute(p, "head, tail and body", compile=True)
    p.add_argument("--image", action="store_true",
                   help=f"the text-to-image path instead: the embedded digits model (or --model PIPELINE), the "
                        f"U-Net on the server, and the prompt {IMAGE_PROMPT!r} unless one is given")
    add_image_options(p, p.add_argument_group("image (with --image)"))
    p.set_defaults(max_new_tokens=160, run=run)


def run(args) -> None:
    if args.image:
        from .imagine import run_image_demo

        return run_image_demo(args, IMAGE_PROMPT if args.prompt == PAPER_PROMPT else args.prompt)
    _run_text_demo(args, sys.stdout)


def _run_text_demo(args, out) -> None:
    from ..client.generate import GenerationStats, SplitClient
    from ..client.transport import BodyConnection
    from ..models.device import resolve_device
    from ..models.formats import choose_format
    from ..models.llm import resolve_split
    from ..models.source import model_name
    from ..server.process import ServerProcess
    from .generate import format_stats

    # a GGUF file is read at the compute format (fp16 for the CPU's int4 default), never unpacked further
    storage = choose_format(args.weights, resolve_device(args.device)).storage
    folder, config, split = resolve_split(args.model, args.split, storage=storage)
    wire = wire_pair(args)
    print(f"lambdasplit demo: {model_name(folder)} ({split.n} layers, D={config.hidden_size}), split X:Y = {split}\n"
          f"  device: head = embeddings + layers [0, {split.x}), tail = layers [{split.y}, {split.n}) + norm + "
          f"LM head\n  cloud:  body = layers [{split.x}, {split.y})", file=out)
    print("starting a body server on a free loopback port ...", file=out, flush=True)
    extra = ("--basis", args.basis) if args.basis else ()
    with contextlib.ExitStack() as stack:
        extra += ("--device", args.device) + (("--weights", args.weights) if args.weights else ()) \
            + (("--compile",) if args.compile else ())
        server = stack.enter_context(ServerProcess(str(folder), f"{split.x}:{split.y}", *extra))
        with BodyConnection(server.url, transport="http") as conn:
            info = conn.info()
        url = server.url
        if args.link:
            from ..net.link import link_to

            link = stack.enter_context(link_to(server.url, args.link))
            url = link.url
            print(f"  the device reaches it through an emulated link: {link.spec} (loopback proxy at {url})",
                  file=out)
        client = SplitClient(folder, server=url, split=(split.x, split.y), wire=wire, basis=args.basis,
                             cache=not args.no_cache, transport=args.transport, speculate=args.speculate,
                             max_draft=args.max_draft, device=args.device, weights=args.weights,
                             compile=args.compile)
        print(_holdings(server.url, info, client.model.parameter_report()), file=out)
        print(f"> {args.prompt}\n", file=out, flush=True)
        stats = GenerationStats()
        for piece in client.stream(args.prompt, stats=stats, **sampling_options(args)):
            out.write(piece)
            out.flush()
        print("\n", file=out)
        print(format_stats(stats), file=out)
        print(_what_the_network_saw(args.prompt, stats, model_name(folder), config.hidden_size, client.wire.up,
                                    split.x), file=out)


def _holdings(url: str, info, device: dict) -> str:
    import psutil

    return (f"  body server at {url}: holds {info.parameters / 1e6:.1f} M parameters "
            f"({', '.join(_summarise(info.holds))}), resident memory {info.rss_bytes / 2**20:.0f} MiB\n"
            f"  this device holds: head {device['head']['params'] / 1e6:.1f} M + tail "
            f"{device['tail']['params'] / 1e6:.1f} M parameters, {device['total']['params'] / 1e6:.1f} M in all "
            f"(tied embeddings and LM head are one tensor), resident memory "
            f"{psutil.Process().memory_info().rss / 2**20:.0f} MiB\n")


def _what_the_network_saw(prompt: str, stats, model: str, hidden_size: int, codec: str, x: int) -> str:
    from ..wire.hexdump import hexdump

    cloud_only = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode()
    return "\n".join([
        f"\nwhat the network carried (first uplink frame, {len(stats.first_frame_up)} bytes; "
        f"a header, then {stats.prompt_tokens} x {hidden_size} values coded as {codec}):",
        hexdump(stats.first_frame_up),
        "\nwhat a cloud-only request would have carried (the prompt in plain text):",
        hexdump(cloud_only, limit=len(cloud_only)),
        f"\nnote: hidden states are not encryption. After {x} layer(s), someone holding the public "
        "weights can recover much of the prompt from them; choose deeper split points for more privacy, "
        "and use TLS off loopback."])


def _summarise(holds: list[str]) -> list[str]:
    layers = [int(h.split(".")[2]) for h in holds if h.startswith("model.layers.")]
    other = [h for h in holds if not h.startswith("model.layers.")]
    span = [f"layers {min(layers)}..{max(layers)}"] if layers else ["no layers"]
    return span + (other or ["no embeddings, final norm or LM head"])
