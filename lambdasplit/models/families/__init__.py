"""Per-family adapters: what each verified model type does around its stock decoder layers.

`family_for(config)` gives the adapter of a verified model type, or raises with the reason a split of
it could be wrong. A type is verified only when tests check, on a tiny random model of it, that the
split's greedy tokens equal the unsplit model's `generate` (with the KV cache, speculative rollback and
cross-session batching, across sliding windows): see tests/test_families.py and docs/families.md.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ...wire.spec import DEFAULT_WIRE
from .alibi import Bloom
from .base import Family
from .gemma import Gemma
from .gpt import GPT2, Falcon, GPTNeoX, Phi
from .moe import MixtureOfExperts

LLAMA = Family()
LLAMA.types = ("llama", "mistral", "ministral3", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3",
               "starcoder2", "stablelm", "glm", "exaone4", "arcee")

FAMILIES: tuple[Family, ...] = (LLAMA, Gemma(), GPT2(), GPTNeoX(), Phi(), Falcon(), Bloom(), MixtureOfExperts())
BY_TYPE = {t: family for family in FAMILIES for t in family.types}
VERIFIED_TYPES = tuple(BY_TYPE)

REFUSED = {
    "granite": "multiplies embeddings, residuals, attention and logits by config factors outside the layers",
    "granitemoe": "as Granite",
    "cohere": "scales the logits (`logit_scale`) outside the layers",
    "cohere2": "as Cohere",
    "gemma3n": "per-layer input embeddings and AltUp streams computed outside the layers",
}
"""Types that look like decoders but whose forward does more than lambdasplit models, and why."""


class UnsupportedFamilyError(ValueError):
    """A model type lambdasplit has not verified (or knows it cannot split exactly)."""


def layout(config: PretrainedConfig) -> Family:
    """The adapter whose layout this config's model has (the Llama layout for a type no family declares),
    verified or not: where to look for its modules and tensors."""
    family = BY_TYPE.get(config.model_type)
    return LLAMA if family is None else family.variant(config)


def default_wire(config: PretrainedConfig) -> str:
    """The wire codecs (UP,DOWN) a session of this model uses unless it asks for others."""
    return layout(config).default_wire or DEFAULT_WIRE


def family_for(config: PretrainedConfig) -> Family:
    model_type = config.model_type
    family = BY_TYPE.get(model_type)
    if family is not None:
        family = family.variant(config)
    why = REFUSED.get(model_type) if family is None else family.check(config)
    if family is not None and why is None:
        return family
    if why is None:
        why = ("its forward may do more than embed -> layers -> norm -> lm_head (for example scaled embeddings "
               "or logits), so a split could be silently wrong")
    raise UnsupportedFamilyError(f"model type {model_type!r} cannot be split exactly: {why}. "
                                 f"Verified: {', '.join(VERIFIED_TYPES)} (docs/families.md)")
