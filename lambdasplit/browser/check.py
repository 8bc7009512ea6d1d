"""How close the exported parts are to the PyTorch ones, on held-out text, step by step through their caches.

The text runs as the page runs it: a prompt of `prompt_rows` tokens in one step, then one token per step,
each part feeding its presents back as the next step's pasts. The PyTorch body sits between the two
exported parts, fed the PyTorch head's state, so each part is compared on the same inputs: the head's
output state (largest absolute difference, and that difference over the state's largest magnitude), the
tail's logits (largest absolute difference), and greedy agreement (the top token of every row).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..models.llm import load_split
from .steps import cache_shape, step_mask


class _Part:
    """One exported part in ONNX Runtime, with its own KV cache."""

    def __init__(self, path: Path, past_names: list[str], heads: int, head_dim: int):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.past_names = past_names
        self.wanted = {i.name for i in self.session.get_inputs()}  # a part that never reads its positions has none
        self.past = [np.zeros((1, heads, 0, head_dim), np.float32) for _ in past_names]

    def step(self, first: np.ndarray, first_name: str, pos: int) -> np.ndarray:
        rows = first.shape[1]
        feed = {first_name: first, "positions": np.arange(pos, pos + rows, dtype=np.int64)[None],
                "mask": step_mask(pos, rows).numpy(), **dict(zip(self.past_names, self.past))}
        out, *self.past = self.session.run(None, {k: v for k, v in feed.items() if k in self.wanted})
        return out


@torch.inference_mode()
def check_export(folder: Path, out: Path, ids: list[int], prompt_rows: int = 16, int8: bool = True) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    x, y = manifest["split"]
    model = load_split(folder, x, y, parts=("head", "body", "tail"))
    heads, head_dim = cache_shape(model)
    report = {}
    for kind in ("fp32", "int8") if int8 and "int8_file" in manifest["parts"]["head"] else ("fp32",):
        key = "file" if kind == "fp32" else "int8_file"
        parts = {name: _Part(out / manifest["parts"][name][key], [n for n in manifest["parts"][name]["inputs"]
                                                                   if n.startswith("past.")], heads, head_dim)
                 for name in ("head", "tail")}
        caches = [p.layers.new_cache() for p in (model.head, model.body, model.tail)]
        worst_state = worst_logits = scale = 0.0
        same = total = pos = 0
        chunks = [ids[:prompt_rows]] + [[t] for t in ids[prompt_rows:]]
        for chunk in chunks:
            rows = torch.tensor([chunk])
            state = model.head(rows, caches[0], pos)
            got = torch.from_numpy(parts["head"].step(rows.numpy(), "ids", pos))
            worst_state = max(worst_state, float((got - state).abs().max()))
            scale = max(scale, float(state.abs().max()))
            body = model.body(state, caches[1], pos)
            want = model.tail(body, caches[2], pos, last_only=False)
            logits = torch.from_numpy(parts["tail"].step(body.numpy(), "hidden", pos))
            worst_logits = max(worst_logits, float((logits - want).abs().max()))
            same += int((logits.argmax(-1) == want.argmax(-1)).sum())
            total += len(chunk)
            pos += len(chunk)
        report[kind] = {"head_state_max_abs": worst_state, "head_state_max_rel": worst_state / max(scale, 1e-12),
                        "tail_logits_max_abs": worst_logits, "greedy_agreement": same / total, "tokens": total,
                        "steps": len(chunks)}
    return report
