"""The docs cannot drift from the CLI: every `lambdasplit …` command line in README.md and docs/*.md parses
with the real parser (the command exists, its flags exist, their values are valid), and every relative
link points at a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lambdasplit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*/)?(lambdasplit|run)\s")  # env assignments, .venv/bin/, ./run
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


def command_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) for each `lambdasplit …` line in the page's shell blocks and inline code."""
    found, in_block, shell, pending = [], False, False, None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            in_block, shell = not in_block, fence.group(1) in ("bash", "sh", "shell", "console", "")
            continue
        if in_block:
            if not shell:
                continue
            text = line.strip().removeprefix("$ ")
            if pending is not None:
                pending = (pending[0], pending[1] + " " + text.rstrip("\\").strip())
                if not text.endswith("\\"):
                    found.append(pending)
                    pending = None
            elif PREFIX.match(text):
                if text.endswith("\\"):
                    pending = (number, text.rstrip("\\").strip())
                else:
                    found.append((number, text))
        else:
            for inline in re.findall(r"`([^`]+)`", line):
                if PREFIX.match(inline + " ") and len(inline.split()) > 1:
                    found.append((number, inline))
    return found


def argv_of(command: str) -> list[str] | None:
    """The arguments after `lambdasplit` (or `./run`), up to the first shell operator; None: not for the parser."""
    words = shlex.split(command, comments=True)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words.pop(0)
    program, args = words[0], words[1:]
    if program.endswith("run") and args[:1] == ["test"]:
        return None  # ./run test is pytest's command line
    for i, word in enumerate(args):
        if word in SHELL_STOP or word.startswith((">", "2>")):
            return args[:i]
    return args


CASES = [(page, number, command) for page in PAGES for number, command in command_lines(page)]


def test_the_pages_hold_commands():
    assert len(CASES) > 50, "the extractor found too few commands: is it still reading the pages?"
    assert {page.name for page, _, _ in CASES} >= {"README.md", "deploy.md", "privacy.md", "planning.md"}


@pytest.mark.parametrize("page,number,command", CASES,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in CASES])
def test_every_documented_command_parses(page, number, command, capsys):
    argv = argv_of(command)
    if argv is None:
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code != 0:
            pytest.fail(f"{page.relative_to(ROOT)}:{number}: `{command}` does not parse:\n{capsys.readouterr().err}")


def test_the_parser_check_fails_on_a_made_up_flag(capsys):
    """The check above can fail: a flag the CLI does not have is refused."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv_of("lambdasplit generate --server http://127.0.0.1:1 --no-such-flag hi"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv_of("lambdasplit bench tables"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert missing == []


def test_the_readme_stays_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[0:2] for line in first_block] == [["./run", "demo"], ["./run", "test"]]
    assert "not encryption" in text[:3000], "the first screen says what the split does not hide"
