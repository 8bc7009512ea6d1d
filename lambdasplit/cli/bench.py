"""`lambdasplit bench …`: the benchmarks behind the figures in the docs, one parser each."""

from __future__ import annotations

import importlib

from ..bench.codecs_args import DEFAULT_CODECS, DEFAULT_PAIRS
from ..data import PAPER_PROMPT
from ..wire.spec import DEFAULT_WIRE
from .options import add_compute, add_json, add_model, add_output, add_split, add_wire_codec, wire_arg

# bench name -> (module, function): each takes the parsed arguments and writes its report
RUNNERS = {
    "decode": ("lambdasplit.bench.decode", "run_decode_bench"),
    "fig5": ("lambdasplit.bench.fig5", "run_fig5"),
    "web": ("lambdasplit.bench.web", "run_web_bench"),
    "adapters": ("lambdasplit.bench.adapters", "run_adapters_bench"),
    "codecs": ("lambdasplit.bench.codecs", "run_codec_bench"),
    "table1": ("lambdasplit.bench.table1", "run_table1"),
    "concurrency": ("lambdasplit.bench.concurrency", "run_concurrency_bench"),
    "noise": ("lambdasplit.bench.noise", "run_noise_bench"),
    "plan": ("lambdasplit.bench.plancheck", "run_plan_check"),
    "speculative": ("lambdasplit.bench.speculative", "run_speculative_bench"),
    "scale": ("lambdasplit.bench.scale", "run_scale_bench"),
    "paper-scale": ("lambdasplit.bench.paper_scale", "run_paper_scale"),
    "gpu": ("lambdasplit.bench.gpu", "run_gpu_check"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks that back the figures in the docs.")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for add in (_decode, _fig5, _web, _adapters, _codecs, _table1, _concurrency, _noise, _plan, _speculative, _scale,
                _gpu):
        add(bench)
    _paper_scale(bench)
    p.set_defaults(run=run)


def run(args) -> None:
    module, function = RUNNERS[args.bench]
    getattr(importlib.import_module(module), function)(args)


def _decode(sub) -> None:
    b = sub.add_parser("decode", help="tokens/s and agreement with fp32 of each weight format, unsplit and split",
                       description="Decode speed of each weight format (fp32, bf16, fp16, int8, int4), unsplit in this "
                                   "process and split over a loopback body server, taking turns in one run; with "
                                   "each format's teacher-forced greedy agreement with fp32, the weight bytes a token "
                                   "reads and their share of the measured streaming bandwidth, and reference rows: "
                                   "transformers' generate and, when llama-cpp-python is installed, llama.cpp on the "
                                   "same GGUF file with the same threads.")
    add_model(b)
    add_split(b, "1:-1")
    add_compute(b, "head, tail and body", weights=False)
    b.add_argument("--formats", default="fp32,bf16,fp16,int8,int4", metavar="F[,F...]",
                   help="weight formats to measure (default fp32,bf16,fp16,int8,int4; fp32 is always included)")
    b.add_argument("--compiled", default="int4", metavar="F[,F...]",
                   help="formats also measured with --compile on both sides (rows 'local F compiled' and 'split F "
                        "compiled'; default int4; 'none' for none). Compiling takes up to a minute per part")
    add_wire_codec(b, "fp32", help="the wire codec of the split rows (default fp32: exact, so a split row must "
                                   "give its local row's tokens)")
    b.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    b.add_argument("--agree-tokens", type=int, default=64,
                   help="greedy tokens per prompt for the agreement measure (default 64)")
    b.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported (default 3)")
    b.add_argument("--prompt", default=PAPER_PROMPT)
    b.add_argument("--no-reference", action="store_true", help="skip the transformers and llama.cpp rows")
    add_json(b)



def _fig5(sub) -> None:
    b = sub.add_parser("fig5", help="the paper's Fig. 5: image quality and noise traffic per codec (text-to-image)",
                         description="Make the same images over the real body server with the noise coming down in "
                                     "each codec, and report bytes per step and per image and PSNR/SSIM against the "
                                     "fp32 image (mean and spread over prompts and seeds); for the digits model, how "
                                     "often an independent classifier still reads the prompted digit. Writes "
                                     "fig5.md/.csv/.json, fig5-grid.png (images per codec) and fig5-noise.png (the "
                                     "noise the network carries at one step, RGBA).")
    add_compute(b, "text encoders, VAE and U-Net")
    b.add_argument("--model", default=None, metavar="M", help="a diffusers pipeline folder, or 'digits' (default)")
    b.add_argument("--server", default=None, metavar="URL", help="use this image body server instead of starting one")
    b.add_argument("--codecs", default=None, metavar="LIST",
                   help="comma-separated noise codecs (fp32 is always added as the reference; default: fp32, fp16, "
                        "int8, int6, int4, int2, their 'had' rotations, out:4 outliers and int8+zstd)")
    b.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt (repeatable; default: 'a handwritten digit 0' .. '9')")
    b.add_argument("--seeds", type=int, default=5, help="seeds per prompt (default 5)")
    b.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    b.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    b.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default 5)")
    b.add_argument("--up", default="fp32", metavar="CODEC", help="codec of the embeddings and latent (default fp32)")
    b.add_argument("--noise-step", type=int, default=12, metavar="N",
                   help="the step whose noise is pictured (default 12; -1: the last)")
    add_output(b)



