"""The command line, run as real subprocesses: help, generate against a server, serve's refusals,
the end-to-end demo, the decode bench, and clear errors for bad arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lambdasplit.client.generate import SplitClient
from lambdasplit.data import PAPER_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lambdasplit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def failed_clearly(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in r.stderr, f"{word!r} not in stderr:\n{r.stderr}"


# ---- help -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["serve"], ["generate"], ["chat"], ["demo"], ["bench"], ["bench", "decode"],
                                  ["bench", "codecs"], ["bench", "table1"], ["bench", "concurrency"], ["bench", "noise"], ["bench", "plan"], ["bench", "speculative"], ["bench", "web"], ["bench", "adapters"], ["bench", "fig5"], ["bench", "scale"],
                                  ["bench", "paper-scale"], ["bench", "gpu"],
                                  ["fit-basis"], ["token"], ["token", "new"], ["token", "hash"], ["assess"],
                                  ["eavesdrop"], ["profile"], ["plan"], ["web"], ["tune"], ["imagine"]],
                         ids=lambda a: " ".join(a) or "top")
def test_help(args):
    r = cli(*args, "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lambdasplit"), r.stdout
    if args == ["serve"]:
        assert "--split" in r.stdout and "--insecure" in r.stdout and "--max-frame-mb" in r.stdout
        assert "--ray" in r.stdout and "--peers" in r.stdout and "TESTING ONLY" in r.stdout
    if args == ["generate"]:
        for option in ("--server", "--wire", "--transport", "--no-cache", "--stats", "--temperature", "--verify",
                       "--hops"):
            assert option in r.stdout
        assert "had" in r.stdout and "pca:R" in r.stdout and "--basis" in r.stdout  # the codec grammar
        assert "noise:S" in r.stdout
    if args == ["assess"]:
        assert "--layers" in r.stdout and "--threshold" in r.stdout and "lower bound" in r.stdout
    if args == ["bench", "codecs"]:
        assert "--codecs" in r.stdout and "--pairs" in r.stdout and "--no-free-run" in r.stdout
    if args == ["web"]:
        for option in ("--server", "--split", "--wire", "--api-key-file", "--assessment", "loopback"):
            assert option in r.stdout
    if args == ["tune"]:
        for option in ("--server", "--data", "--out", "--rank", "--epochs", "PEFT"):
            assert option in r.stdout
    if args == ["imagine"]:
        for option in ("--server", "--codec", "--steps", "--seed", "--guidance", "--scheduler", "--every",
                       "--noise-step", "RGBA", "digits"):
            assert option in r.stdout
    if args == ["bench", "fig5"]:
        assert "--codecs" in r.stdout and "PSNR" in r.stdout and "--seeds" in r.stdout
    if args == ["demo"]:
        assert "--image" in r.stdout
    if args == ["chat"]:
        for option in ("--server", "--split", "--wire", "--system", "/reset", "/stats", "/split"):
            assert option in r.stdout
    if args == []:
        assert "--version" in r.stdout and "chat" in r.stdout
    if args == ["fit-basis"]:
        assert "--rank" in r.stdout and "--points" in r.stdout and "sha256" in r.stdout


def test_version_without_torch():
    """--version names lambdasplit's, torch's and transformers' versions from their metadata, importing no torch."""
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-c", "import sys\nfrom lambdasplit.cli import main\ntry:\n    main(['--version'])"
                        "\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    line, status = r.stdout.splitlines()
    assert line.startswith(f"lambdasplit {version('lambdasplit')} (torch {version('torch')}, transformers "), line
    assert status == "0 False", r.stdout


@pytest.mark.parametrize("given, expected", [(None, "20000"), ("300000", "300000")])
def test_openmp_spin(given, expected):
    """The command line sets GNU OpenMP's spin count before torch loads (its servers inherit it), unless the
    environment names one (cli/__init__.py: a device and a server on one machine take turns)."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": given} if given else {})
    r = subprocess.run([sys.executable, "-c", "import os, sys\nfrom lambdasplit.cli import main\ntry:\n"
                        "    main(['--version'])\nexcept SystemExit:\n    print(os.environ['GOMP_SPINCOUNT'])"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.stdout.splitlines()[-1] == expected, r.stdout + r.stderr


@pytest.mark.parametrize("command, flag, value", [
    (["bench", "table1"], "-o", "x"), (["bench", "codecs"], "--output", "x"), (["assess"], "--out", "x"),
    (["imagine", "--server", "http://h:1", "a 7"], "-o", "x.png"),
    (["imagine", "--server", "http://h:1", "a 7"], "--out", "x.png"), (["profile"], "--output", "p.json"),
    (["tune", "--server", "http://h:1", "--data", "d.txt"], "-o", "a"),
    (["tune", "--server", "http://h:1", "--data", "d.txt"], "--out", "a"),
    (["fit-basis"], "--output", "b.safetensors"), (["fit-basis"], "--out", "b.safetensors"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_one_output_flag(command, flag, value):
    """-o/--output PATH is each command's main artefact; the older --out still works (hidden from --help)."""
    from lambdasplit.cli import build_parser

    assert build_parser().parse_args([*command, flag, value]).out == value


