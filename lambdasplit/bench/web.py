"""`lambdasplit bench web`: what the local web app costs on top of the split client.

Rows, in one run, runs interleaved, each the median of `--repeats`:
  direct         SplitClient in this process against the body server (what `generate` does)
  page events    POST /api/chat on `lambdasplit web`: the page's server-sent events
  openai stream  POST /v1/chat/completions with stream: true, as the `openai` client sends it
  openai whole   the same without streaming (one JSON answer at the end)

All decode greedily, the same prompt and split and codecs, through the same body server. Decode
speed counts the tokens after the first over the time between the first and the last token's
arrival at the caller (for the whole answer: the first token is not seen, so the row gives the
total time per token instead, prefill included).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..client.generate import SplitClient
from ..models.llm import resolve_split
from ..models.source import model_name
from ..server.process import ServerProcess
from ..util.report import machine_meta, write_report
from ..web.process import WebProcess
from .harness import client_compute, compute_meta, serve_compute


@dataclass
class Row:
    path: str
    tokens: int
    tokens_per_s: float  # median over the repeats
    runs: str  # every run's figure
    first_token_ms: float | None  # median time to the first token (None: not visible on this path)
    ratio: float = 1.0  # tokens/s against direct


@dataclass
class Run:
    tokens: int
    first_s: float | None  # since the request
    decode_s: float  # first to last token (or, without a first, the whole request)
    whole: bool = False

    @property
    def tokens_per_s(self) -> float:
        n = self.tokens if self.whole else self.tokens - 1
        return n / self.decode_s if self.decode_s > 0 else 0.0


def _post_events(url: str, path: str, payload: dict) -> list[tuple[float, dict]]:
    """POST a JSON body, read server-sent events; (arrival time, event) each; raise on an error answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{path} answered {resp.status}: {resp.read()[:300]!r}")
        if not payload.get("stream", True):
            return [(time.perf_counter(), json.loads(resp.read()))]
        events = []
        for line in resp:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append((time.perf_counter(), json.loads(line[6:])))
        return events
    finally:
        conn.close()


def _direct(client: SplitClient, ids: list[int], tokens: int) -> Run:
    start = time.perf_counter()
    times = [time.perf_counter() for _ in client.generate_ids(ids, max_new_tokens=tokens, stop_at_eos=False)]
    return Run(len(times), times[0] - start, times[-1] - times[0])


def _page(url: str, prompt: str, tokens: int) -> Run:
    start = time.perf_counter()
    events = _post_events(url, "/api/chat", {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens})
    wire = [(t, e["tokens"]) for t, e in events if e["type"] == "wire"]
    first = next(t for t, n in wire if n >= 1)
    last_t, last_n = wire[-1]
    return Run(last_n, first - start, last_t - first)


def _openai(url: str, model: str, prompt: str, tokens: int, stream: bool) -> Run:
    start = time.perf_counter()
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
               "temperature": 0, "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    events = _post_events(url, "/v1/chat/completions", payload)
    usage = next(e["usage"] for _, e in reversed(events) if e.get("usage"))
    if not stream:
        return Run(usage["completion_tokens"], None, events[-1][0] - start, whole=True)
    content = [t for t, e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
    return Run(usage["completion_tokens"], content[0] - start, content[-1] - content[0])


def run_web_bench(args) -> list[Row]:
    folder, _, split = resolve_split(args.model, args.split)
    name = model_name(folder)
    compute = compute_meta(args)
    print(f"bench web: {name}, split {split}, wire {args.wire}, speculation {args.speculate}, {args.tokens} tokens "
          f"of greedy decoding, {args.repeats} interleaved runs per path, {compute['weights']} on "
          f"{compute['device']}", flush=True)
    with contextlib.ExitStack() as stack:
        server = args.server or stack.enter_context(ServerProcess(str(folder), f"{split.x}:{split.y}",
                                                                  *serve_compute(args))).url
        web = stack.enter_context(WebProcess(server, "--model", str(folder), "--split", f"{split.x}:{split.y}",
                                             "--wire", args.wire, "--speculate", args.speculate, *serve_compute(args)))
        client = SplitClient(folder, server=server, split=(split.x, split.y), wire=args.wire,
                             speculate=args.speculate, **client_compute(args))
        ids = client.encode_prompt(args.prompt)
        paths = {"direct (SplitClient, as generate)": lambda: _direct(client, ids, args.tokens),
                 "web page events (/api/chat)": lambda: _page(web.url, args.prompt, args.tokens),
                 "OpenAI API, streamed": lambda: _openai(web.url, name, args.prompt, args.tokens, True),
                 "OpenAI API, whole answer": lambda: _openai(web.url, name, args.prompt, args.tokens, False)}
        runs: dict[str, list[Run]] = {p: [] for p in paths}
        for _ in range(args.repeats):  # paths take turns, so drift in the machine's load touches all alike
            for path, run in paths.items():
                runs[path].append(run())
    rows = []
    for path, done in runs.items():
        firsts = [r.first_s for r in done if r.first_s is not None]
        rows.append(Row(path, done[0].tokens, statistics.median(r.tokens_per_s for r in done),
                        ", ".join(f"{r.tokens_per_s:.1f}" for r in done),
                        statistics.median(firsts) * 1000 if firsts else None))
    for row in rows:
        row.ratio = row.tokens_per_s / rows[0].tokens_per_s
    lines = ["| path | tokens | tokens/s (median) | runs | first token ms | vs direct |", "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        first = f"{r.first_token_ms:.0f}" if r.first_token_ms is not None else "–"
        lines.append(f"| {r.path} | {r.tokens} | {r.tokens_per_s:.1f} | {r.runs} | {first} | {r.ratio:.2f}× |")
    meta = {**machine_meta(), **compute, "model": name, "split": str(split), "wire": args.wire,
            "speculate": args.speculate, "tokens": args.tokens, "repeats": args.repeats, "prompt": args.prompt}
    caption = (f"{name}, split {split.x}:{split.y}, wire {args.wire}, speculation {args.speculate}; body server, web "
               f"app and this process on one machine ({meta['date']}, {meta['machine']}, torch {meta['torch']}). "
               "Decode tokens/s from the first to the last token's arrival; the whole answer's row is total time "
               "per token, prefill included.")
    write_report(Path(args.out), "web", rows, "\n".join(lines), caption, meta)
    return rows
