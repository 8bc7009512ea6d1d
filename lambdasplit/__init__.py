"""lambdasplit: privacy-preserving split inference (Λ-Split) of generative models.

The device runs the head and tail of a model, a server runs the body; only hidden states cross
the network. Start with `SplitClient` (device side) and `lambdasplit serve` (cloud side).
"""

__version__ = "0.1.0"
__all__ = ["SplitClient", "SamplingParams", "GenerationResult", "ConnectionOptions"]


def __getattr__(name: str):
    # imported lazily so that `import lambdasplit` stays cheap (no torch until needed)
    if name in ("SplitClient", "GenerationResult"):
        from .client import generate

        return getattr(generate, name)
    if name == "ConnectionOptions":
        from .client.options import ConnectionOptions

        return ConnectionOptions
    if name == "SamplingParams":
        from .client.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lambdasplit' has no attribute {name!r}")