def test_a_required_output_is_refused_without_it(tmp_path):
    r = cli("tune", "--server", "http://127.0.0.1:9", "--data", str(tmp_path / "d.txt"), timeout=60)
    failed_clearly(r, "lambdasplit tune: error: the following arguments are required: -o/--output")
    assert r.returncode == 2
    r = cli("fit-basis", "--help", timeout=60)
    assert "-o FILE, --output FILE" in r.stdout and "--out " not in r.stdout


def test_no_command_is_a_usage_error():
    r = cli(timeout=60)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("lambdasplit")
    assert script.is_file()
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "serve" in r.stdout and "generate" in r.stdout


# ---- generate -------------------------------------------------------------------------------

def test_generate_against_a_server(smol_dir, full_server):
    r = cli("generate", "--server", full_server.url, "--max-new-tokens", "12", "--wire", "fp32", "--stats", "Hi")
    assert r.returncode == 0, r.stderr
    expected = SplitClient(smol_dir, server=None).generate("Hi", max_new_tokens=12).text
    assert expected.strip()
    assert r.stdout == expected + "\n"  # the answer, and only the answer, on stdout
    assert "tokens/s" in r.stderr and "traffic" in r.stderr  # the stats on stderr
    m = re.search(r"(\d+) prompt tokens, (\d+) generated", r.stderr)
    assert m and 0 < int(m.group(2)) <= 12
    assert "tokens/s" not in r.stdout


@pytest.mark.slow
def test_generate_reads_the_prompt_from_stdin(full_server):
    r = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", "--server", full_server.url, "--wire", "fp32",
                        "--max-new-tokens", "8", "-"], input="Hi\n", capture_output=True, text=True, timeout=240,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == cli("generate", "--server", full_server.url, "--wire", "fp32", "--max-new-tokens", "8",
                           "Hi").stdout
    r = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", "--server", full_server.url, "-"], input="",
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    failed_clearly(r, "lambdasplit generate: error:", "stdin", "empty")


def test_generate_http_fp16_without_cache(smol_dir, full_server):
    r = cli("generate", "--server", full_server.url, "--split", "2:-2", "--transport", "http", "--wire", "fp16",
            "--no-cache", "--max-new-tokens", "6", "--ignore-eos", "--stats", "--no-chat", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "6 generated" in r.stderr and "traffic" in r.stderr


def test_generate_locally_without_a_server():
    r = cli("generate", "--max-new-tokens", "4", "--ignore-eos", "--stats", "Hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "4 generated" in r.stderr
    assert "traffic" not in r.stderr  # nothing crossed a network


def test_generate_unreachable_server():
    r = cli("generate", "--server", "http://127.0.0.1:9", "--max-new-tokens", "2", "Hi", timeout=120)
    failed_clearly(r, "cannot reach", "127.0.0.1:9")


@pytest.mark.slow
def test_generate_unknown_codec(full_server):
    r = cli("generate", "--server", full_server.url, "--wire", "int5", "--max-new-tokens", "2", "Hi")
    failed_clearly(r, "int5", "8, 6, 4, 3, 2")
    r = cli("generate", "--server", full_server.url, "--wire", "pca:64", "--max-new-tokens", "2", "Hi")
    failed_clearly(r, "pca:64", "--basis")


@pytest.mark.parametrize("split, words", [("5", ["X:Y"]), ("40:50", ["40", "N = 30"])])
def test_generate_bad_split(full_server, split, words):
    r = cli("generate", "--server", full_server.url, "--split", split, "--max-new-tokens", "2", "Hi")
    failed_clearly(r, *words)


def test_bad_wire_argument(full_server):
    r = cli("generate", "--server", full_server.url, "--wire", "fp16,fp16,fp16", "Hi", timeout=120)
    failed_clearly(r, "--wire")


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], ["refusing", "0.0.0.0", "loopback"]),
    (["--server", "http://127.0.0.1:9"], ["cannot reach", "127.0.0.1:9"]),
    (["--split", "40:50"], ["40", "N = 30"]),
    (["--assessment", "/nonexistent/assessment.json"], ["no assessment", "lambdasplit assess"]),
], ids=["public-host", "unreachable", "bad-split", "no-assessment"])
def test_web_refuses_clearly(full_server, args, words):
    server = [] if "--server" in args else ["--server", full_server.url]
    r = cli("web", *server, "--port", "0", *args, timeout=120)
    failed_clearly(r, *words)
    assert "listening on" not in r.stdout


