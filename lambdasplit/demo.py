"""`lambdasplit demo`: a body server on loopback, the paper's prompt through the split, and what the wire saw."""

from __future__ import annotations

import contextlib
import json
import sys

import psutil

from .cli import _wire, format_stats, sampling_options
from .client.generate import GenerationStats, SplitClient
from .client.transport import BodyConnection
from .models.llm import resolve_split
from .models.source import model_name
from .server.process import ServerProcess


def hexdump(data: bytes, limit: int = 96) -> str:
    rows = []
    for off in range(0, min(len(data), limit), 16):
        chunk = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"  {off:04x}  {chunk.hex(' '):<47}  |{text}|")
    return "\n".join(rows)


def run_demo(args) -> None:
    out = sys.stdout
    folder, config, split = resolve_split(args.model, args.split)
    print(f"lambdasplit demo: {model_name(folder)} ({split.n} layers, D={config.hidden_size}), split X:Y = {split}\n"
          f"  device: head = embeddings + layers [0, {split.x}), tail = layers [{split.y}, {split.n}) + norm + "
          f"LM head\n  cloud:  body = layers [{split.x}, {split.y})", file=out)
    print("starting a body server on a free loopback port ...", file=out, flush=True)
    extra = ("--basis", args.basis) if args.basis else ()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ServerProcess(str(folder), f"{split.x}:{split.y}", *extra))
        with BodyConnection(server.url, transport="http") as conn:
            info = conn.info()
        url = server.url
        if args.link:
            from .net.link import link_to

            link = stack.enter_context(link_to(server.url, args.link))
            url = link.url
            print(f"  the device reaches it through an emulated link: {link.spec} (loopback proxy at {url})",
                  file=out)
        client = SplitClient(folder, server=url, split=(split.x, split.y), wire=_wire(args.wire),
                             basis=args.basis, cache=not args.no_cache, transport=args.transport,
                             speculate=args.speculate, max_draft=args.max_draft)
        device = client.model.parameter_report()
        print(f"  body server at {server.url}: holds {info.parameters / 1e6:.1f} M parameters "
              f"({', '.join(_summarise(info.holds))}), resident memory {info.rss_bytes / 2**20:.0f} MiB\n"
              f"  this device holds: head {device['head']['params'] / 1e6:.1f} M + tail "
              f"{device['tail']['params'] / 1e6:.1f} M parameters, {device['total']['params'] / 1e6:.1f} M in all "
              f"(tied embeddings and LM head are one tensor), resident memory "
              f"{psutil.Process().memory_info().rss / 2**20:.0f} MiB\n", file=out)
        print(f"> {args.prompt}\n", file=out, flush=True)
        stats = GenerationStats()
        for piece in client.stream(args.prompt, stats=stats, **sampling_options(args)):
            out.write(piece)
            out.flush()
        print("\n", file=out)
        print(format_stats(stats), file=out)
        print(f"\nwhat the network carried (first uplink frame, {len(stats.first_frame_up)} bytes; "
              f"a header, then {stats.prompt_tokens} x {config.hidden_size} values coded as {client.wire.up}):", file=out)
        print(hexdump(stats.first_frame_up), file=out)
        cloud_only = json.dumps({"model": model_name(folder), "messages": [{"role": "user", "content": args.prompt}]})
        print("\nwhat a cloud-only request would have carried (the prompt in plain text):", file=out)
        print(hexdump(cloud_only.encode(), limit=len(cloud_only.encode())), file=out)
        print(f"\nnote: hidden states are not encryption. After {split.x} layer(s), someone holding the public "
              "weights can recover much of the prompt from them; choose deeper split points for more privacy, "
              "and use TLS off loopback.", file=out)


def _summarise(holds: list[str]) -> list[str]:
    layers = [int(h.split(".")[2]) for h in holds if h.startswith("model.layers.")]
    other = [h for h in holds if not h.startswith("model.layers.")]
    span = [f"layers {min(layers)}..{max(layers)}"] if layers else ["no layers"]
    return span + (other or ["no embeddings, final norm or LM head"])
