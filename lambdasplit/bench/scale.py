"""`lambdasplit bench scale`: what scaling out costs and buys, in one run.

    ray        tokens/s for 1 and 2 Ray Serve replicas of the body under C concurrent clients
    overhead   the time of one decode step through a standalone server against one through Ray Serve
    hops       one hop [X, Y) against two hops [X, M) + [M, Y), chained by the client or forwarded by the
               first server, with the device's links to the servers emulated (the servers' link to each
               other is loopback: a data centre)
    verify     cross-checking each step on k = 1, 2, 3 replicas of the body

Every part runs real server processes on loopback and generates greedily (speculation off). All of them
share this machine: with 2 cores, k replicas computing the same step, or 2 replicas serving clients,
compete for the same cores, which a real deployment on k machines would not. The report says so.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..client.generate import SplitClient
from ..models.source import model_name, resolve_model
from ..net.link import LinkProxy, LinkSpec
from ..server.process import ServerProcess
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from .harness import client_compute, compute_meta, serve_compute

PROMPT = "Explain in a few sentences why the sky is blue."
PARTS = ("ray", "overhead", "hops", "verify")


@dataclass
class Row:
    part: str
    setup: str
    clients: int
    tokens: int  # generated, over all clients
    tokens_per_s: float  # aggregate
    ms_per_step: float  # the median device-side wait for one step of the body
    device_round_trips_per_token: float
    bytes_per_token: float  # what the device sent and received, headers included
    identical: bool  # the same tokens as the part's baseline
    note: str = ""
    runs: str = ""  # the range of tokens/s over the repeated runs


def _one_thread(env: dict | None = None) -> dict:
    return {**(env or {}), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(clients: list[SplitClient], tokens: int, part: str, setup: str, baseline: list[int] | None,
         note: str = "") -> tuple[Row, list[int]]:
    """Every client generates the same prompt once, side by side; one row of what that took, and the first
    client's tokens (greedy: every client's should equal them, and the baseline's)."""
    def one(client):
        result = client.generate(PROMPT, max_new_tokens=tokens, stop_at_eos=False)
        return result.token_ids, result.stats

    started = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(one, clients))
    wall = time.perf_counter() - started
    outs = [tokens_ for tokens_, _ in results]
    stats = [s for _, s in results]
    made = sum(len(o) for o in outs)
    steps = sum(s.traffic.steps for s in stats)
    moved = sum(s.traffic.socket_up + s.traffic.socket_down for s in stats)
    step_ms = statistics.median(1000 * s.body_s / max(s.new_tokens, 1) for s in stats)
    same = all(o == (baseline if baseline is not None else outs[0]) for o in outs)
    return Row(part, setup, len(clients), made, made / wall, step_ms, steps / made, moved / made, same, note), outs[0]


