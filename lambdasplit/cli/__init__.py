"""The `lambdasplit` command: one module per command group, over the shared option groups in `options`.

Each command module has `register(subparsers)`, which adds its parsers and sets `run` as their default,
and `run(args)`. `main` parses and calls `args.run(args)`: the one way a command is dispatched. Every
command is a thin layer over the library (lambdasplit.server, .client, .bench, ...), so what the CLI
does, a test or a program can do too. Nothing in the library imports this package, and importing it
does not import torch (so --help is quick).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, browser, chat, demo, generate, imagine, plan, privacy, serve, tune, web
from .options import check_required_output

# the order of the commands in --help
COMMANDS = (serve, generate, chat, demo, imagine, web, browser, bench, privacy, plan, tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambdasplit",
        description="Λ-Split inference: the head and tail of a model run on this device, the body on a server; "
                    "only hidden states cross the network, never the prompt or the generated text (though the "
                    "states still reveal much of them: see lambdasplit assess).")
    parser.add_argument("--version", action=Version, help="print the versions of lambdasplit, torch and "
                        "transformers, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


class Version(argparse.Action):
    """--version: the installed versions, read from the packages' metadata (torch is not imported)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"lambdasplit {version('lambdasplit')} (torch {version('torch')}, transformers "
            f"{version('transformers')}, Python {platform.python_version()})")


OPENMP_SPIN = "20000"
"""GNU OpenMP's spin count for lambdasplit's processes (GOMP_SPINCOUNT), unless the environment names one.

torch's CPU build runs on GNU OpenMP, whose idle workers spin up to 300,000 times before they sleep. A
device and a body server on one machine (the demo, the benchmarks, a laptop's loopback) take turns: each
waits while the other computes, and its spinning workers take cores the other needs. A spin of 20,000
keeps workers awake between the parallel regions of one step, and lets them sleep while the other side
computes. Measured with `lambdasplit bench decode` on 2 cores (docs/devices.md): split int4 compiled
56.6-64.7 tokens/s against 48.8-52.1 at the default, the unsplit rows within their spread; 2,000 made
every row slower. It must be set before torch loads OpenMP, so the command line sets it, and the servers
it starts inherit it."""


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)  # before any command imports torch
    args = build_parser().parse_args(argv)
    check_required_output(args)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"lambdasplit {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exc:  # a refusal with a message (SystemExit("...")): the same prefix and status
        if not isinstance(exc.code, str):
            raise
        prefix = "" if exc.code.startswith("lambdasplit ") else f"lambdasplit {args.command}: error: "
        print(prefix + exc.code, file=sys.stderr)
        sys.exit(2)
