"""What the strongest assessed attack reads back from one conversation's own uplink frames (the page's panel).

    uplink frames (as the network carried them) -> states at layer X, per position -> the attack -> tokens

The attack is `privacy.attacks.load_attack(folder, X, "input")`: the one `lambdasplit assess` measured best
at X with the public weights, its trained probe when it has one, else the nearest-embedding match. It runs
where the assessment's probes are: in the web app. The frames come either from the device in the page (it
posts the bytes it sent: exactly what the body server already received) or from the Python device's own
session (its uplink states, passed once more through the session's codec, as the frames carried them). The
answer holds the guesses only; the truth stays with the device, which puts the two side by side.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..wire.frame import Frame, FrameError, Limits, decode_frame, encode_frame

MAX_FRAMES = 16384  # frames one read-back request may carry (a conversation of that many steps)
MAX_BYTES = 64 << 20  # and their bytes, all together
TOP_K = 5
LOADED_ATTACKS = 4  # attacks kept loaded, most recently used first


class ReadBackError(ValueError):
    """A request the read-back cannot serve, with a message that says why."""


class ReadBack:
    """Runs the best attack at a layer on uplink states; one per web app, attacks and tokenizer loaded once."""

    def __init__(self, folder: Path, num_layers: int, hidden_size: int):
        self.folder, self.num_layers, self.hidden_size = Path(folder), num_layers, hidden_size
        self._attacks: OrderedDict[int, object] = OrderedDict()
        self._tokenizer = None
        self._lock = threading.Lock()

    def from_frames(self, layer: int, frames: list[str]) -> dict:
        """The read-back of base64-encoded uplink frames (each decoded as the body server would)."""
        if not isinstance(frames, list) or not frames:
            raise ReadBackError("'frames' must be a non-empty list of base64-encoded uplink frames")
        if len(frames) > MAX_FRAMES:
            raise ReadBackError(f"{len(frames)} frames; at most {MAX_FRAMES} are read back at once")
        rows: dict[int, torch.Tensor] = {}
        total = 0
        for i, text in enumerate(frames):
            try:
                data = base64.b64decode(text, validate=True) if isinstance(text, str) else None
            except (binascii.Error, ValueError):
                data = None
            if data is None:
                raise ReadBackError(f"frame {i} is not a base64 string")
            total += len(data)
            if total > MAX_BYTES:
                raise ReadBackError(f"the frames exceed {MAX_BYTES >> 20} MiB")
            try:
                frame = decode_frame(data, Limits(), width=self.hidden_size)
            except FrameError as exc:
                raise ReadBackError(f"frame {i}: {exc}") from None
            if frame.kind != "hidden":
                raise ReadBackError(f"frame {i} is a {frame.kind!r} frame, not an uplink hidden state")
            state = frame.tensor.reshape(-1, self.hidden_size)
            for r in range(state.shape[0]):  # a later frame at a position replaces an earlier one (a rollback)
                rows[frame.pos + r] = state[r]
        positions = sorted(rows)
        return self.run(layer, positions, torch.stack([rows[p] for p in positions]))

    def from_body(self, layer: int, body) -> dict | None:
        """The read-back of a Python device's finished session (None when it kept no uplink states)."""
        sent = getattr(body, "sent", None)
        if not sent:
            return None
        states = torch.cat(sent).cpu()
        carried = decode_frame(encode_frame(Frame("hidden", tensor=states, codec=body.up)), codec=body.up,
                               width=self.hidden_size).tensor
        return self.run(layer, list(range(states.shape[0])), carried.reshape(-1, self.hidden_size))

    def run(self, layer: int, positions: list[int], states: torch.Tensor) -> dict:
        """{attack, layer, target, positions, guesses (top-5 ids a position), pieces (the best guess's text),
        assessed (False: no assessment here, so the attack is the public-weights fallback, not the strongest)}."""
        if not isinstance(layer, int) or not 0 <= layer <= self.num_layers:
            raise ReadBackError(f"layer must be an integer in [0, {self.num_layers}], got {layer!r}")
        attack = self._attack(layer)
        guesses = attack.topk(states.float(), TOP_K).tolist()
        tokenizer = self._tokenizer_once()
        pieces = [tokenizer.decode([g[0]], skip_special_tokens=False) for g in guesses]
        from ..privacy.results import default_assessment_path

        return {"attack": attack.name, "layer": layer, "target": "input", "positions": positions,
                "guesses": guesses, "pieces": pieces, "assessed": default_assessment_path(self.folder).is_file()}

    def _attack(self, layer: int):
        from ..privacy.attacks import load_attack

        with self._lock:
            attack = self._attacks.get(layer)
            if attack is None:
                attack = self._attacks[layer] = load_attack(self.folder, layer, "input")
                while len(self._attacks) > LOADED_ATTACKS:
                    self._attacks.popitem(last=False)
            self._attacks.move_to_end(layer)
            return attack

    def _tokenizer_once(self):
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
            return self._tokenizer