def _web(sub) -> None:
    b = sub.add_parser("web", help="what the web app and its OpenAI-compatible API cost over the split client",
                         description="Decode speed and time to first token of the same greedy generation four ways: "
                                     "the split client in this process (as generate), the web page's event stream, "
                                     "the OpenAI-compatible API streamed, and whole; runs interleaved, medians "
                                     "reported. Starts a body server (or uses --server) and `lambdasplit web`.")
    add_model(b)
    add_split(b, "1:-1")
    b.add_argument("--server", default=None, metavar="URL", help="use this body server (it must serve the split) "
                   "instead of starting one")
    add_compute(b, "head, tail and body")
    b.add_argument("--wire", type=wire_arg, default=DEFAULT_WIRE, metavar="CODEC[,CODEC]",
                   help=f"wire codecs (default {DEFAULT_WIRE})")
    b.add_argument("--speculate", choices=("auto", "off"), default="off",
                   help="speculative decoding on every path (default off: one token per round trip)")
    b.add_argument("--tokens", type=int, default=128, help="tokens per generation (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="runs per path; the median is reported (default 3)")
    b.add_argument("--prompt", default=PAPER_PROMPT)
    add_output(b, "folder for web.md/.csv/.json")



def _adapters(sub) -> None:
    b = sub.add_parser("adapters", help="split LoRA against PrivateLoRA: tuning quality, speed and traffic",
                         description="Tune a LoRA adapter on the device's head and tail (split learning) and a "
                                     "PrivateLoRA adapter on the body (M on the device) on the same private text, "
                                     "through a body server behind the emulated link; then decode greedily four "
                                     "ways (local-only, plain Λ-Split, with each adapter) and report tokens/s, "
                                     "bytes and round trips per token, and held-out perplexity.")
    add_model(b)
    add_split(b, "1:-1")
    add_compute(b, "head, tail and body")
    b.add_argument("--link", default="100mbit,5ms", metavar="RATE,DELAY", help="the emulated link (default "
                   "100mbit,5ms)")
    b.add_argument("--data", default=None, metavar="FILE", help="the private text (default: the shipped "
                   "lambdasplit/data/private_notes.txt)")
    b.add_argument("--epochs", type=int, default=2, help="tuning epochs for both adapters (default 2)")
    b.add_argument("--rank", type=int, default=8, help="rank of both adapters (default 8)")
    b.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (default 3e-3)")
    b.add_argument("--private-lr", type=float, default=1e-2, help="PrivateLoRA learning rate (default 1e-2)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tokens", type=int, default=48, help="tokens per decoding row (default 48)")
    add_output(b, "folder for adapters.md/.csv/.json/.png and the adapters")



def _codecs(sub) -> None:
    b = sub.add_parser("codecs", help="bytes per token vs quality for every wire codec, up and down",
                         description="For each codec on the uplink and on the downlink: bytes per generated token, "
                                     "relative error of the hidden state, greedy-token agreement with the fp32 wire "
                                     "(free run on the paper's prompt, teacher-forced on several prompts) and "
                                     "perplexity on a held-out text. Writes codecs.md, .csv, .json and .png.")
    add_model(b)
    add_split(b, "1:-1")
    add_compute(b, "head, tail and body")
    b.add_argument("--codecs", default=DEFAULT_CODECS, metavar="LIST",
                   help="comma-separated codec names (default: %(default)s)")
    b.add_argument("--pairs", default=DEFAULT_PAIRS, metavar="UP,DOWN;...",
                   help="codec pairs run on both directions at once, rows marked 'both' (default: %(default)s; "
                        "'' for none)")
    b.add_argument("--tokens", type=int, default=300, help="generated tokens compared per prompt (default 300)")
    b.add_argument("--prompts", type=int, default=4, help="how many of the built-in prompts, the paper's first "
                   "(default 4)")
    b.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens for perplexity (default 1024)")
    b.add_argument("--no-free-run", action="store_true",
                   help="skip the free-running generation per codec (the slow part); teacher-forced only")
    b.add_argument("--basis", default=None, metavar="FILE",
                   help="PCA basis for pca:R codecs (default: fit one on the shipped calibration text, cached)")
    add_output(b)



def _table1(sub) -> None:
    b = sub.add_parser("table1", help="the paper's Table I: cloud-only, Λ-Split w/o and w/ caching, local-only",
                         description="Reproduce the paper's Table I on this machine: cloud-only, Λ-Split without and "
                                     "with caching at the paper's three local:cloud ratios (scaled to the model's "
                                     "layers), and local-only; each row generates --tokens tokens greedily from "
                                     "the paper's prompt (EOS ignored) through real server processes behind an "
                                     "emulated link. Reports traffic at the sockets, latency split into "
                                     "communication, local and cloud, and tokens/s. Writes table1.md, .csv, .json "
                                     "and .png.")
    add_model(b)
    add_compute(b, "head, tail and body")
    b.add_argument("--tokens", type=int, default=300, help="L_out, tokens generated per row (default 300, as the "
                   "paper)")
    b.add_argument("--prompt", default=PAPER_PROMPT, help="default: the paper's prompt")
    b.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (default: "
                   "the raw prompt, as the paper's L_in = 14 suggests)")
    b.add_argument("--link", default="1000mbit", metavar="RATE[,DELAY]",
                   help="the emulated link between device and cloud (default 1000mbit, the paper's; e.g. 100mbit,10ms)")
    b.add_argument("--device-slowdown", type=float, default=1.0, metavar="K",
                   help="EMULATE a device K times slower than this machine (the paper's Jetson was about 15x slower "
                        "than its cloud GPU on the whole model); labelled in every output (default 1: none)")
    b.add_argument("--wire", type=wire_arg, default="fp16", metavar="CODEC[,CODEC]",
                   help="wire codec of the Λ-Split rows (default fp16, as the paper)")
    b.add_argument("--transport", choices=("ws", "http"), default="ws",
                   help="steps over one WebSocket (default) or one HTTP POST each (as the paper's FastAPI client)")
    b.add_argument("--rows", default="cloud-only,no-cache,cache,local-only", metavar="KINDS",
                   help="which rows to run (default: all of %(default)s)")
    b.add_argument("--ratios", default="2:30,8:24,16:16", metavar="R[,R...]",
                   help="which of the paper's local:cloud ratios to run (default: all three, %(default)s)")
    b.add_argument("--capture", action="store_true",
                   help="also count every row's traffic with a packet capture (tcpdump on the loopback port), "
                        "and report how far it is from the socket counts")
    add_output(b)



def _concurrency(sub) -> None:
    b = sub.add_parser("concurrency", help="aggregate and per-session tokens/s with many clients, batched or not",
                         description="Start a body server (batched, then unbatched) and decode with 1, 4, 8 and 16 "
                                     "concurrent clients at once. The devices are emulated: they replay head states "
                                     "recorded from real generations and check every reply against the recording. "
                                     "Writes concurrency.md, .csv, .json and .png.")
    add_model(b)
    add_split(b, "1:-1")
    add_compute(b, "body server")
    b.add_argument("--clients", default="1,4,8,16", metavar="N[,N...]", help="client counts (default 1,4,8,16)")
    b.add_argument("--modes", default="batched,unbatched", metavar="MODES", help="batched and/or unbatched")
    b.add_argument("--tokens", type=int, default=64, help="decode steps per client (default 64)")
    add_output(b)



def _noise(sub) -> None:
    b = sub.add_parser("noise", help="the noise defence: token recovery vs greedy agreement and perplexity",
                         description="For each noise scale S (Gaussian noise of S x each hidden state's RMS, the "
                                     "noise:S wire codec part), on the uplink only and on both directions of one "
                                     "split: the best attack's token recovery on noisy states (probes retrained on "
                                     "noisy states), greedy-token agreement with the noiseless split (teacher-forced "
                                     "and free-running) and held-out perplexity. Writes noise.md, .csv, .json and "
                                     ".png.")
    add_model(b)
    add_split(b, "1:-1")
    add_compute(b, "head, tail and body")
    b.add_argument("--scales", default="0,0.05,0.1,0.2,0.5,1", metavar="S[,S...]",
                   help="noise scales, relative to each state's RMS (default %(default)s)")
    b.add_argument("--tokens", type=int, default=100, help="free-run and teacher-forced tokens per prompt "
                   "(default 100)")
    b.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens for perplexity (default 1024)")
    b.add_argument("--mlp-hidden", type=int, default=512, help="width of the MLP probe (default 512)")
    b.add_argument("--mlp-epochs", type=int, default=6, help="epochs of MLP probe training (default 6)")
    b.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="attack text: only the first N probe prompts (default all; see lambdasplit assess)")
    b.add_argument("--answer-tokens", type=int, default=80, metavar="N",
                   help="tokens of the model's answer per probe prompt (default 80)")
    add_output(b)



