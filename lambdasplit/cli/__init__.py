"""The `lambdasplit` command: one module per command group, over the shared option groups in `options`.

Each command module has `register(subparsers)`, which adds its parsers and sets `run` as their default,
and `run(args)`. `main` parses and calls `args.run(args)`: the one way a command is dispatched. Every
command is a thin layer over the library (lambdasplit.server, .client, .bench, ...), so what the CLI
does, a test or a program can do too. Nothing in the library imports this package, and importing it
does not import torch (so --help is quick).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, generate, imagine, plan, privacy, serve, tune, web

# the order of the commands in --help
COMMANDS = (serve, generate, demo, imagine, web, bench, privacy, plan, tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambdasplit",
        description="Λ-Split inference: the head and tail of a model run on this device, the body on a server; "
                    "only hidden states cross the network, never the prompt or the generated text (though the "
                    "states still reveal much of them: see lambdasplit assess).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"lambdasplit {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
