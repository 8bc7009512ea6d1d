"""One chat generation on the device, as a stream of events for the web UI and the local API.

    start  the split, the codecs, the prompt's length, and what a cloud-only request would carry
    text   a piece of the answer (stop strings held back until they can no longer match)
    wire   live figures: bytes each way, the time split into device / network / cloud, tokens/s,
           and now and then the latest frames in hex with the transmitted states for a heatmap
    done   why it ended (stop, length, cancelled) and the token counts
    attack (with `readback`, after done) what the strongest assessed attack reads back from this conversation's
           uplink frames, beside the truth (readback.py)

The generation runs in the caller's thread; `cancel` stops it between round trips, and closing
the generator ends the body session.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator

from ..client.body import LocalBody
from ..client.generate import GenerationStats, TextStream
from ..client.sampling import SamplingParams
from ..wire.frame import FrameError, decode_frame
from ..wire.hexdump import hexdump
from .device import Device, Options
from .readback import ReadBack

FRAME_EVERY_S = 0.25  # how often the hex view and the heatmap refresh (the byte counters refresh every token)
HEX_BYTES = 256  # how much of each frame the hex view shows


class StopMatcher:
    """Cuts the answer at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to show, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def cloud_only_request(model: str, messages: list[dict] | str, options: Options) -> str:
    """The body of the request a cloud-only service would receive for this chat: the prompt in plain text."""
    prompt = {"prompt": messages} if isinstance(messages, str) else {"messages": messages}
    return json.dumps({"model": model, **prompt, "max_tokens": options.max_tokens,
                       "temperature": options.temperature}, indent=1, ensure_ascii=False)


def run_chat(device: Device, messages: list[dict] | str, options: Options,
             cancel: threading.Event | None = None, readback: ReadBack | None = None) -> Iterator[dict]:
    """Generate an answer to `messages` (or a continuation of a text prompt, as it is, without the chat
    template) through the split; yield the events described above."""
    cancel = cancel or threading.Event()
    client = device.client(options)
    ids = client.encode_prompt(messages, chat=not isinstance(messages, str))
    sampling = SamplingParams(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                              seed=options.seed)
    limit = min(client.model.max_positions, device.server.max_positions)  # the model's, the server's
    max_tokens = min(options.max_tokens, limit - len(ids))
    if max_tokens < 1:
        raise ValueError(f"the prompt takes {len(ids)} tokens; the model and the body server allow {limit} "
                         "positions, so no room is left for an answer")
    stats = GenerationStats()
    tokens = client.generate_ids(ids, max_new_tokens=max_tokens, sampling=sampling, stats=stats)
    try:
        # the first token opens the body session: a refusal (mismatch, full server) fails here, before
        # any event, so that the caller can still answer it as an error
        first = next(tokens)
        yield {"type": "start", "model": device.name, "split": [options.x, options.y],
               "wire": {"up": options.up, "down": options.down}, "prompt_tokens": len(ids),
               "max_tokens": max_tokens, "cloud_only": cloud_only_request(device.name, messages, options),
               "leakage": device.leakage(options.x, options.y)}
        answer = yield from _answer(client, itertools.chain([first], tokens), stats, options.stop, cancel)
        if readback is not None:
            yield attack_event(readback, options.x, stats.body, ids + answer, len(ids), client.tokenizer)
    finally:
        tokens.close()  # ends the body session


def _answer(client, tokens: Iterator[int], stats: GenerationStats, stops: tuple[str, ...],
            cancel: threading.Event) -> Iterator[dict]:
    """Text and wire events for each token, then the final figures and why it ended; returns the tokens."""
    text, stop = TextStream(client.tokenizer), StopMatcher(stops)
    finish, last_frames, answer = "length", 0.0, []
    for token in tokens:
        answer.append(token)
        if token in client.eos_ids:
            finish = "stop"
            break
        piece, hit = stop.push(text.push(token))
        if piece:
            yield {"type": "text", "text": piece}
        now = time.monotonic()
        frames = now - last_frames >= FRAME_EVERY_S
        last_frames = now if frames else last_frames
        yield wire_event(stats, frames)
        if hit:
            finish = "stop"
            break
        if cancel.is_set():
            finish = "cancelled"
            break
    else:
        if rest := stop.flush():
            yield {"type": "text", "text": rest}
    yield wire_event(stats, frames=True)
    yield {"type": "done", "finish_reason": finish, "prompt_tokens": stats.prompt_tokens,
           "completion_tokens": stats.new_tokens, "tokens_per_round_trip": round(stats.tokens_per_round_trip, 3)}
    return answer


def attack_event(readback: ReadBack, layer: int, body, ids: list[int], prompt_tokens: int, tokenizer) -> dict:
    """The read-back of this session's uplink, with the truth beside it (the device knows it: it is the device)."""
    try:
        found = readback.from_body(layer, body)
    except Exception as exc:  # the panel says so; the answer is already complete
        return {"type": "attack", "error": f"the read-back failed: {exc}"}
    if found is None:
        return {"type": "attack", "error": "this session kept no uplink states to read back"}
    # the positions whose tokens were fed and kept: the last token is never fed, and a last speculative
    # round's rejected drafts (still in the session, never rolled back) lie beyond it
    keep = [i for i, p in enumerate(found["positions"]) if p < len(ids) - 1]
    found.update({k: [found[k][i] for i in keep] for k in ("positions", "guesses", "pieces")})
    truth = [ids[p] for p in found["positions"]]
    return {"type": "attack", **found, "truth": truth, "prompt_tokens": prompt_tokens, "where": "device",
            "truth_pieces": [tokenizer.decode([t], skip_special_tokens=False) for t in truth]}


def wire_event(stats: GenerationStats, frames: bool) -> dict:
    """Live figures of a generation; with `frames`, the latest frames and the states they carried."""
    body = stats.body
    event = {"type": "wire", "tokens": stats.new_tokens, "tokens_per_s": round(stats.tokens_per_s, 2),
             "device_ms": round(stats.device_s * 1000, 1),
             "network_ms": round((stats.body_s - body.cloud_s) * 1000, 1),
             "cloud_ms": round(body.cloud_s * 1000, 1)}
    if isinstance(body, LocalBody):
        return event
    traffic = body.measured()
    event.update(steps=traffic.steps, frame_up=traffic.frame_up, frame_down=traffic.frame_down,
                 bytes_up=traffic.socket_up if traffic.counted_at_socket else traffic.frame_up,
                 bytes_down=traffic.socket_down if traffic.counted_at_socket else traffic.frame_down,
                 counted_at_socket=traffic.counted_at_socket)
    up, down = body.last_frames
    if frames and up:
        event["frames"] = {"up": _frame_view(up, body.up), "down": _frame_view(down, body.down)}
    return event


def _frame_view(data: bytes, codec) -> dict:
    """A frame as the network saw it (hex), and the last row of the state it carried, as decoded."""
    view = {"bytes": len(data), "hex": hexdump(data, HEX_BYTES)}
    try:
        state = decode_frame(data, codec=codec).tensor
    except FrameError:
        return view
    if state is not None and state.numel():
        row = state[-1].float()
        view.update(rows=int(state.shape[0]), dim=int(state.shape[-1]),
                    state=[round(v, 3) for v in row.tolist()])
    return view