def _plan(sub) -> None:
    b = sub.add_parser("plan", help="the planner's predicted tokens/s against measurements",
                         description="Make a plan (as `lambdasplit plan`), then measure the recommended split and "
                                     "the --splits through a real server behind the emulated link, with the device "
                                     "emulated K times slower; report predicted and measured tokens/s and whether "
                                     "they agree within 25%. Writes plan-check.md, .csv, .json and .png.")
    add_model(b)
    add_compute(b, "head, tail and body")
    b.add_argument("--device-slowdown", type=float, default=15.0, metavar="K",
                   help="EMULATE a device K times slower than this machine (default 15, the paper's Jetson)")
    b.add_argument("--link", default="100mbit,20ms", metavar="RATE,DELAY",
                   help="the emulated link, rate and one-way delay (default %(default)s)")
    b.add_argument("--wire", type=wire_arg, default=DEFAULT_WIRE, metavar="CODEC[,CODEC]",
                   help="wire codecs (default %(default)s)")
    b.add_argument("--max-recovery", type=float, default=0.6, metavar="R",
                   help="the privacy target that picks the recommended split (default 0.6)")
    b.add_argument("--splits", default="1:29,8:23", metavar="X:Y[,X:Y]",
                   help="other splits to measure beside the recommended one (default %(default)s)")
    b.add_argument("--tokens", type=int, default=32, help="tokens per run (default 32)")
    b.add_argument("--repeats", type=int, default=2, help="runs per split; the best is kept (default 2)")
    b.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch threads of the device and of the server each (default 1: they share this machine's "
                        "cores, and their thread pools would fight; 0 keeps torch's default); the profile is "
                        "measured with the same count")
    add_output(b)



