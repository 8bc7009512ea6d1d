"""`lambdasplit bench codecs`: what each wire codec costs in bytes and in quality, per direction.

For every codec, once on the uplink (the state entering layer X) and once on the downlink (the
state leaving layer Y - 1), with the other direction lossless (fp32):

  bytes/token    mean size of one decode-step frame in that direction (header + payload), as
                 encode_frame writes it; the fp16 row gives the yardstick
  rel. error     mean over decode steps of ||x' - x|| / ||x|| for the hidden state the codec carried
  agree (free)   greedy generation of --tokens tokens on the paper's prompt with the codec in the
                 loop (real frames, encoded and decoded in-process), position-by-position equal
                 to the fp32 wire's tokens; EOS ignored. One early divergence costs every later
                 position, so this is strict.
  agree (forced) teacher-forced: on every prompt, the fp32 continuation is fed back and the
                 codec's argmax at each of the --tokens positions is compared with it (frames are
                 cut exactly as in generation: the prompt as one frame, then one row per step)
  ppl            perplexity of the shipped held-out text (never used for fitting), the first 64
                 tokens as one frame and then one row per step, against fp32's

Everything runs in this process: the body's layers are the same ones the server runs, and the
frames are the same bytes; only the sockets are left out (they add the same few bytes of framing
to every codec). Outputs: a Markdown table, a CSV, JSON and a PNG plot of bytes against agreement.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..client.body import LocalBody
from ..client.generate import GenerationStats, Stepper
from ..data import PAPER_PROMPT
from ..models.calibrate import default_basis_path, fit_basis, shipped_text
from ..models.llm import SplitModel, load_split, resolve_split
from ..models.prompting import encode_prompt
from ..models.source import model_name
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from ..wire.codecs import Codec, CodecError, make_codec
from ..wire.frame import Frame, decode_frame, encode_frame
from ..wire.lowrank import Basis, BasisError, Projection
from ..wire.spec import parse_codec
from .harness import reference_compute

OTHER_PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works, with an example in Python.",
    "Give me three tips for a job interview, and explain why each one matters.",
)
PPL_PREFIX = 64
SEED = 20260001  # the bench's fixed rotation seed, so runs are comparable


@dataclass
class Row:
    codec: str
    direction: str  # "up" or "down"
    frame_bytes: float  # per decode step, this direction
    payload_bytes: float
    vs_fp16: float
    rel_error: float
    agree_free: float | None
    first_divergence: int | None
    agree_forced: float
    ppl: float
    ppl_fp32: float
    us_model: float | None = None  # encode + decode of one 1 x D frame, median microseconds (both: summed)
    us_4096: float | None = None  # the same for a 1 x 4096 row (a 7B model's width)
    refused: str | None = None  # why the codec refused this model's states (fp16 past its range): no figures


@dataclass
class Text:
    name: str
    ids: list[int]  # prompt (or held-out prefix)
    continuation: list[int]  # the fp32 wire's greedy tokens (or the held-out text's own)


def _roundtrip(states: torch.Tensor, codec: Codec, first: int, down: bool) -> tuple[torch.Tensor, list[int], list[int]]:
    """Send `states` (L, D) the way generation does: rows [0, first) as one frame, then one row per
    frame. Returns the decoded states and the frame and payload sizes of the one-row frames."""
    out, frames, payloads = [], [], []
    chunks = [(0, first)] + [(i, i + 1) for i in range(first, states.shape[0])]
    for step, (a, b) in enumerate(chunks):
        extra = {"cloud_us": 12345} if down else {}  # the server's replies carry their compute time
        data = encode_frame(Frame("hidden", step=step, pos=a, tensor=states[a:b], codec=codec, extra=extra))
        out.append(decode_frame(data, codec=codec).tensor)
        if step:
            frames.append(len(data))
            payloads.append(len(data) - _header_size(data))
    return torch.cat(out), frames, payloads


def _header_size(data: bytes) -> int:
    return 9 + int.from_bytes(data[5:9], "little")


class CodecBench:
    def __init__(self, model: SplitModel, basis: Basis | None, tokens: int, tokenizer=None):
        self.model, self.basis, self.tokens, self.tokenizer = model, basis, tokens, tokenizer
        self.split = model.split

    def chat(self, prompt: str) -> list[int]:
        """A prompt's ids with the chat template (if the model has one), as the device sends it."""
        return encode_prompt(self.tokenizer, prompt)

    def references(self, prompts: list[str], progress: bool = True) -> list[Text]:
        """Each prompt with the fp32 split's greedy continuation: what every codec is compared with."""
        return [Text(p, ids, self.free_run(ids, None)) for p in tqdm(prompts, desc="fp32 reference runs",
                                                                      unit="prompt", disable=not progress)
                for ids in [self.chat(p)]]

    def heldout(self, tokens: int) -> Text:
        """The shipped held-out text for perplexity: a prefix sent as one frame, the rest scored."""
        ids = self.tokenizer(shipped_text("heldout"))["input_ids"][:tokens]
        return Text("held-out", ids[:PPL_PREFIX], ids[PPL_PREFIX:])

    def codec(self, name: str, direction: str) -> Codec:
        point = self.split.x if direction == "up" else self.split.y
        return make_codec(name, seed=SEED, basis=self.basis, point=point)

    @torch.inference_mode()
    def free_run(self, ids: list[int], codecs: tuple[Codec, Codec] | None) -> list[int]:
        """Greedy tokens with the codecs in the loop (None: no frames at all)."""
        body = LocalBody(self.model.body, True, codecs)
        step = Stepper(self.model, body, True, GenerationStats())
        logits, out = step(ids), []
        for _ in range(self.tokens):
            out.append(int(logits.argmax()))
            if len(out) < self.tokens:
                logits = step([out[-1]])
        return out

    @torch.inference_mode()
    def states(self, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 states at X and at Y for a whole sequence (one parallel pass)."""
        hx = self.model.head(torch.tensor([seq]), None, 0)[0]
        return hx, self.model.body(hx[None], None, 0)[0]

    @torch.inference_mode()
    def forced(self, text: Text, states, up: Codec | None, down: Codec | None):
        """Logits over the whole sequence with codecs on one direction or both, and what they sent.
        The error is that of the state the tail receives, against the fp32 wire's."""
        hx, hy = states
        first = len(text.ids)
        frames, payloads = [0] * (hx.shape[0] - first), [0] * (hx.shape[0] - first)
        received = hy
        for codec, is_down in ((up, False), (down, True)):
            if codec is None:
                continue
            if is_down:
                received, f, p = _roundtrip(received, codec, first, down=True)
            else:
                sent, f, p = _roundtrip(hx, codec, first, down=False)
                received = self.model.body(sent[None], None, 0)[0]
            frames = [a + b for a, b in zip(frames, f)]
            payloads = [a + b for a, b in zip(payloads, p)]
        logits = self.model.tail(received[None], None, 0, last_only=False)[0]
        if up is not None and down is None:  # an uplink codec alone: the error of what it sent
            received, hy = sent, hx
        rows = slice(first, hx.shape[0])
        err = ((received[rows] - hy[rows]).norm(dim=1) / hy[rows].norm(dim=1).clamp_min(1e-12)).mean()
        return logits, float(err), frames, payloads


def codec_speed_us(name: str, dim: int, reps: int = 300) -> float:
    """Median time to encode and decode one (1, dim) frame, end to end (encode_frame + decode_frame).
    pca codecs are timed with a random orthonormal basis of the right shape."""
    spec = parse_codec(name)
    g = torch.Generator().manual_seed(0)
    projection = None
    if spec.rank:
        q, _ = torch.linalg.qr(torch.randn(dim, min(spec.rank, dim), generator=g))
        projection = Projection(torch.zeros(dim), q.contiguous())
        spec = dataclasses.replace(spec, rank=q.shape[1])
    codec = Codec(spec, seed=SEED, projection=projection)
    x = torch.randn(1, dim, generator=g)
    x[0, :4] *= 50  # a few massive channels, as in real hidden states
    times = []
    for i in range(reps + 20):
        t = time.perf_counter()
        decode_frame(encode_frame(Frame("hidden", step=1, pos=20, tensor=x, codec=codec)), codec=codec)
        if i >= 20:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def _agreement(logits: torch.Tensor, text: Text) -> float:
    first = len(text.ids)
    pred = logits[first - 1:first - 1 + len(text.continuation)].argmax(-1)
    return float((pred == torch.tensor(text.continuation)).float().mean())


def _perplexity(logits: torch.Tensor, seq: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(seq[1:]))
    return math.exp(float(nll))


def run_codec_bench(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    from transformers import AutoTokenizer

    folder, config, split = resolve_split(args.model, args.split)
    names = [parse_codec(n).name for n in args.codecs.split(",") if n.strip()]
    pairs = []
    for pair in filter(None, (p.strip() for p in (args.pairs or "").split(";"))):
        parts = pair.split(",")
        if len(parts) != 2:
            raise ValueError(f"--pairs takes UP,DOWN pairs separated by ';', got {pair!r}")
        pairs.append(tuple(parse_codec(n).name for n in parts))
    started = time.time()
    print(f"bench codecs: {model_name(folder)}, split {split} (uplink = state entering layer {split.x}, downlink = "
          f"state leaving layer {split.y - 1}), {len(names)} codecs x 2 directions, {args.tokens} tokens; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}", flush=True)
    compute = reference_compute(args, "codecs", "every codec is scored against the fp32 wire of the same fp32 split")

    basis = None
    if any(parse_codec(n).rank for n in [*names, *(n for p in pairs for n in p)]):
        path = Path(args.basis) if args.basis else default_basis_path(folder, [split.x, split.y], config.hidden_size)
        basis = _load_or_fit(path, folder, [split.x, split.y], config.hidden_size, refit=not args.basis)

    model = load_split(folder, split.x, split.y, parts=("head", "body", "tail"), **compute)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bench = CodecBench(model, basis, args.tokens, tokenizer)
    texts = bench.references([PAPER_PROMPT, *OTHER_PROMPTS][:max(1, args.prompts)])
    heldout = bench.heldout(args.ppl_tokens)
    all_states = {t.name: bench.states(t.ids + t.continuation) for t in [*texts, heldout]}
    lossless = make_codec("fp32")
    base_logits, *_ = bench.forced(heldout, all_states[heldout.name], lossless, None)
    ppl_fp32 = _perplexity(base_logits, heldout.ids + heldout.continuation)
    paper = texts[0]

    rows: list[Row] = []
    jobs = [(n, d) for n in names for d in ("up", "down")] + [(f"{u},{d}", "both") for u, d in pairs]
    for name, direction in tqdm(jobs, desc="codecs", unit="run"):
        try:
            rows.append(_measure(bench, name, direction, texts, heldout, all_states, not args.no_free_run, ppl_fp32))
        except CodecError as exc:  # the model's states are outside what this codec carries: a row that says so
            rows.append(Row(name, direction, *([math.nan] * 4), None, None, math.nan, math.nan, ppl_fp32,
                            refused=str(exc)))
    speeds = {n: (codec_speed_us(n, config.hidden_size), codec_speed_us(n, 4096)) for n in names}
    for r in rows:
        r.us_model, r.us_4096 = (speeds[r.codec] if r.direction != "both" else
                                 [sum(v) for v in zip(*(speeds.get(n) or (codec_speed_us(n, config.hidden_size),
                                                                        codec_speed_us(n, 4096))
                                                        for n in r.codec.split(",")))])
    _relative_to_fp16(rows, config.hidden_size)

    meta = {"model": model_name(folder), "split": str(split), "hidden_size": config.hidden_size, "tokens": args.tokens,
            "prompts": [t.name for t in texts], "paper_prompt_tokens": len(paper.ids),
            "heldout_tokens": len(heldout.ids) + len(heldout.continuation), "ppl_fp32": ppl_fp32, "basis": basis.path.name if basis else None,
            **machine_meta(), **compute, "seconds": round(time.time() - started)}
    _write(rows, meta, Path(args.out))
    return rows


def _measure(bench: CodecBench, name: str, direction: str, texts: list[Text], heldout: Text, all_states: dict,
             free_run: bool, ppl_fp32: float) -> Row:
    """One row: the codec (or pair) on one direction (or both), teacher-forced, perplexity and free run."""
    if direction == "both":
        up, down = (bench.codec(n, d) for n, d in zip(name.split(","), ("up", "down")))
    else:
        codec = bench.codec(name, direction)
        up, down = (codec, None) if direction == "up" else (None, codec)
    agree, errs, frames, payloads = [], [], [], []
    for text in texts:
        logits, err, f, p = bench.forced(text, all_states[text.name], up, down)
        agree.append(_agreement(logits, text))
        errs.append(err)
        frames += f
        payloads += p
    logits, *_ = bench.forced(heldout, all_states[heldout.name], up, down)
    ppl = _perplexity(logits, heldout.ids + heldout.continuation)
    free = first_div = None
    if free_run:
        lossless, paper = make_codec("fp32"), texts[0]
        got = bench.free_run(paper.ids, (up or lossless, down or lossless))
        same = [a == b for a, b in zip(got, paper.continuation)]
        free = sum(same) / len(same)
        first_div = same.index(False) if False in same else None
    return Row(name, direction, sum(frames) / len(frames), sum(payloads) / len(payloads), 0.0,
               sum(errs) / len(errs), free, first_div, sum(agree) / len(agree), ppl, ppl_fp32)


def _load_or_fit(path: Path, folder: Path, points: list[int], rank: int, refit: bool) -> Basis:
    """The given basis, or the cached default one, fitted now if it is missing or unreadable."""
    if refit:
        try:
            return Basis.load(path)
        except BasisError:
            print(f"fitting a PCA basis at points {points} on the shipped calibration text -> {path}", flush=True)
            fit_basis(folder, points, rank, path)
    return Basis.load(path)


def _relative_to_fp16(rows: list[Row], dim: int) -> None:
    """Fill vs_fp16: against the measured fp16 rows when the run has them, else an fp16 frame built here."""
    fp16 = {r.direction: r.frame_bytes for r in rows if r.codec == "fp16" and not r.refused}
    for d in ("up", "down"):
        fp16.setdefault(d, _fp16_frame_bytes(dim, d == "down"))
    fp16["both"] = fp16["up"] + fp16["down"]
    for r in rows:
        r.vs_fp16 = r.frame_bytes / fp16[r.direction]


def _fp16_frame_bytes(dim: int, down: bool) -> float:
    extra = {"cloud_us": 12345} if down else {}
    return len(encode_frame(Frame("hidden", step=1, pos=20, tensor=torch.zeros(1, dim), codec="fp16", extra=extra)))


def markdown(rows: list[Row], meta: dict) -> str:
    free = any(r.agree_free is not None for r in rows)
    head = ["codec", "dir", "bytes/token", "vs fp16", "rel. error",
            *(["agree, free run (paper prompt)"] if free else []),
            f"agree, teacher-forced ({len(meta['prompts'])} prompts)", f"ppl (fp32 {meta['ppl_fp32']:.2f})",
            f"enc+dec µs, 1×{meta['hidden_size']} / 1×4096"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.refused:
            lines.append("| " + " | ".join([f"`{r.codec}`", r.direction, f"refused: {r.refused}",
                                            *[""] * (len(head) - 3)]) + " |")
            continue
        cells = [f"`{r.codec}`", r.direction, f"{r.frame_bytes:.0f}", f"{r.vs_fp16:.2f}", f"{r.rel_error:.4f}"]
        if free:
            div = "" if r.first_divergence is None else f" (first miss at {r.first_divergence})"
            cells.append(f"{r.agree_free:.1%}{div}")
        cells += [f"{r.agree_forced:.1%}", f"{r.ppl:.2f}", f"{r.us_model:.0f} / {r.us_4096:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(rows: list[Row], meta: dict, out: Path) -> None:
    caption = (f"{meta['model']}, split {meta['split']}, {meta['tokens']} tokens, paper prompt = "
               f"{meta['paper_prompt_tokens']} tokens, held-out text = {meta['heldout_tokens']} tokens; "
               f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['seconds']} s")
    write_report(out, "codecs", rows, markdown(rows, meta), caption, meta, plot=lambda path: _plot(rows, meta, path))


def _plot(rows: list[Row], meta: dict, path: Path) -> None:
    """Bytes per token against agreement: free run (left, if measured) and teacher-forced (right)."""
    plt = pyplot()
    measured = [r for r in rows if not r.refused]
    panels = [("agree_free", "free run, paper prompt")] if measured and measured[0].agree_free is not None else []
    panels.append(("agree_forced", f"teacher-forced, {len(meta['prompts'])} prompts"))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 7), dpi=110, squeeze=False)
    styles = (("up", "o", "tab:blue", "uplink only"), ("down", "s", "tab:orange", "downlink only"),
              ("both", "D", "tab:green", "both directions (bytes of both)"))
    for ax, (field, label) in zip(axes[0], panels):
        for direction, marker, color, legend in styles:
            sel = [r for r in rows if r.direction == direction and not r.refused]
            if not sel:
                continue
            ys = [100 * getattr(r, field) for r in sel]
            ax.scatter([r.frame_bytes for r in sel], ys, marker=marker, color=color, label=legend, alpha=0.8)
            for r, y in zip(sel, ys):
                ax.annotate(r.codec, (r.frame_bytes, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per generated token (frame header + payload)")
        ax.set_ylabel(f"greedy agreement with the fp32 wire, {label} (%)")
        ax.axhline(99, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right")
    fig.suptitle(f"Wire codecs: {meta['model']}, split {meta['split']}, {meta['tokens']} tokens ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
