"""`lambdasplit chat`: a conversation at the terminal through the split, streamed; the history and the template
are the library's (client/chat.py), this module only reads lines and writes text."""

from __future__ import annotations

import sys

from .generate import add_device_options, format_stats, open_client, start_link
from .options import sampling_options, wire_pair

HELP = """commands:
  /reset      forget the conversation
  /stats      speed, time and traffic of the last reply
  /split X:Y  reload the head and tail for split X:Y (the conversation is kept)
  /help       this list
  /quit       leave (or Ctrl-D; Ctrl-C at the prompt too)
Ctrl-C during a reply stops it; the part already shown stays in the conversation."""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat at the terminal through a body server, turn after turn",
                       description="A conversation through the split: the head and tail here, the body on --server "
                                   "(the whole model here without one). Each reply streams as it is generated, "
                                   "with the model's chat template over the whole conversation. Commands: /reset, "
                                   "/stats, /split X:Y, /help, /quit.")
    add_device_options(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system prompt for the whole conversation")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..models.llm import parse_split

    split = parse_split(args.split) if args.split else None
    wire_pair(args)  # a malformed --wire fails before anything starts or loads
    link = start_link(args)
    try:
        Chat(args, split, link).loop()
    finally:
        if link is not None:
            link.stop()


class Chat:
    """The terminal's side of a conversation: prompt, slash commands, streamed replies."""

    def __init__(self, args, split: tuple[int, int] | None, link=None):
        from ..client.chat import Conversation

        self.args, self.link = args, link
        self.conversation = Conversation(open_client(args, split, link), system=args.system,
                                         **sampling_options(args))
        self.commands = {"/reset": self.reset, "/stats": self.stats, "/split": self.resplit, "/help": self.help}

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def banner(self) -> None:
        from ..models.source import model_name

        client = self.conversation.client
        where = f"the body at {self.args.server}" if client.servers else "the whole model here (no --server)"
        self.say(f"chat with {model_name(client.folder)} through split {client.split.x}:{client.split.y} of "
                 f"{client.split.n} layers, {where}; wire {client.wire.up},{client.wire.down}. "
                 "/help lists the commands; Ctrl-D or /quit leaves.")

    def loop(self) -> None:
        _line_editing()
        self.banner()
        while (line := _read("> ")) is not None:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                name, _, rest = line.partition(" ")
                if name in ("/quit", "/exit"):
                    return
                command = self.commands.get(name)
                if command is None:
                    self.say(f"unknown command {name}; /help lists them")
                else:
                    command(rest.strip())
                continue
            self.reply(line)

    def reply(self, text: str) -> None:
        stream = self.conversation.reply(text)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            self.say()
        except KeyboardInterrupt:
            stream.close()
            turn = self.conversation.last
            kept = "kept in the conversation" if turn.text else "nothing to keep"
            self.say(f"\n[stopped after {turn.stats.new_tokens} tokens; {kept}]")
        except (ValueError, RuntimeError, OSError) as exc:
            self.say()
            print(f"error: {exc}" + ("; /reset starts a shorter conversation" if "context" in str(exc) else ""),
                  file=sys.stderr, flush=True)

    def reset(self, _rest: str) -> None:
        self.conversation.reset()
        self.say("[the conversation is forgotten]")

    def stats(self, _rest: str) -> None:
        turn = self.conversation.last
        if turn is None:
            self.say("[no reply yet]")
            return
        self.say(format_stats(turn.stats) + (" (stopped)" if turn.stopped else ""))

    def resplit(self, rest: str) -> None:
        from ..models.llm import parse_split

        try:
            split = parse_split(rest)
            client = open_client(self.args, split, self.link)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        self.conversation.client = client
        self.say(f"[split {client.split.x}:{client.split.y} of {client.split.n}: the head has "
                 f"{client.split.x} layers, the body {client.split.y - client.split.x}, the tail "
                 f"{client.split.n - client.split.y}; the conversation goes on]")

    def help(self, _rest: str) -> None:
        self.say(HELP)


def _read(prompt: str) -> str | None:
    """A line from the user; None at EOF (Ctrl-D) or Ctrl-C at the prompt."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print(flush=True)
        return None


def _line_editing() -> None:
    """Line editing and history for input() at a terminal, where the platform has readline."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:
            pass
