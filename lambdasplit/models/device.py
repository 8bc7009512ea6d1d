"""Where a part computes: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`.

`auto` picks the first CUDA GPU when torch sees one, else Apple's MPS, else the CPU. A device that
is not there is refused with the list of those that are, before any weights load.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"


class DeviceError(ValueError):
    """The asked-for device does not exist on this machine (or torch was built without it)."""


def available_devices() -> list[str]:
    """Every device torch can compute on here, the CPU first."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A device spec -> a torch.device that exists here (`cuda` means `cuda:0`)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    have = available_devices()
    if spec == "auto":
        return torch.device(next((d for d in have if d != "cpu"), "cpu"))
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_CHOICES} (here: {', '.join(have)})") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    name = device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index}"
    if device.type == "cpu" and device.index not in (None, 0):
        raise DeviceError(f"device {spec!r}: there is one CPU device, 'cpu'")
    if name not in have:
        why = ""
        if device.type == "cuda" and not torch.cuda.is_available():
            build = torch.version.cuda
            why = (f" (torch {torch.__version__} is a CPU build: install a CUDA build of torch, see the README)"
                   if build is None else " (torch sees no CUDA GPU)")
        raise DeviceError(f"device {spec!r} is not available{why}; this machine has: {', '.join(have)}")
    return device


def device_name(device: torch.device) -> str:
    """A readable name: 'cpu', 'cuda:0 (NVIDIA H100 80GB HBM3)', 'mps'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing GPU work needs it; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