def _speculative(sub) -> None:
    b = sub.add_parser("speculative", help="tokens/s with and without speculative decoding, at several RTTs",
                         description="Generate the same prompts greedily through a real server behind an emulated "
                                     "link, plainly and with each draft source, at each round-trip time; report "
                                     "tokens/s, the speed-up, the acceptance rate, tokens per round trip, the bytes "
                                     "per token, and whether the tokens match plain decoding.")
    add_model(b)
    b.add_argument("--split", default="1:29", metavar="X:Y", help="the split served (default 1:29, the paper's)")
    add_compute(b, "head, tail and body")
    b.add_argument("--rtts", default="1,10,50,100", metavar="MS[,MS...]", help="round-trip times in ms "
                   "(default 1,10,50,100)")
    b.add_argument("--rate", default="1gbit", help="link rate each way (default 1gbit)")
    b.add_argument("--prompts", default="paper,code,list,story", metavar="NAMES",
                   help="built-in prompts: paper (the paper's), code, list, story (default all four)")
    b.add_argument("--modes", default="off,ngram,self,bridge", metavar="MODES",
                   help="off (plain), ngram (prompt lookup, the default auto), self (early exit), bridge (early "
                        "exit with a fitted bridge over the body); default all")
    b.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    b.add_argument("--max-draft", type=int, default=8, metavar="K", help="longest draft (default 8)")
    b.add_argument("--wire", type=wire_arg, default="fp32", metavar="CODEC[,CODEC]",
                   help="wire codecs (default fp32: lossless, so the tokens can be compared exactly)")
    b.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch threads for the device side and for the server process each (default 1: the two "
                        "share this machine as two machines would not; 0 leaves torch's default)")
    add_output(b)



