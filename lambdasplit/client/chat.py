"""A multi-turn conversation over a SplitClient: the history, the chat template over all of it, the last
reply's figures.

    conversation = Conversation(client, max_new_tokens=128)
    for piece in conversation.reply("What is a KV cache?"):
        print(piece, end="", flush=True)
    conversation.last_stats.tokens_per_s

Each reply runs the model's chat template over the whole history, so the prompt's states of every earlier
turn go up again (one prefill per turn); the body keeps no state between replies. A reply that is stopped
part-way (the caller closes the stream, or Ctrl-C reaches it) keeps what was generated so far as the
assistant's turn, so that the history matches what the user saw; a reply stopped before any text drops
the user's turn as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .generate import GenerationStats, SplitClient


@dataclass
class Turn:
    """The last reply: its text, its figures, and whether it was stopped before its end."""

    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    stopped: bool = False


class Conversation:
    """The messages so far, and replies that stream through the split with the whole history as the prompt."""

    def __init__(self, client: SplitClient, *, system: str | None = None, **options):
        self.client, self.system, self.options = client, system, options
        self.messages: list[dict] = []
        self.last: Turn | None = None

    @property
    def last_stats(self) -> GenerationStats | None:
        return self.last.stats if self.last else None

    def prompt(self, text: str) -> list[dict]:
        """The messages the template formats for a reply to `text`: the system prompt, the history, `text`."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.messages, {"role": "user", "content": text}]

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the turn joins the history when the stream ends, is closed or raises
        KeyboardInterrupt (then with what was generated so far). Another error leaves the history as it was."""
        if not text.strip():
            raise ValueError("the message is empty")
        turn = self.last = Turn()
        pieces: list[str] = []
        stream = self.client.stream(self.prompt(text), stats=turn.stats, **self.options)
        finished = False
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
            finished = True
        except (GeneratorExit, KeyboardInterrupt):
            turn.stopped = True
            raise
        finally:
            stream.close()  # ends the body's session now, not when the stream is collected
            turn.text = "".join(pieces)
            if finished or (turn.stopped and turn.text):
                self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": turn.text}]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()
        self.last = None

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)
