"""A public text corpus on the model: reproducible, offline, split into train and test parts.

The privacy assessment attacks it (privacy/assess.py); the draft bridge fits on its training part
(client/bridge.py).

Two sources, both shipped in the package:
- the model's own greedy answers to a fixed prompt set (`lambdasplit/data/probe_prompts.txt`), each
  prompt wrapped in the chat template as a device would send it. Every fourth prompt is held out.
- the shipped prose: `calibration.txt` for training, `heldout.txt` for testing.

Only the user's words and the model's answer are scored; the chat template's fixed tokens (the
same in every session, so no secret) are run through the model but never scored. The corpus is
cached after the first build, because generating the answers takes a minute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from ..util.atomic import write_text
from .calibrate import calibration_texts, shipped_text

_PLACEHOLDER = "\u2063PROMPT\u2063"
VERSION = 1


@dataclass
class TextSequence:
    ids: list[int]
    scored: list[bool]  # positions whose token is the user's or the model's text
    part: str  # "train" or "test"
    source: str  # "prompt:N", "calibration:N" or "heldout:N"


def probe_prompts() -> list[str]:
    text = resources.files("lambdasplit.data").joinpath("probe_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _chat_parts(tokenizer) -> tuple[list[int], list[int]] | None:
    """Token ids of the chat template before and after the user's words (None: no template)."""
    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True,
                                         tokenize=False)
    before, after = text.split(_PLACEHOLDER)
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def _answers(folder: Path, prompts: list[list[int]], max_new: int, batch: int, progress: bool) -> list[list[int]]:
    """Greedy answers of the unsplit model, batched with left padding; each cut at its end-of-sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = next(iter(eos))
    answers = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), batch), desc="answering the probe prompts", unit="batch",
                      disable=not progress, leave=False):
            group = prompts[i:i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=pad)
            for row in out[:, width:].tolist():
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                answers.append(row[:cut])
    return answers


def build_corpus(folder: Path, *, answer_tokens: int = 80, prompts: int | None = None, max_tokens: int = 256,
                 batch: int = 16, progress: bool = True) -> list[TextSequence]:
    """The assessment's text: chat-templated prompts with the model's answers, and the shipped prose.

    `prompts` keeps only the first so many prompts (and as many prose paragraphs): for quick runs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    parts = _chat_parts(tokenizer)
    texts = probe_prompts()[:prompts]
    contents = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts]
    before, after = parts if parts else ([], [])
    answers = _answers(folder, [before + c + after for c in contents], answer_tokens, batch, progress)
    seqs = []
    for n, (content, answer) in enumerate(zip(contents, answers)):
        ids = before + content + after + answer
        scored = [False] * len(before) + [True] * len(content) + [False] * len(after) + [True] * len(answer)
        seqs.append(TextSequence(ids, scored, "test" if n % 4 == 3 else "train", f"prompt:{n}"))
    for name, part in (("calibration", "train"), ("heldout", "test")):
        for n, paragraph in enumerate(calibration_texts(shipped_text(name))[:prompts]):
            ids = tokenizer(paragraph)["input_ids"][:max_tokens]
            seqs.append(TextSequence(ids, [True] * len(ids), part, f"{name}:{n}"))
    return seqs


def corpus_key(folder: Path, answer_tokens: int, prompts: int | None = None) -> str:
    """What the cached corpus depends on: the model, the prompts, the shipped texts and the settings."""
    from .source import model_name

    h = hashlib.sha256(f"v{VERSION}|{model_name(folder)}|{answer_tokens}|{prompts}|".encode())
    for name in ("probe_prompts", "calibration", "heldout"):
        h.update(resources.files("lambdasplit.data").joinpath(f"{name}.txt").read_bytes())
    return h.hexdigest()[:16]


def load_corpus(folder: Path, cache_dir: Path, *, answer_tokens: int = 80, prompts: int | None = None,
                progress: bool = True, log=print) -> list[TextSequence]:
    """The corpus from the cache, or built (about two minutes on two cores) and cached."""
    path = cache_dir / f"corpus-{corpus_key(folder, answer_tokens, prompts)}.json"
    if path.is_file():
        try:
            return [TextSequence(**s) for s in json.loads(path.read_text())["sequences"]]
        except (ValueError, KeyError, TypeError):
            log(f"ignoring a damaged corpus cache {path}")
    log("building the assessment corpus: the model answers the shipped probe prompts (once; cached)")
    seqs = build_corpus(folder, answer_tokens=answer_tokens, prompts=prompts, progress=progress)
    write_text(path, json.dumps({"version": VERSION, "sequences": [asdict(s) for s in seqs]}))
    return seqs

