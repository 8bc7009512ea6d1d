"""One-off trial behind docs/devices.md: teacher-forced greedy agreement with fp32 (bench decode's four prompts,
128 tokens each) of int4 layers with an int4, fp32, bf16 or fp16 LM head.

    .venv/bin/python scripts/trials/int4_head_agreement.py
"""
import torch, torch.nn as nn
from lambdasplit.models.llm import load_split, resolve_split
from lambdasplit.bench.decode import AGREEMENT_PROMPTS
torch.set_num_threads(2)
folder, config, split = resolve_split(None, "1:29")
ref = load_split(folder, 1, 29, parts=("head","body","tail"), weights="fp32")
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(folder)
def run(model, x):
    cache = model.head.layers.new_cache()
    return model.tail(model.body(model.head(x, cache, 0), cache, 0), cache, 0, last_only=False)[0]
seqs=[]
with torch.inference_mode():
  for p in AGREEMENT_PROMPTS:
    ids = tok.apply_chat_template([{"role":"user","content":p}], add_generation_prompt=True)
    if hasattr(ids, "input_ids"): ids = ids["input_ids"]
    ids = list(ids)
    for _ in range(128):
        l = run(ref, torch.tensor([ids]))[-1]; ids.append(int(l.argmax()))
    seqs.append((len(ids)-128, ids))
  def agree(model):
    same=tot=0
    for n, ids in seqs:
        ch = run(model, torch.tensor([ids]))[n-1:-1].argmax(-1).tolist()
        same += sum(a==b for a,b in zip(ch, ids[n:])); tot += len(ch)
    return same/tot
  q = load_split(folder, 1, 29, parts=("head","body","tail"), weights="int4")
  print("int4 all", agree(q))
  lm = nn.Linear(576, 49152, bias=False); lm.weight = ref.tail.lm_head.weight
  q.tail.lm_head = lm; print("int4 + fp32 lm_head", agree(q))
  lm16 = nn.Linear(576, 49152, bias=False); lm16.weight = nn.Parameter(ref.tail.lm_head.weight.to(torch.bfloat16), requires_grad=False)
  class B(nn.Module):
      def forward(s, x): return lm16(x.to(torch.bfloat16)).float()
  q.tail.lm_head = B(); print("int4 + bf16 lm_head", agree(q))
  lm16h = nn.Linear(576, 49152, bias=False); lm16h.weight = nn.Parameter(ref.tail.lm_head.weight.half(), requires_grad=False)
  class H(nn.Module):
      def forward(s, x): return lm16h(x.half()).float()
  q.tail.lm_head = H(); print("int4 + fp16 lm_head", agree(q))
