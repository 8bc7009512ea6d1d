"""One-off trial behind docs/families.md: the largest magnitude and the RMS of the hidden state entering each
layer of a model (the state a split at that layer sends), on one prompt; fp16's range ends at 65504.

    .venv/bin/python scripts/trials/residual_range.py gemma3
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lambdasplit.models.source import resolve_model

PROMPT = "What is the difference between AI, ML and DL? Explain briefly with examples."
folder = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.inference_mode():
    states = model(tokenizer(PROMPT, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states
for layer, state in enumerate(states[:-1]):  # the last one has been through the final norm
    peak, rms = float(state.abs().max()), float(state.pow(2).mean().sqrt())
    print(f"entering layer {layer:2d}: max |x| {peak:9.1f}  rms {rms:7.1f}{'  past fp16' if peak > 65504 else ''}")
