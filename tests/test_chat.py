"""`lambdasplit chat` at a real terminal: a pseudo-terminal drives the command against the full-range body
server on loopback; the conversation logic (client/chat.py) is checked through the library as well."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from lambdasplit.client.chat import Conversation
from lambdasplit.client.generate import SplitClient

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "\n> "  # the chat's prompt, at the start of a line


class Terminal:
    """A command whose stdin, stdout and stderr are a pseudo-terminal, which is its controlling terminal (so
    that Ctrl-C, written as \\x03, reaches it as SIGINT the way a user's does)."""

    def __init__(self, *args: str):
        master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # no echo of what the test types: the output is only the command's
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

        # start_new_session: a session of its own, whose controlling terminal the pty then becomes (TIOCSCTTY, set
        # by a tiny launcher before it runs the command: no Python code runs between fork and exec here)
        launcher = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'lambdasplit', *sys.argv[1:]])")
        self.proc = subprocess.Popen([sys.executable, "-c", launcher, *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"})
        os.close(slave)
        self.master, self.text = master, ""

    def read_until(self, pattern: str, timeout: float = 180) -> str:
        """Everything written since the last match, up to and including the first `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.text)):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {pattern!r} in the terminal's output:\n{self.text}")
            self._read(min(left, 1.0))
        seen, self.text = self.text[:m.end()], self.text[m.end():]
        return seen

    def wait(self, timeout: float) -> int:
        """The command's exit status, reading what it writes meanwhile (a terminal that nobody reads can hold
        up a process that waits for its output to drain)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def _read(self, wait: float) -> None:
        if select.select([self.master], [], [], wait)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the command has exited and the terminal is closed
                chunk = b""
            self.text += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def line(self, text: str) -> str:
        """Type a line and return what came back before the next prompt."""
        self.type(text + "\n")
        return self.read_until(re.escape(PROMPT))[:-len(PROMPT)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        os.close(self.master)


@pytest.fixture
def chat(full_server):
    term = Terminal("chat", "--server", full_server.url, "--split", "1:29", "--wire", "fp32",
                    "--max-new-tokens", "24")
    try:
        banner = term.read_until(re.escape(PROMPT))
        assert "split 1:29 of 30" in banner and full_server.url in banner and "/help" in banner, banner
        yield term
    finally:
        term.close()


@pytest.mark.slow
def test_two_turns_stats_reset_split_and_eof(chat, smol_dir):
    """Two turns (the second one over the whole conversation), /stats, /split, /reset, /help, and Ctrl-D leaves
    with status 0. Greedy with the fp32 wire, each reply is the unsplit model's answer to the same messages."""
    local = SplitClient(smol_dir, server=None)
    history = []

    def turn(text: str) -> None:
        shown = chat.line(text).strip()
        history.append({"role": "user", "content": text})
        expected = local.generate(history, max_new_tokens=24).text.strip()
        assert shown == expected, (history, shown, expected)
        history.append({"role": "assistant", "content": shown})

    turn("My name is Ada. Reply with one short sentence.")
    turn("What is my name?")

    stats = chat.line("/stats")
    assert re.search(r"\d+ prompt tokens, \d+ generated, [\d.]+ tokens/s", stats), stats
    assert "traffic (counted at the socket" in stats and "up " in stats and "down " in stats, stats
    prompt_tokens = int(re.search(r"(\d+) prompt tokens", stats).group(1))
    assert prompt_tokens > 30  # the second turn's prompt held the first turn too

    assert "/split X:Y" in chat.line("/help")
    moved = chat.line("/split 3:27")
    assert "split 3:27 of 30" in moved and "goes on" in moved, moved
    turn("Say my name again.")  # the history survived the move

    assert "forgotten" in chat.line("/reset")
    chat.line("Hi")
    after = chat.line("/stats")
    assert int(re.search(r"(\d+) prompt tokens", after).group(1)) < prompt_tokens  # the history is gone

    assert "unknown command" in chat.line("/frobnicate")
    chat.type("\x04")  # Ctrl-D at an empty prompt
    assert chat.wait(30) == 0


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_and_the_prompt_comes_back(full_server):
    term = Terminal("chat", "--server", full_server.url, "--wire", "fp32", "--max-new-tokens", "2000",
                    "--ignore-eos")
    try:
        term.read_until(re.escape(PROMPT))
        term.type("Count from 1 to 1000, one number per line.\n")
        term.read_until(r"\S{2}")  # the reply streams
        started = time.monotonic()
        term.type("\x03")
        stopped = term.read_until(re.escape(PROMPT), timeout=30)
        assert time.monotonic() - started < 20
        m = re.search(r"\[stopped after (\d+) tokens; kept in the conversation\]", stopped)
        assert m and 0 < int(m.group(1)) < 2000, stopped
        assert term.proc.poll() is None  # the program goes on
        stats = term.line("/stats")
        assert "(stopped)" in stats, stats
        term.type("/quit\n")
        assert term.wait(30) == 0
    finally:
        term.close()


def test_ctrl_c_at_the_prompt_quits_cleanly(full_server):
    term = Terminal("chat", "--server", full_server.url, "--max-new-tokens", "4")
    try:
        term.read_until(re.escape(PROMPT))
        # readline writes the prompt, then waits for keys; a SIGINT between the two is seen only at the next
        # key (CPython's readline loop checks signals when its wait is interrupted), so type as a person would
        time.sleep(0.5)
        term.type("\x03")
        assert term.wait(30) == 0, term.text
        assert "Traceback" not in term.text
    finally:
        term.close()


def test_conversation_keeps_a_stopped_reply(full_server, smol_dir):
    """The library's conversation: a reply closed part-way joins the history with what was generated."""
    client = SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32")
    conversation = Conversation(client, system="You are terse.", max_new_tokens=40, stop_at_eos=False)
    stream = conversation.reply("Tell me about the sea.")
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert conversation.last.stopped and conversation.last.text == "".join(pieces)
    assert conversation.messages == [{"role": "user", "content": "Tell me about the sea."},
                                     {"role": "assistant", "content": "".join(pieces)}]
    assert conversation.prompt("And the sky?")[0] == {"role": "system", "content": "You are terse."}
    whole = "".join(conversation.reply("And the sky?"))
    assert conversation.turns == 2 and conversation.messages[-1]["content"] == whole
    assert conversation.last_stats.new_tokens == 40 and conversation.last_stats.traffic.steps > 0
    conversation.reset()
    assert conversation.messages == [] and conversation.last is None