def run_scale_bench(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    folder = resolve_model(args.model)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in parts if p not in PARTS]:
        raise ValueError(f"unknown part(s) {bad}; known: {', '.join(PARTS)}")
    if args.tokens < 2 or args.clients < 1 or args.repeats < 1:
        raise ValueError("need --tokens >= 2, --clients >= 1 and --repeats >= 1")
    x, m, y = (int(v) for v in args.split.split(":"))
    if not 0 <= x < m < y:
        raise ValueError(f"--split takes X:M:Y with X < M < Y (two hops, [X, M) and [M, Y)), got {args.split}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the device's side: one thread, like each server
    import torch

    torch.set_num_threads(1)
    common = dict(speculate="off", wire=args.wire, **client_compute(args))
    compute = compute_meta(args)
    print(f"bench scale: {compute['weights']} on {compute['device']}", flush=True)
    rows: list[Row] = []
    started = time.time()
    bar = tqdm(total=len(parts), desc="scale bench", unit="part")
    if "ray" in parts or "overhead" in parts:
        rows += _ray_parts(folder, (x, y), parts, args, common)
        bar.update(("ray" in parts) + ("overhead" in parts))
    if "hops" in parts:
        rows += _hops_part(folder, (x, m, y), args, common)
        bar.update()
    if "verify" in parts:
        rows += _verify_part(folder, (x, y), args, common)
        bar.update()
    bar.close()
    meta = {**machine_meta(), **compute, "model": model_name(folder), "split": args.split, "wire": args.wire,
            "tokens": args.tokens, "clients": args.clients, "link": args.link, "repeats": args.repeats,
            "seconds": round(time.time() - started)}
    table = _markdown(rows)
    caption = (f"lambdasplit bench scale, {meta['date']}, {meta['machine']}, torch {meta['torch']}; model "
               f"{meta['model']}, body layers {x}:{y} (two hops: {x}:{m} and {m}:{y}), wire {args.wire}, "
               f"{args.tokens} greedy tokens per client, speculation off, one torch thread per process; each "
               f"row is the median of {args.repeats} runs (setups of a part taking turns). Every "
               "server and the device share this machine's cores: replicas and cross-checks that would run on "
               "separate machines compete here. ms/step: the device's median wait for the body per token. "
               f"The hops part emulates the device's link to each server ({args.link}); servers reach each "
               "other over plain loopback.")
    write_report(Path(args.out), "scale", rows, table, caption, meta, plot=lambda path: _plot(rows, path))
    return rows


def _ray_parts(folder: Path, split: tuple[int, int], parts: list[str], args, common: dict) -> list[Row]:
    from ..server.context import ServerSettings
    from ..server.ray_serve import start_ray_body

    rows: list[Row] = []
    x, y = split
    with ServerProcess(str(folder), f"{x}:{y}", *serve_compute(args), env=_one_thread()) as standalone:
        client = SplitClient(folder, server=standalone.url, **common)
        client.generate(PROMPT, max_new_tokens=2)  # warm-up
        runs = [_run([client], args.tokens, "overhead", "standalone server, 1 client", None) for _ in range(args.repeats)]
        baseline = runs[0][1]
        if "overhead" in parts:
            rows.append(_median([row for row, _ in runs]))
    for replicas in (1, 2):
        ray = start_ray_body(folder, x, y, replicas=replicas, cpus_per_replica=1, num_cpus=2, log_to_driver=False,
                             settings=ServerSettings(device=args.device), dtype=args.weights)
        try:
            client = SplitClient(folder, server=ray.url, **common)
            client.generate(PROMPT, max_new_tokens=2)
            if replicas == 1 and "overhead" in parts:
                rows.append(_median([_run([client], args.tokens, "overhead", "Ray Serve, 1 replica, 1 client",
                                          baseline)[0] for _ in range(args.repeats)]))
            if "ray" in parts:
                clients = [SplitClient(folder, server=ray.url, **common) for _ in range(args.clients)]
                rows.append(_median([_run(clients, args.tokens, "ray", f"Ray Serve, {replicas} replica(s)",
                                          baseline)[0] for _ in range(args.repeats)]))
        finally:
            ray.shutdown()
    return rows


def _linked(stack: ExitStack, server: ServerProcess, link: LinkSpec) -> str:
    proxy = LinkProxy("127.0.0.1", int(server.url.rsplit(":", 1)[1]), link).start()
    stack.callback(proxy.stop)
    return proxy.url


def _hops_part(folder: Path, cut: tuple[int, int, int], args, common: dict) -> list[Row]:
    x, m, y = cut
    link = LinkSpec.parse(args.link)
    with ExitStack() as stack:
        serve = serve_compute(args)
        whole = stack.enter_context(ServerProcess(str(folder), f"{x}:{y}", *serve, env=_one_thread()))
        second = stack.enter_context(ServerProcess(str(folder), f"{m}:{y}", *serve, env=_one_thread()))
        first = stack.enter_context(ServerProcess(str(folder), f"{x}:{m}", "--peers", second.url, *serve,
                                                  env=_one_thread()))
        setups = {
            "one hop": [_linked(stack, whole, link)],
            "two hops, chained by the client": [_linked(stack, first, link), _linked(stack, second, link)],
            # the device reaches the first server over its link; the first reaches the second directly
            "two hops, forwarded by the servers": [_linked(stack, first, link), second.url],
        }
        clients = {}
        for setup, urls in setups.items():
            clients[setup] = SplitClient(folder, server=",".join(urls), split=(x, y),
                                         hops="forward" if "forwarded" in setup else "chain", **common)
            clients[setup].generate(PROMPT, max_new_tokens=2)  # warm-up
        return _interleaved(clients, args, "hops", f"link {args.link}")


def _verify_part(folder: Path, split: tuple[int, int], args, common: dict) -> list[Row]:
    x, y = split
    with ExitStack() as stack:
        replicas = [stack.enter_context(ServerProcess(str(folder), f"{x}:{y}", *serve_compute(args), env=_one_thread()))
                    for _ in range(3)]
        urls = [r.url for r in replicas]
        clients = {}
        for k in (1, 2, 3):
            setup = f"k = {k}" + (" (no cross-checking)" if k == 1 else "")
            clients[setup] = SplitClient(folder, server=",".join(urls), split=(x, y), verify=k, **common)
            clients[setup].generate(PROMPT, max_new_tokens=2)  # warm-up
        return _interleaved(clients, args, "verify", "3 replicas of the body on this machine")


def _interleaved(clients: dict[str, SplitClient], args, part: str, note: str) -> list[Row]:
    """Each setup `args.repeats` times, the setups taking turns (so that a slow moment of the machine hits
    them alike); per setup, the run of median tokens/s."""
    runs: dict[str, list[Row]] = {setup: [] for setup in clients}
    baseline = None
    for _ in range(args.repeats):
        for setup, client in clients.items():
            row, outs = _run([client], args.tokens, part, setup, baseline, note)
            baseline = baseline or outs
            runs[setup].append(row)
    return [_median(rows) for rows in runs.values()]


def _median(rows: list[Row]) -> Row:
    """The run of median tokens/s, marked identical only if every run was."""
    ranked = sorted(rows, key=lambda r: r.tokens_per_s)
    middle = ranked[len(ranked) // 2]
    return Row(**{**vars(middle), "identical": all(r.identical for r in rows),
                  "runs": f"{ranked[0].tokens_per_s:.1f}–{ranked[-1].tokens_per_s:.1f}"})


def _markdown(rows: list[Row]) -> str:
    lines = ["| part | setup | clients | tokens/s | runs | ms/step | device round trips/token | bytes/token | same tokens |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.setup} | {r.clients} | {r.tokens_per_s:.1f} | {r.runs} | {r.ms_per_step:.1f} | "
                     f"{r.device_round_trips_per_token:.2f} | {r.bytes_per_token:,.0f} | "
                     f"{'yes' if r.identical else 'NO'} |")
    return "\n".join(lines)


def _plot(rows: list[Row], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    labels = [f"{r.part}: {r.setup}" for r in rows]
    ax.barh(range(len(rows)), [r.tokens_per_s for r in rows], color="#4c72b0")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (all clients)")
    ax.set_title("lambdasplit bench scale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
