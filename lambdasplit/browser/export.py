"""`lambdasplit export-web`: the device's parts (head and tail) as ONNX files a browser page can run.

Each part is exported as one step with its KV cache as explicit inputs and outputs (steps.py), with dynamic
row, past and total lengths, by torch's TorchScript-based exporter (opset 17). With `int8`, ONNX Runtime's
dynamic quantization also writes a copy whose MatMul weights are int8 (per tensor, activations quantized per
call), a quarter of the download. A tied embedding table is then kept once, outside both fp32 files
(shared.py). The folder gets the tokenizer files and a manifest.json that says what each file holds: the
split, the shapes and names of every input and output, the body's fingerprint (the page must open sessions
for exactly these weights) and the sizes.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..models.families import default_wire
from ..models.llm import SplitModel, load_split
from ..models.source import model_name
from ..util.extras import check
from .shared import share_tied_table
from .steps import HeadStep, TailStep, cache_shape, step_mask

OPSET = 17
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def kv_names(prefix: str, layers: range) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")]


def export_web(folder: Path, x: int, y: int, out: Path, *, int8: bool = True, log=print) -> dict:
    """Export the head [0, x) and the tail [y, N) of the model in `folder` to `out`; returns the manifest."""
    check("onnx", "browser")
    check("onnxruntime", "browser")
    model = load_split(folder, x, y, parts=("head", "tail"))
    sliding = [t for part in (model.head, model.tail) for t in part.layers.types if t != "full_attention"]
    if sliding:
        raise ValueError(f"{model.config.model_type}'s head or tail has {sliding[0]} layers; the browser export "
                         "builds full causal masks only (docs/browser.md)")
    if model.head.family.full_masks:  # ALiBi: its traced prefill steps differ from PyTorch (1% on BLOOM)
        raise ValueError(f"{model.config.model_type} uses ALiBi position biases, which the browser export does not "
                         "reproduce exactly yet (docs/browser.md)")
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name, step, layers in (("head", HeadStep(model), range(0, x)), ("tail", TailStep(model), range(y, model.split.n))):
        log(f"export-web: exporting the {name} (layers [{layers.start}, {layers.stop})) ...")
        parts[name] = _export(model, step.eval(), name, layers, out, int8, log)
    shared = share_tied_table(out, parts["head"]["file"], parts["tail"]["file"])
    if shared:  # a tied table: one copy, fetched once, for both fp32 parts
        for part in parts.values():
            part.update(bytes=(out / part["file"]).stat().st_size, external=[shared["file"]])
        log(f"export-web: the tied embedding table, shared by both parts: {shared['file']} "
            f"{shared['bytes'] / 2**20:.1f} MiB")
    for file in TOKENIZER_FILES:
        if (folder / file).is_file():
            shutil.copy(folder / file, out / file)
    manifest = _manifest(model, folder, parts) | ({"shared": shared} if shared else {})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _export(model: SplitModel, step: torch.nn.Module, name: str, layers: range, out: Path, int8: bool, log) -> dict:
    heads, head_dim = cache_shape(model)
    rows, past = 3, 2  # example lengths; every length is dynamic in the file
    first = (torch.randint(0, model.config.vocab_size, (1, rows)) if name == "head"
             else torch.randn(1, rows, model.hidden_size))
    positions = torch.arange(past, past + rows).unsqueeze(0)
    pasts = [torch.randn(1, heads, past, head_dim) for _ in range(2 * len(layers))]
    inputs = ["ids" if name == "head" else "hidden", "positions", "mask", *kv_names("past", layers)]
    outputs = ["hidden" if name == "head" else "logits", *kv_names("present", layers)]
    axes = {inputs[0]: {1: "rows"}, "positions": {1: "rows"}, "mask": {2: "rows", 3: "total"}, outputs[0]: {1: "rows"},
            **{n: {2: "past"} for n in kv_names("past", layers)}, **{n: {2: "total"} for n in kv_names("present", layers)}}
    path = out / f"{name}.onnx"
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings about shape-dependent branches
        try:
            torch.onnx.export(step, (first, positions, step_mask(past, rows), *pasts), str(path), dynamo=False,
                              opset_version=OPSET, input_names=inputs, output_names=outputs, dynamic_axes=axes)
        except torch.onnx.errors.UnsupportedOperatorError as exc:  # MoE routing's histc, say
            raise ValueError(f"the {name} of {model.config.model_type} cannot be exported to ONNX: {exc}") from None
    import onnx

    graph = onnx.load(str(path)).graph  # the exporter drops inputs a part never reads (GPT-2's tail: positions)
    kept = {i.name for i in graph.input}
    part = {"file": path.name, "bytes": path.stat().st_size, "layers": [layers.start, layers.stop],
            "inputs": [n for n in inputs if n in kept], "outputs": outputs}
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = out / f"{name}.int8.onnx"
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its advice to pre-process, printed for every call
        try:
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
        part.update(int8_file=quantized.name, int8_bytes=quantized.stat().st_size)
    log(f"export-web: {path.name} {part['bytes'] / 2**20:.1f} MiB"
        + (f", {part['int8_file']} {part['int8_bytes'] / 2**20:.1f} MiB" if int8 else ""))
    return part


def _manifest(model: SplitModel, folder: Path, parts: dict) -> dict:
    config, split = model.config, model.split
    heads, head_dim = cache_shape(model)
    eos = config.eos_token_id
    return {
        "format": "lambdasplit-browser/1", "model": model_name(folder), "model_type": config.model_type,
        "num_layers": split.n, "hidden_size": model.hidden_size, "vocab_size": config.vocab_size,
        "split": [split.x, split.y], "body_fingerprint": model.body_fingerprint(),
        "kv_heads": heads, "head_dim": head_dim, "dtype": "float32",
        "max_positions": model.max_positions, "eos_token_ids": eos if isinstance(eos, list) else [eos],
        "opset": OPSET, "parts": parts, "default_wire": default_wire(config),
    }