# ---- serve ----------------------------------------------------------------------------------

def test_serve_refuses_plain_http_off_loopback():
    r = cli("serve", "--host", "0.0.0.0", "--port", "0", timeout=120)
    failed_clearly(r, "refusing", "0.0.0.0", "--insecure")
    assert "listening on" not in r.stdout


@pytest.mark.parametrize("split, words", [("1:99", ["99", "N = 30"]), ("x", ["X:Y"])])
def test_serve_bad_split(split, words):
    r = cli("serve", "--split", split, "--port", "0", timeout=120)
    failed_clearly(r, *words)


# ---- demo and bench -------------------------------------------------------------------------

def ascii_column(section: str) -> str:
    """The printable-text column of a hexdump, rows joined back together."""
    return "".join(m.group(1) for m in re.finditer(r"^\s+[0-9a-f]{4}  .{47}  \|(.*)\|$", section, re.M))


@pytest.mark.slow
def test_demo_end_to_end():
    r = cli("demo", "--max-new-tokens", "12", timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "tokens/s" in out and "traffic" in out
    assert f"> {PAPER_PROMPT}" in out
    assert "no embeddings, final norm or LM head" in out  # what the server holds, from what it read
    head, sep, cloud = out.partition("what a cloud-only request would have carried")
    assert sep, out
    wire = head.split("what the network carried", 1)[1]
    assert ascii_column(wire).startswith("LSPL")  # the frame's magic, first thing on the wire
    assert PAPER_PROMPT[:10] not in ascii_column(wire)  # the prompt itself never crossed
    assert PAPER_PROMPT in ascii_column(cloud), (
        "the cloud-only hexdump should show the prompt in plain text:\n" + cloud)
    m = re.search(r"(\d+) prompt tokens, (\d+) generated", out)
    assert m and int(m.group(2)) <= 12


@pytest.mark.slow
def test_demo_bad_split():
    r = cli("demo", "--split", "7", "--max-new-tokens", "2", timeout=120)
    failed_clearly(r, "X:Y")
    r = cli("demo", "--split", "29:3", "--max-new-tokens", "2", timeout=120)
    failed_clearly(r, "29", "N = 30")


@pytest.mark.slow
def test_bench_decode_rows(tmp_path):
    """One run measures every asked-for format unsplit and split; a split row with the fp32 wire gives its
    local row's tokens exactly; fp32 agrees with itself; the quantized formats read fewer bytes per token."""
    out = tmp_path / "bench.json"
    r = cli("bench", "decode", "--tokens", "8", "--repeats", "1", "--agree-tokens", "8", "--formats", "fp32,int8",
            "--compiled", "int8", "--split", "14:16", "--no-reference", "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert set(rows) == {"local fp32", "split fp32", "local int8", "split int8", "local int8 compiled",
                         "split int8 compiled"}
    assert rows["split int8 compiled"]["same_tokens_as_local"]  # compiled on both sides: the split stays exact
    assert rows["local int8 compiled"]["agreement"] == rows["local int8"]["agreement"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["agreement"] is not None
    assert rows["local fp32"]["agreement"] == 1.0 and rows["split fp32"]["vs_fp32_split"] == 1.0
    assert rows["split fp32"]["same_tokens_as_local"] and rows["split int8"]["same_tokens_as_local"]
    assert rows["local int8"]["weight_mb_per_token"] < 0.3 * rows["local fp32"]["weight_mb_per_token"]
    assert rows["split int8"]["up_bytes"] > 0 and rows["split int8"]["down_bytes"] > 0
    assert data["summary"]["fastest_split_within_bound"] in ("fp32", "int8", "int8 compiled")
    assert "fastest split within 99% agreement" in r.stdout
