"""One-off trial: PyTorch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) on SmolLM2's product shapes,
one row, 2 threads then 1: microseconds a call and GB/s of packed weights read. Not a lambdasplit command.

    .venv/bin/python scripts/trials/int4_kernel_shapes.py
"""
import torch, time
from torch import nn
from lambdasplit.models.formats import Int4Linear
torch.set_num_threads(2)
def t(fn, n=300):
    for _ in range(20): fn()
    s = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - s) / n * 1e6
for out, inp in [(576,576),(192,576),(1536,576),(576,1536),(960,576),(3072,576)]:
    q = Int4Linear(nn.Linear(inp, out, bias=False).requires_grad_(False), 32)
    x = torch.randn(1, inp).bfloat16()
    us = t(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, 32, q.scales_and_zeros))
    print(out, inp, f"{us:.1f} us", f"{q.weight_bytes/us/1e3:.1f} GB/s")
torch.set_num_threads(1)
print("1 thread")
for out, inp in [(576,576),(192,576),(1536,576),(576,1536),(960,576),(3072,576)]:
    q = Int4Linear(nn.Linear(inp, out, bias=False).requires_grad_(False), 32)
    x = torch.randn(1, inp).bfloat16()
    us = t(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, 32, q.scales_and_zeros))
    print(out, inp, f"{us:.1f} us", f"{q.weight_bytes/us/1e3:.1f} GB/s")
