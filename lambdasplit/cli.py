"""One entry point: lambdasplit serve | generate | demo | web | bench | ….

Each command is a thin layer over the library API (lambdasplit.server, lambdasplit.client,
lambdasplit.bench), so everything the CLI does, a test or a program can do too.
"""

from __future__ import annotations

import argparse
import os
import sys

from .imagine import DEMO_PROMPT, add_image_args, add_imagine_parser
from .models.source import DEFAULT_MODEL
from .wire.spec import DEFAULT_WIRE

PAPER_PROMPT = "What is the difference between AI, ML and DL?"


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="M",
                   help=f"a local Hugging Face folder, a .gguf file, a Hub id, or '{DEFAULT_MODEL}' "
                        "(the embedded default, SmolLM2-135M-Instruct)")


def _split_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--split", default=default, metavar="X:Y",
                   help="split points: head = layers [0,X), body = [X,Y), tail = [Y,N); negative values count "
                        f"from the end (default: {default or 'the range the server serves'})")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible output")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def _wire_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("wire")
    g.add_argument("--wire", default=DEFAULT_WIRE, metavar="CODEC[,CODEC]",
                   help="codec of the hidden states on the wire; 'UP,DOWN' sets each direction. A codec is parts "
                        "joined by '+': fp32 (lossless), fp16, bf16, int8/int6/int4/int3/int2 (affine, bit-packed; "
                        "add :tensor or :channel for coarser scales), out:K (K outlier channels per row in fp16), "
                        "had (seeded Hadamard rotation), pca:R (R coefficients in a basis file), zstd (lossless "
                        "pass), noise:S (the noise defence: Gaussian noise of S x the state's RMS, added by the "
                        f"sender). E.g. int8+out:4, had+int4, pca:128+int8, noise:0.1+int8+out:4 (default "
                        f"{DEFAULT_WIRE})")
    _basis_arg(g)
    g.add_argument("--transport", choices=("ws", "http"), default="ws",
                   help="steps over one WebSocket (default) or one HTTP POST each")
    g.add_argument("--link", default=None, metavar="RATE,DELAY",
                   help="emulate a network link to the server: a loopback proxy with this rate each way and this "
                        "one-way delay, e.g. 1000mbit,5ms (the paper's link rate); also 10mbit, 20ms, 1gbit,500us")
    g.add_argument("--no-cache", action="store_true",
                   help="resend and recompute the whole sequence every step (the paper's w/o-caching baseline)")
    g.add_argument("--speculate", choices=("auto", "off", "ngram", "self", "bridge"), default="auto",
                   help="speculative decoding: each round trip carries the next token and k draft tokens, and "
                        "yields up to k+1 tokens, with the same output. auto (default): prompt-lookup drafts, with "
                        "k chosen each round from the measured acceptance and round time (k = 0 when drafts do "
                        "not pay); ngram: the same; self: drafts from the device's own head and tail, skipping "
                        "the body; bridge: the same with a linear bridge over the body, fitted once on this "
                        "device (about a minute, cached); off: one token per round trip")
    g.add_argument("--max-draft", type=int, default=8, metavar="K",
                   help="longest draft per round trip, 0 to 15 (default 8)")


def _adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (from `lambdasplit tune`), merged into this device's head "
                        "and tail layers; it never leaves the device, and one that adapts layers the body server "
                        "runs is refused")


def _route_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several servers (a sharded body, replicas, cross-checking)")
    g.add_argument("--verify", type=int, default=1, metavar="K",
                   help="run every step of each hop on K of its replicas and let the majority decide; a replica "
                        "that disagrees is reported and dropped for the session (default 1: no cross-checking; "
                        "needs K servers of each hop's layers in --server)")
    g.add_argument("--hops", default="auto", choices=("auto", "forward", "chain"),
                   help="when --server lists servers of different layers (e.g. 'serve --split 1:15' and '--split "
                        "15:29'): 'forward' has each server send its output on to the next hop's (they need "
                        "--peers), 'chain' brings each hop's output back here first; 'auto' (default) forwards "
                        "where the servers allow it")


