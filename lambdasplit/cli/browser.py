"""`lambdasplit export-web`: the device's head and tail as ONNX files for a browser page (docs/browser.md)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .options import add_model, add_output, add_split


def register(sub) -> None:
    p = sub.add_parser("export-web", help="export the device's head and tail to ONNX for a browser page",
                       description="Export the head (embeddings and layers [0, X)) and the tail (layers [Y, N), final "
                                   "norm, LM head) of a model to ONNX, each as one step with its KV cache as explicit "
                                   "inputs and outputs, for ONNX Runtime Web. A tied embedding table goes once into "
                                   "embed.bin, which both fp32 parts read. Also writes int8 copies (ONNX Runtime's "
                                   "dynamic quantization: half the download), the tokenizer files, and "
                                   "manifest.json (the split, every input and output, the body's fingerprint, the "
                                   "sizes). Then checks the exported parts against the PyTorch ones on held-out text, "
                                   "step by step through their caches, and records the result in the manifest. "
                                   "The folder also gets the page that runs them (index.html, with ONNX Runtime Web, "
                                   "tokenizers.js and jinja, installed from npm at setup): any static host can serve "
                                   "it (with the cross-origin isolation headers for threads), or --serve does. "
                                   "Needs the 'browser' extra.")
    add_model(p)
    add_split(p, "1:-1")
    add_output(p, "the folder to write", required=True)
    p.add_argument("--no-int8", action="store_true", help="skip the int8 copies")
    p.add_argument("--server", default=None, metavar="URL",
                   help="the body server the page connects to (it needs --allow-origin for the page's origin)")
    p.add_argument("--backend", default="auto", choices=("auto", "wasm", "webgpu"),
                   help="where the page runs the parts: wasm (ONNX Runtime's WASM build, threads and SIMD), webgpu "
                        "(its WebGPU build; what WebGPU lacks runs in WASM), or auto: WebGPU where the browser has a "
                        "hardware adapter, else WASM (default). The page's ?backend= overrides it")
    p.add_argument("--no-page", action="store_true", help="write the parts only, not the page and its runtimes")
    p.add_argument("--serve", type=int, default=None, metavar="PORT",
                   help="then serve the folder on 127.0.0.1:PORT with the cross-origin isolation headers, until Ctrl-C")
    p.add_argument("--check-tokens", type=int, default=64, metavar="N",
                   help="held-out tokens to check the export on (a 16-token prompt, then one token a step; "
                        "0 skips the check; default 64)")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..browser.check import check_export
    from ..browser.export import export_web
    from ..browser.page import runtime_dir, serve_page, write_page
    from ..models.calibrate import shipped_text
    from ..models.llm import resolve_split

    if args.check_tokens < 0:
        raise ValueError(f"--check-tokens must be 0 or more, got {args.check_tokens}")
    if not args.no_page:
        runtime_dir()  # missing runtimes: said before the export, not after it
    folder, _, split = resolve_split(args.model, args.split)
    out = Path(args.out)
    manifest = export_web(folder, split.x, split.y, out, int8=not args.no_int8)
    if args.check_tokens:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(folder)(shipped_text("heldout"))["input_ids"][:args.check_tokens]
        manifest["check"] = check_export(folder, out, ids, prompt_rows=min(16, len(ids)), int8=not args.no_int8)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for kind, r in manifest["check"].items():
            print(f"{kind}: greedy agreement with PyTorch {r['greedy_agreement']:.1%} over {r['tokens']} held-out "
                  f"tokens ({r['steps']} steps); head state max |diff| {r['head_state_max_abs']:.2e} "
                  f"({r['head_state_max_rel']:.1e} of its largest value), tail logits max |diff| "
                  f"{r['tail_logits_max_abs']:.2e}")
    if not args.no_page:
        write_page(out, args.server, int8=False, backend=args.backend)
    sizes = ", ".join(f"{name} {part['bytes'] / 2**20:.1f} MiB" + (f" (int8 {part['int8_bytes'] / 2**20:.1f} MiB)"
                                                                    if "int8_bytes" in part else "")
                      for name, part in manifest["parts"].items())
    if shared := manifest.get("shared"):
        sizes += f", the tied embedding table both fp32 parts read ({shared['file']} {shared['bytes'] / 2**20:.1f} MiB)"
    print(f"wrote {out}: split {split}, {sizes}, manifest.json and the tokenizer"
          + ("" if args.no_page else ", and the page (index.html) with its runtimes"))
    if args.serve is not None:
        server = serve_page(out, port=args.serve)
        print(f"serving the page on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        finally:
            server.shutdown()