def _scale(sub) -> None:
    b = sub.add_parser("scale", help="Ray Serve replicas, a sharded body (chained vs forwarded) and the cost of "
                                       "cross-checking, in one run",
                         description="Measure, over real servers on loopback: tokens/s for 1 and 2 Ray Serve "
                                     "replicas under concurrent clients; a standalone server's step against Ray "
                                     "Serve's; one hop against two (chained by the client, forwarded by the "
                                     "servers) over an emulated link; and cross-checking on k = 1, 2, 3 replicas. "
                                     "Writes scale.md/.csv/.json/.png.")
    add_model(b)
    b.add_argument("--split", default="1:15:29", metavar="X:M:Y",
                   help="the body [X, Y), cut at M for the two-hop runs (default 1:15:29)")
    add_compute(b, "head, tail and body")
    b.add_argument("--parts", default="ray,overhead,hops,verify", metavar="PARTS",
                   help="which parts to run: ray, overhead, hops, verify (default all; ray and overhead need "
                        "'pip install lambdasplit[ray]')")
    b.add_argument("--clients", type=int, default=4, help="concurrent clients in the Ray part (default 4)")
    b.add_argument("--tokens", type=int, default=32, help="tokens each client generates (default 32)")
    b.add_argument("--repeats", type=int, default=3, help="runs per setup; the median is kept (default 3)")
    b.add_argument("--link", default="1gbit,10ms", metavar="RATE,DELAY",
                   help="the device's emulated link to each server in the hops part (default 1gbit,10ms: 20 ms RTT)")
    b.add_argument("--wire", type=wire_arg, default="fp32", metavar="CODEC[,CODEC]",
                   help="wire codecs (default fp32: lossless, so every setup's tokens can be compared exactly)")
    add_output(b)



