"""llama.cpp's decode speed on a GGUF file, in a process of its own, for `bench decode`'s reference row.

    python -m lambdasplit.bench.llamacpp FILE --threads T --tokens N --ids 1,2,3

loads FILE with `llama-cpp-python` (an optional extra: pip install llama-cpp-python), then answers each
line `run` on stdin with one JSON line: the decode speed (tokens after the first, over their time) and
the greedy tokens. A process of its own, because llama.cpp and torch in one process compete for the same
cores with two thread pools, and the bench takes turns between rows. Imports no torch.

The prompt is evaluated one token per batch (`n_batch=1`): batched prompt evaluation crashed this build
of llama.cpp on a CPU with AMX (2026-12); decoding, the part measured, runs one token per step anyway.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    args = p.parse_args(argv)
    ids = [int(t) for t in args.ids.split(",")]
    out = sys.stdout
    sys.stdout = sys.stderr  # llama.cpp's own chatter must not mix with the JSON answers
    from llama_cpp import Llama

    # verbose=False crashed on load in this build (it redirects the C streams); its log goes to stderr instead
    llm = Llama(model_path=args.gguf, n_ctx=len(ids) + args.tokens + 8, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=1, n_ubatch=1, verbose=True)
    print(json.dumps({"ready": True, "pid": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        gen = llm.generate(ids, temp=0.0, reset=True)
        tokens = [next(gen)]
        start = time.perf_counter()
        tokens += list(itertools.islice(gen, args.tokens - 1))
        seconds = time.perf_counter() - start
        print(json.dumps({"tokens_per_s": (len(tokens) - 1) / seconds, "tokens": tokens}), file=out, flush=True)


if __name__ == "__main__":
    main()