def _client_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the bearer token from this file (or set LAMBDASPLIT_TOKEN); never put it on the "
                        "command line, where other users can see it")
    g.add_argument("--ca-bundle", default=None, metavar="PEM",
                   help="verify an https:// server against these CA certificates instead of the system's")
    g.add_argument("--retries", type=int, default=6, metavar="N",
                   help="tries per step when the server is lost, with backoff, moving through the --server list "
                        "(default 6)")


def client_token(args) -> str | None:
    import os

    if getattr(args, "token_file", None):
        from pathlib import Path

        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"cannot read the token file {args.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise SystemExit(f"the token file {args.token_file} is empty")
        return token
    return os.environ.get("LAMBDASPLIT_TOKEN") or None


def _basis_arg(g) -> None:
    g.add_argument("--basis", default=None, metavar="FILE",
                   help="PCA basis file for pca:R codecs; client and server must load the same file "
                        "(make one with: lambdasplit fit-basis)")


def _wire(value: str) -> str | tuple[str, str]:
    parts = value.split(",")
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise SystemExit(f"--wire takes CODEC or UP,DOWN, got {value!r}")


def _lazy(module: str, function: str):
    """A command's entry point, imported only when it runs (so --help stays quick)."""
    def run(args):
        import importlib

        return getattr(importlib.import_module(module), function)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambdasplit",
        description="Λ-Split inference: the head and tail of a model run on this device, the body on a server; "
                    "only hidden states cross the network, never the prompt or the generated text.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run a body server (layers [X,Y) of a model, or a text-to-image U-Net)",
                       description="Serve layers [X,Y) of a model to split-inference clients over HTTP + WebSocket. "
                                   "Given a text-to-image pipeline (--model digits, the embedded one, or a diffusers "
                                   "folder of Stable Diffusion 1.x/2.x or SDXL), serve its U-Net instead, for "
                                   "lambdasplit imagine; --split does not apply then.")
    _model_arg(p)
    _split_arg(p, "1:-1")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8470, help="port to listen on; 0 picks a free one (default 8470)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="compute dtype of the body (default float32)")
    p.add_argument("--max-sessions", type=int, default=64, help="most concurrent sessions (default 64)")
    p.add_argument("--max-positions", type=int, default=None, help="longest sequence per session "
                   "(default: the model's context)")
    p.add_argument("--max-frame-mb", type=float, default=64, help="largest frame accepted, in MiB (default 64)")
    p.add_argument("--idle-ttl", type=float, default=600, help="seconds before an idle session is freed (default 600)")
    g = p.add_argument_group("security (required beyond loopback)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS/WSS with this certificate (chain)")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    g.add_argument("--tokens", default=None, metavar="FILE",
                   help="accept only bearer tokens whose hashes this file lists (make one with: lambdasplit token "
                        "new --file FILE); each session is bound to the token that opened it")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without TLS or tokens (hidden states then cross the network "
                        "unencrypted, or anyone may use the server)")
    p.add_argument("--max-batch", type=int, default=16, metavar="B",
                   help="decode steps of up to B concurrent sessions share one forward pass (default 16; 1 runs "
                        "every step alone)")
    p.add_argument("--kv-budget-mb", type=float, default=None, metavar="MB",
                   help="memory for all sessions' KV caches; each session reserves its maximum length when it "
                        "opens, and new sessions are refused with Retry-After when it is full (default: a quarter "
                        "of this machine's memory)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.add_argument("--peers", default=None, metavar="URL[,URL...]",
                   help="a sharded body's next-hop servers this one may forward its output to, when a session asks "
                        "(lambdasplit generate --hops forward); no others (default: none, no forwarding). The token "
                        "presented to them comes from $LAMBDASPLIT_PEER_TOKEN")
    p.add_argument("--dishonest", type=float, default=0.0, metavar="S",
                   help="TESTING ONLY: a lying server, to show that --verify catches it: perturb every answer by "
                        "Gaussian noise of S x its RMS (default 0: honest)")
    p.add_argument("--dishonest-after", type=int, default=0, metavar="N",
                   help="TESTING ONLY: with --dishonest, lie from each session's step N on (default 0)")
    p.add_argument("--cloud-only", action="store_true",
                   help="the paper's baseline: run the whole model here and take text (POST /v1/complete); "
                        "prompts and answers then cross the network in plain text")
    _basis_arg(p)
    g = p.add_argument_group("Ray Serve (scale out; needs: pip install 'lambdasplit[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve the body from Ray Serve replicas behind Serve's HTTP proxy on --host/--port (same "
                        "protocol; each session's steps go to the replica that holds its KV cache)")
    g.add_argument("--replicas", type=int, default=None, metavar="N", help="with --ray: body replicas (default 2)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: an existing Ray cluster (e.g. 10.0.0.5:6379); default: a new local Ray instance")
    g.add_argument("--ray-cpus-per-replica", type=float, default=None, metavar="C",
                   help="with --ray: Ray CPUs each replica reserves, and its torch threads (default 1)")

    p = sub.add_parser("generate", help="generate text through a body server",
                       description="Run the head and tail here, the body on --server, and stream the answer.")
    p.add_argument("prompt", help="the prompt (instruct models get their chat template)")
    p.add_argument("--server", default=None, metavar="URL[,URL...]",
                   help="body server URL, e.g. http://127.0.0.1:8470 or https://body.example:8470; several, comma-"
                        "separated, are tried in turn when one fails (omit to run the whole model locally)")
    _client_security_args(p)
    _model_arg(p)
    _split_arg(p, None)
    _sampling_args(p)
    _wire_args(p)
    p.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    _adapter_arg(p)
    p.add_argument("--cloud-only", action="store_true",
                   help="talk to a 'serve --cloud-only' server: send the prompt as text (the paper's baseline, "
                        "no privacy)")
    p.add_argument("--stats", action="store_true", help="print speed and traffic to stderr at the end")
    _route_args(p)
    p.add_argument("--device-slowdown", type=float, default=1.0, metavar="K",
                   help="EMULATE a device K times slower than this machine: after each head and tail pass, wait "
                        "(K - 1) x the time it took (default 1: no emulation)")

    p = sub.add_parser("demo", help="start a body server and generate through it, showing what the wire carries",
                       description="Start a body server on a free loopback port, run the paper's prompt through "
                                   "the split model, and show the answer, the speed, the traffic and the bytes "
                                   "the network saw.")
    p.add_argument("prompt", nargs="?", default=PAPER_PROMPT, help=f"default: {PAPER_PROMPT!r}")
    _model_arg(p)
    _split_arg(p, "1:-1")
    _sampling_args(p)
    _wire_args(p)
    p.add_argument("--image", action="store_true",
                   help=f"the text-to-image path instead: the embedded digits model (or --model PIPELINE), the "
                        f"U-Net on the server, and the prompt {DEMO_PROMPT!r} unless one is given")
    add_image_args(p, p.add_argument_group("image (with --image)"))
    p.set_defaults(max_new_tokens=160)

    add_imagine_parser(sub)

    p = sub.add_parser("web", help="the web UI and an OpenAI-compatible API on this device, over a body server",
                       description="Run the head and tail here and serve, on loopback only, a page to chat through "
                                   "the split model (tokens stream in; the split, the codecs and sampling are "
                                   "settable) that shows what the network sees: bytes each way, the time split into "
                                   "device, network and cloud, the latest frames in hex with a heatmap of the "
                                   "transmitted state, what a cloud-only request would have carried, and the "
                                   "leakage `lambdasplit assess` measured for the split. The same process serves "
                                   "an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) for "
                                   "existing apps. With --image-server, an Image tab makes pictures through a "
                                   "diffusion U-Net there, showing the image as it denoises and the noise each "
                                   "step carries. Nothing is fetched from the internet; nothing but hidden states "
                                   "(for images: the prompt's embeddings, the initial latent and the noise) "
                                   "crosses the network.")
    p.add_argument("--server", required=True, metavar="URL[,URL...]",
                   help="body server URL, e.g. http://127.0.0.1:8470 (several, comma-separated, are tried in turn)")
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address to listen on (127.0.0.1 or ::1; anything else is refused)")
    p.add_argument("--port", type=int, default=8480, help="port to listen on (default 8480; 0 picks a free one)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="require this key (Authorization: Bearer KEY) on the OpenAI-compatible API; also "
                        "LAMBDASPLIT_API_KEY (default: none, loopback only)")
    p.add_argument("--assessment", default=None, metavar="FILE",
                   help="the privacy assessment whose leakage the page shows (default: the one `lambdasplit assess` "
                        "keeps for this model, if any)")
    _adapter_arg(p)
    p.add_argument("--image-server", default=None, metavar="URL",
                   help="a body server that serves a text-to-image U-Net (lambdasplit serve --model digits): turns "
                        "on the Image tab, where the prompt is encoded and the image decoded on this device")
    p.add_argument("--image-model", default="digits", metavar="M",
                   help="this device's copy of the image pipeline (text encoder, VAE): a diffusers folder or "
                        "'digits', the embedded model (default)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    _client_security_args(p)
    _model_arg(p)
    _split_arg(p, None)
    _wire_args(p)

    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks that back the README's figures.")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("decode", help="tokens/s: local unsplit vs split over loopback (fp32, fp16)",
                         description="Decode speed of the unsplit model in this process against the split over "
                                     "a loopback body server, in one run, with the ratio.")
    _model_arg(b)
    _split_arg(b, "1:-1")
    b.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported (default 3)")
    b.add_argument("--prompt", default=PAPER_PROMPT)
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")

    b = bench.add_parser("fig5", help="the paper's Fig. 5: image quality and noise traffic per codec (text-to-image)",
                         description="Make the same images over the real body server with the noise coming down in "
                                     "each codec, and report bytes per step and per image and PSNR/SSIM against the "
                                     "fp32 image (mean and spread over prompts and seeds); for the digits model, how "
                                     "often an independent classifier still reads the prompted digit. Writes "
                                     "fig5.md/.csv/.json, fig5-grid.png (images per codec) and fig5-noise.png (the "
                                     "noise the network carries at one step, RGBA).")
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
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    b = bench.add_parser("web", help="what the web app and its OpenAI-compatible API cost over the split client",
                         description="Decode speed and time to first token of the same greedy generation four ways: "
                                     "the split client in this process (as generate), the web page's event stream, "
                                     "the OpenAI-compatible API streamed, and whole; runs interleaved, medians "
                                     "reported. Starts a body server (or uses --server) and `lambdasplit web`.")
    _model_arg(b)
    _split_arg(b, "1:-1")
    b.add_argument("--server", default=None, metavar="URL", help="use this body server (it must serve the split) "
                   "instead of starting one")
    b.add_argument("--wire", default=DEFAULT_WIRE, metavar="CODEC[,CODEC]", help=f"wire codecs (default {DEFAULT_WIRE})")
    b.add_argument("--speculate", choices=("auto", "off"), default="off",
                   help="speculative decoding on every path (default off: one token per round trip)")
    b.add_argument("--tokens", type=int, default=128, help="tokens per generation (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="runs per path; the median is reported (default 3)")
    b.add_argument("--prompt", default=PAPER_PROMPT)
    b.add_argument("--out", default="bench-results", help="folder for web.md/.csv/.json (default bench-results)")

    b = bench.add_parser("adapters", help="split LoRA against PrivateLoRA: tuning quality, speed and traffic",
                         description="Tune a LoRA adapter on the device's head and tail (split learning) and a "
                                     "PrivateLoRA adapter on the body (M on the device) on the same private text, "
                                     "through a body server behind the emulated link; then decode greedily four "
                                     "ways (local-only, plain Λ-Split, with each adapter) and report tokens/s, "
                                     "bytes and round trips per token, and held-out perplexity.")
    _model_arg(b)
    _split_arg(b, "1:-1")
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
    b.add_argument("--out", default="bench-results", help="folder for adapters.md/.csv/.json/.png and the adapters")

    from .bench.codecs_args import DEFAULT_CODECS, DEFAULT_PAIRS  # no torch: just the lists

    b = bench.add_parser("codecs", help="bytes per token vs quality for every wire codec, up and down",
                         description="For each codec on the uplink and on the downlink: bytes per generated token, "
                                     "relative error of the hidden state, greedy-token agreement with the fp32 wire "
                                     "(free run on the paper's prompt, teacher-forced on several prompts) and "
                                     "perplexity on a held-out text. Writes codecs.md, .csv, .json and .png.")
    _model_arg(b)
    _split_arg(b, "1:-1")
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
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    b = bench.add_parser("table1", help="the paper's Table I: cloud-only, Λ-Split w/o and w/ caching, local-only",
                         description="Reproduce the paper's Table I on this machine: cloud-only, Λ-Split without and "
                                     "with caching at the paper's three local:cloud ratios (scaled to the model's "
                                     "layers), and local-only; each row generates --tokens tokens greedily from "
                                     "the paper's prompt (EOS ignored) through real server processes behind an "
                                     "emulated link. Reports traffic at the sockets, latency split into "
                                     "communication, local and cloud, and tokens/s. Writes table1.md, .csv, .json "
                                     "and .png.")
    _model_arg(b)
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
    b.add_argument("--wire", default="fp16", metavar="CODEC[,CODEC]",
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
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    p = sub.add_parser("token", help="make bearer tokens for a body server (stores only their hashes)",
                       description="Tokens for `serve --tokens FILE`. The file keeps SHA-256 hashes, never the tokens.")
    tok = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tok.add_parser("new", help="make a token, append its hash to FILE, print the token once",
                       description="Make a random 256-bit token, append 'sha256:<hash> NAME' to FILE (created with "
                                   "mode 0600), and print the token on stdout. Give the token to the client (as a "
                                   "--token-file or LAMBDASPLIT_TOKEN); it cannot be recovered from FILE.")
    t.add_argument("--file", required=True, metavar="FILE", help="the server's token file")
    t.add_argument("--name", default=None, help="a name for the server's logs, e.g. alice-laptop")
    t = tok.add_parser("hash", help="print the token-file line for a token read from stdin",
                       description="Read a token from stdin and print the line a token file needs for it.")
    t.add_argument("--name", default=None, help="a name for the server's logs")

    b = bench.add_parser("concurrency", help="aggregate and per-session tokens/s with many clients, batched or not",
                         description="Start a body server (batched, then unbatched) and decode with 1, 4, 8 and 16 "
                                     "concurrent clients at once. The devices are emulated: they replay head states "
                                     "recorded from real generations and check every reply against the recording. "
                                     "Writes concurrency.md, .csv, .json and .png.")
    _model_arg(b)
    _split_arg(b, "1:-1")
    b.add_argument("--clients", default="1,4,8,16", metavar="N[,N...]", help="client counts (default 1,4,8,16)")
    b.add_argument("--modes", default="batched,unbatched", metavar="MODES", help="batched and/or unbatched")
    b.add_argument("--tokens", type=int, default=64, help="decode steps per client (default 64)")
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    b = bench.add_parser("noise", help="the noise defence: token recovery vs greedy agreement and perplexity",
                         description="For each noise scale S (Gaussian noise of S x each hidden state's RMS, the "
                                     "noise:S wire codec part), on the uplink only and on both directions of one "
                                     "split: the best attack's token recovery on noisy states (probes retrained on "
                                     "noisy states), greedy-token agreement with the noiseless split (teacher-forced "
                                     "and free-running) and held-out perplexity. Writes noise.md, .csv, .json and "
                                     ".png.")
    _model_arg(b)
    _split_arg(b, "1:-1")
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
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    b = bench.add_parser("plan", help="the planner's predicted tokens/s against measurements",
                         description="Make a plan (as `lambdasplit plan`), then measure the recommended split and "
                                     "the --splits through a real server behind the emulated link, with the device "
                                     "emulated K times slower; report predicted and measured tokens/s and whether "
                                     "they agree within 25%. Writes plan-check.md, .csv, .json and .png.")
    _model_arg(b)
    b.add_argument("--device-slowdown", type=float, default=15.0, metavar="K",
                   help="EMULATE a device K times slower than this machine (default 15, the paper's Jetson)")
    b.add_argument("--link", default="100mbit,20ms", metavar="RATE,DELAY",
                   help="the emulated link, rate and one-way delay (default %(default)s)")
    b.add_argument("--wire", default=DEFAULT_WIRE, metavar="CODEC[,CODEC]", help="wire codecs (default %(default)s)")
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
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    b = bench.add_parser("speculative", help="tokens/s with and without speculative decoding, at several RTTs",
                         description="Generate the same prompts greedily through a real server behind an emulated "
                                     "link, plainly and with each draft source, at each round-trip time; report "
                                     "tokens/s, the speed-up, the acceptance rate, tokens per round trip, the bytes "
                                     "per token, and whether the tokens match plain decoding.")
    _model_arg(b)
    b.add_argument("--split", default="1:29", metavar="X:Y", help="the split served (default 1:29, the paper's)")
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
    b.add_argument("--wire", default="fp32", metavar="CODEC[,CODEC]",
                   help="wire codecs (default fp32: lossless, so the tokens can be compared exactly)")
    b.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch threads for the device side and for the server process each (default 1: the two "
                        "share this machine as two machines would not; 0 leaves torch's default)")
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")

    b = bench.add_parser("scale", help="Ray Serve replicas, a sharded body (chained vs forwarded) and the cost of "
                                       "cross-checking, in one run",
                         description="Measure, over real servers on loopback: tokens/s for 1 and 2 Ray Serve "
                                     "replicas under concurrent clients; a standalone server's step against Ray "
                                     "Serve's; one hop against two (chained by the client, forwarded by the "
                                     "servers) over an emulated link; and cross-checking on k = 1, 2, 3 replicas. "
                                     "Writes scale.md/.csv/.json/.png.")
    _model_arg(b)
    b.add_argument("--split", default="1:15:29", metavar="X:M:Y",
                   help="the body [X, Y), cut at M for the two-hop runs (default 1:15:29)")
    b.add_argument("--parts", default="ray,overhead,hops,verify", metavar="PARTS",
                   help="which parts to run: ray, overhead, hops, verify (default all; ray and overhead need "
                        "'pip install lambdasplit[ray]')")
    b.add_argument("--clients", type=int, default=4, help="concurrent clients in the Ray part (default 4)")
    b.add_argument("--tokens", type=int, default=32, help="tokens each client generates (default 32)")
    b.add_argument("--repeats", type=int, default=3, help="runs per setup; the median is kept (default 3)")
    b.add_argument("--link", default="1gbit,10ms", metavar="RATE,DELAY",
                   help="the device's emulated link to each server in the hops part (default 1gbit,10ms: 20 ms RTT)")
    b.add_argument("--wire", default="fp32", metavar="CODEC[,CODEC]",
                   help="wire codecs (default fp32: lossless, so every setup's tokens can be compared exactly)")
    b.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")
    b.set_defaults(run=_lazy("lambdasplit.bench.scale", "run_scale_bench"))

    p = sub.add_parser("fit-basis", help="fit the PCA basis that pca:R wire codecs use",
                       description="Collect the hidden states at the split points on calibration text (the shipped "
                                   "text by default), fit a PCA basis per point, and write it as a safetensors "
                                   "file. Give the same file to the server (serve --basis) and to the client "
                                   "(--basis); sessions check its sha256.")
    _model_arg(p)
    _split_arg(p, "1:-1")
    p.add_argument("--points", default=None, metavar="P[,P...]",
                   help="split points to fit (default: X and Y of --split); the uplink uses X, the downlink Y")
    p.add_argument("--rank", type=int, default=256, help="largest rank kept (default 256; sessions may use less)")
    p.add_argument("--text", default=None, metavar="FILE", help="calibration text, paragraphs separated by blank "
                   "lines (default: the shipped lambdasplit/data/calibration.txt)")
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="where to write the basis (.safetensors)")

    # commands that register themselves: each module is torch-free at import and sets args.run
    from .plan import cli as plan_cli
    from .privacy import assess_cli, eavesdrop_cli
    from .tune import cli as tune_cli

    for module in (assess_cli, eavesdrop_cli, plan_cli, tune_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "run"):
            args.run(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "web":
            from .web.main import run_web

            run_web(args)
        elif args.command == "demo":
            if args.image:
                from .imagine import run_image_demo

                run_image_demo(args)
            else:
                from .demo import run_demo

                run_demo(args)
        elif args.command == "bench" and args.bench == "codecs":
            from .bench.codecs import run_codec_bench

            run_codec_bench(args)
        elif args.command == "bench" and args.bench == "concurrency":
            from .bench.concurrency import run_concurrency_bench

            run_concurrency_bench(args)
        elif args.command == "bench" and args.bench == "plan":
            from .bench.plancheck import run_plan_check

            run_plan_check(args)
        elif args.command == "bench" and args.bench == "speculative":
            from .bench.speculative import run_speculative_bench

            run_speculative_bench(args)
        elif args.command == "bench" and args.bench == "adapters":
            from .bench.adapters import run_adapters_bench

            run_adapters_bench(args)
        elif args.command == "bench" and args.bench == "fig5":
            from .bench.fig5 import DEFAULT_CODECS, run_fig5

            args.codecs = args.codecs or DEFAULT_CODECS
            run_fig5(args)
        elif args.command == "bench" and args.bench == "web":
            from .bench.web import run_web_bench

            run_web_bench(args)
        elif args.command == "bench" and args.bench == "noise":
            from .bench.noise import run_noise_bench

            run_noise_bench(args)
        elif args.command == "bench" and args.bench == "table1":
            from .bench.table1 import run_table1

            run_table1(args)
        elif args.command == "bench":
            from .bench.decode import run_decode_bench

            run_decode_bench(args)
        elif args.command == "fit-basis":
            _fit_basis(args)
        elif args.command == "token":
            _token(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"lambdasplit {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _serve(args) -> None:
    from .models.llm import resolve_split
    from .server.app import ServerSettings
    from .server.main import serve

    from .server.auth import TokenBook

    from .models.source import is_image_model, resolve_image_model

    settings = ServerSettings(max_sessions=args.max_sessions, idle_ttl_s=args.idle_ttl,
                              max_frame_bytes=int(args.max_frame_mb * (1 << 20)), max_positions=args.max_positions,
                              kv_budget_bytes=int(args.kv_budget_mb * (1 << 20)) if args.kv_budget_mb else None,
                              tokens=TokenBook.load(args.tokens) if args.tokens else None, max_batch=args.max_batch,
                              peers=tuple(u.strip().rstrip("/") for u in args.peers.split(",") if u.strip())
                              if args.peers else (), peer_token=os.environ.get("LAMBDASPLIT_PEER_TOKEN") or None,
                              dishonest=args.dishonest, dishonest_after=args.dishonest_after)
    if args.dishonest:
        print(f"WARNING: a DISHONEST server (testing only): answers perturbed by {args.dishonest:g} x their RMS",
              file=sys.stderr)
    if args.ray or args.replicas is not None or args.ray_address or args.ray_cpus_per_replica is not None:
        from .server.ray_serve import serve_from_args

        return serve_from_args(args, settings)
    if is_image_model(args.model):  # a text-to-image pipeline: the body is its U-Net, and --split does not apply
        if args.cloud_only or args.basis:
            raise SystemExit("--cloud-only and --basis are for language models")
        folder, split = resolve_image_model(args.model), None
    else:
        folder, _, split = resolve_split(args.model, args.split)
    serve(str(folder), split.x if split else 0, split.y if split else 0, args.host, args.port, args.dtype, settings,
          args.insecure, args.log_level, image=split is None,
          basis=args.basis, cloud_only=args.cloud_only, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _token(args) -> None:
    from .server.auth import add_token, token_hash

    if args.token_command == "new":
        token = add_token(args.file, args.name)
        print(token)
        print(f"added its hash to {args.file}; this is the only time the token is shown", file=sys.stderr)
    else:
        token = sys.stdin.readline().strip()
        if not token:
            raise SystemExit("give the token on stdin")
        print(f"sha256:{token_hash(token)}" + (f"  {args.name}" if args.name else ""))


def _fit_basis(args) -> None:
    from pathlib import Path

    from .models.calibrate import fit_basis
    from .models.llm import resolve_split
    from .wire.lowrank import Basis

    folder, _, split = resolve_split(args.model, args.split)
    try:
        points = [int(p) for p in args.points.split(",")] if args.points else [split.x, split.y]
    except ValueError:
        raise SystemExit(f"--points takes comma-separated layer numbers, got {args.points!r}") from None
    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    path = fit_basis(folder, points, args.rank, Path(args.out), text=text)
    basis = Basis.load(path)
    kept = ", ".join(f"point {p}: rank 64 keeps {basis.explained(p, min(64, args.rank)):.1%} of the variance"
                     for p in basis.points)
    print(f"wrote {path} (sha256 {basis.sha256[:16]}…); {kept}")


def sampling_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop_at_eos=not args.ignore_eos)


def _generate(args) -> None:
    from .client.generate import GenerationStats, SplitClient
    from .models.llm import parse_split

    if args.cloud_only:
        return _generate_cloud_only(args)
    split = parse_split(args.split) if args.split else None
    if args.link and not args.server:
        raise SystemExit("--link emulates the link to a body server: give --server too")
    link = None
    if args.link:
        from .net.link import link_to

        if "," in args.server:
            raise SystemExit("--link emulates the link to one server: give a single --server URL")
        link = link_to(args.server, args.link)
    try:
        from .client.body import Retry

        if args.retries < 1:
            raise SystemExit(f"--retries must be at least 1, got {args.retries}")
        client = SplitClient(args.model, server=link.url if link else args.server, split=split,
                             wire=_wire(args.wire), basis=args.basis, cache=not args.no_cache,
                             transport=args.transport, device_slowdown=args.device_slowdown,
                             token=client_token(args), ca_bundle=args.ca_bundle, retry=Retry(attempts=args.retries),
                             on_event=lambda message: print(f"[lambdasplit] {message}", file=sys.stderr),
                             speculate=args.speculate, max_draft=args.max_draft, adapter=args.adapter,
                             verify=args.verify, hops=args.hops)
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


def _generate_cloud_only(args) -> None:
    from .client.cloud import CloudClient, CloudResult

    if not args.server:
        raise SystemExit("--cloud-only needs --server (a 'lambdasplit serve --cloud-only' server)")
    result = CloudResult("", [])
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_at_eos=not args.ignore_eos, chat=not args.no_chat)
    for piece in CloudClient(args.server).stream(args.prompt, result, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        t = result.traffic
        print(f"cloud-only: {result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated in "
              f"{result.seconds:.2f} s; traffic (counted at the socket): up {t.socket_up / 1e3:.1f} kB, "
              f"down {t.socket_down / 1e3:.1f} kB; the prompt and the answer crossed in plain text", file=sys.stderr)


def format_stats(stats) -> str:
    lines = [f"{stats.prompt_tokens} prompt tokens, {stats.new_tokens} generated, "
             f"{stats.tokens_per_s:.1f} tokens/s (decode); prefill {stats.prefill_s * 1000:.0f} ms; "
             f"time: device {stats.device_s:.2f} s, network {stats.network_s:.2f} s, cloud {stats.cloud_s:.2f} s"]
    t = stats.traffic
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


if __name__ == "__main__":
    main()