def _gpu(sub) -> None:
    b = sub.add_parser("gpu", help="a prepared GPU check: the body on CUDA in bf16 and fp32, driven from the CPU",
                         description="Serve the body on the GPU in each --formats in turn, drive it from a CPU device "
                                     "(head and tail in fp32) and report: greedy agreement with a CPU fp32 body, "
                                     "decode tokens/s with --sessions concurrent sessions, memory per session, and "
                                     "the speed-up of speculative decoding at --rtt. --device cpu runs the same "
                                     "check on the CPU.")
    add_model(b)
    add_split(b, "1:-1")
    g = b.add_argument_group("compute")
    g.add_argument("--device", default="cuda", metavar="DEV",
                   help="where the body server computes: cuda (default), cuda:N, or cpu (the same check on the "
                        "CPU); the device side is always the CPU in fp32")
    g.add_argument("--formats", default="bf16,fp32", metavar="FMT[,FMT]",
                   help="the body's weight formats, served in turn (default bf16,fp32)")
    b.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt and session (default 64)")
    b.add_argument("--prompts", type=int, default=4, help="how many of the 4 built-in prompts (default 4)")
    b.add_argument("--sessions", default="1,8,32", metavar="N[,N...]",
                   help="concurrent sessions for the tokens/s figure (default 1,8,32)")
    b.add_argument("--rtt", type=float, default=50.0, metavar="MS",
                   help="round trip of the emulated 1 Gbit/s link for the speculation figure (default 50 ms)")
    add_json(b, "also write the report as JSON")



def _paper_scale(sub) -> None:
    b = sub.add_parser("paper-scale", help="the paper's 7B split on this machine: Llama-2-7B's shape, random weights",
                       description="Write a checkpoint of Llama-2-7B's exact shape with seeded random weights once "
                                   "(bf16, about 13.5 GB, in the cache folder), then run the paper's split 2:30 "
                                   "through a real body server (body bf16 or int8, head and tail int8, int4 or bf16, "
                                   "fp32 wire), then local-only in one process, one after the other. Reports each "
                                   "process's resident memory, the device's share of the model's bytes, tokens/s, "
                                   "traffic per token, and whether the split gives local-only's greedy ids. Says what "
                                   "memory and disk it needs before it starts, and refuses when they are not free.")
    b.add_argument("--config", choices=("llama2-7b", "tiny"), default="llama2-7b",
                   help="the shape: llama2-7b (default) or tiny (a few MB, the same code path); the options below "
                        "override its fields")
    for flag, what in (("--layers", "decoder layers (7B: 32)"), ("--hidden", "hidden size D (7B: 4096)"),
                       ("--heads", "attention heads (7B: 32)"), ("--ffn", "MLP width (7B: 11008)"),
                       ("--vocab", "vocabulary size, at least 259 (7B: 32000)")):
        b.add_argument(flag, type=int, default=None, metavar="N", help=what)
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    b.add_argument("--split", default=None, metavar="X:Y",
                   help="default 2:30, the paper's (for another depth, the same proportion)")
    add_compute(b, "head, tail and body", weights=False)
    b.add_argument("--body-weights", choices=("bf16", "int8"), default="bf16",
                   help="format of the body on the server (default bf16)")
    b.add_argument("--device-weights", choices=("int8", "int4", "bf16"), default="int8",
                   help="format of the head and tail on the device (default int8)")
    b.add_argument("--tokens", type=int, default=8, help="greedy tokens generated per run (default 8)")
    b.add_argument("--prompt", default=PAPER_PROMPT, help="default: the paper's prompt")
    b.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch threads of this process and of the body server each (default 1: the same kernels "
                        "everywhere, and device and server share this machine's cores; 0 keeps torch's default)")
    b.add_argument("--dry-run", action="store_true", help="print what it needs and exit")
    add_json(b, "also write the report as JSON")
