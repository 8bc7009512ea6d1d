"""Shared fixtures: the embedded model, one full-range body server, and the unsplit reference model.

Servers are real `lambdasplit serve` subprocesses on free loopback ports; tests talk to them over
real sockets. They are session-scoped so that the whole suite starts only a handful of them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The suite runs on two pytest-xdist workers, and each starts server processes: one torch (OpenMP) thread per
# process keeps them from fighting over this machine's cores (idle OpenMP teams spin-wait on the same cores).
# Set before torch is imported; server subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Most tests compare with fp32 references (transformers' unsplit model, answers written down in fp32), so every
# process of the suite defaults to fp32 weights; the CPU's own default (int4) is tested where it is named
# (tests/test_formats.py, tests/test_rescored_head.py) and by `./run demo`.
os.environ["LAMBDASPLIT_WEIGHTS"] = "fp32"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # for `import helpers`


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The cached safetensors folder of the embedded SmolLM2-135M-Instruct (30 layers, D = 576)."""
    from lambdasplit.models.source import resolve_model

    folder = resolve_model(None)
    assert (folder / "config.json").is_file()
    return folder


@pytest.fixture(scope="session")
def full_server(smol_dir):
    """A body server holding every layer [0, 30): sessions may ask for any sub-range."""
    from lambdasplit.server.process import ServerProcess

    with ServerProcess(str(smol_dir), "0:30") as server:
        yield server
        assert server.proc.poll() is None, "the full-range server died during the tests:\n" + "\n".join(server.log)


@pytest.fixture(scope="session")
def hf_model(smol_dir):
    """The unsplit transformers model, the reference every split is compared with."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


# the leakage figures the web tests give the page (a made-up assessment: the page must show exactly these)
WEB_LEAKAGE = {1: 0.911, 2: 0.733, 28: 0.052, 29: 0.468}
WEB_API_KEY = "test-key-0d9f3c"  # the OpenAI-compatible API of the web fixture needs it


@pytest.fixture(scope="session")
def web(full_server, tmp_path_factory):
    """`lambdasplit web` on a free loopback port, reaching the full-range server through a recording link
    proxy (`web.link.recordings`: every byte the device and the body server exchanged). Split 1:29, fp32
    wire, so that greedy answers are exactly the unsplit model's; its /v1 API needs `web.api_key`."""
    from lambdasplit.net.link import link_to
    from lambdasplit.privacy.results import Assessment, AttackScore
    from lambdasplit.web.process import WebProcess

    scores = [AttackScore(layer, "nearest-embedding", "input", top1, min(1.0, top1 + 0.05), 0.0, 1000, 10)
              for layer, top1 in WEB_LEAKAGE.items()]
    path = Assessment("SmolLM2-135M-Instruct", 30, 576, scores, meta={"date": "test"}).save(
        tmp_path_factory.mktemp("assessment") / "assessment.json")
    link = link_to(full_server.url, "0ms", record=True)
    try:
        with WebProcess(link.url, "--split", "1:29", "--wire", "fp32", "--assessment", str(path),
                        env={"LAMBDASPLIT_API_KEY": WEB_API_KEY}) as app:
            app.link, app.api_key = link, WEB_API_KEY
            yield app
            assert app.proc.poll() is None, "the web app died during the tests:\n" + "\n".join(app.log)
    finally:
        link.stop()


@pytest.fixture(scope="session")
def image_web(full_server, tmp_path_factory):
    """`lambdasplit web` with an image server as well (the Image tab): the embedded digits model when it has been
    made, else a tiny random pipeline (noise-like 32 x 32 pictures, every path exercised). `image_web.folder`
    is the pipeline, `image_web.image_server` its body server."""
    from tiny_pipelines import build_sd

    from lambdasplit.models.source import embedded_image_model
    from lambdasplit.server.process import ServerProcess
    from lambdasplit.web.process import WebProcess

    folder = embedded_image_model()
    if not (folder / "model_index.json").is_file():
        folder = build_sd(tmp_path_factory.mktemp("pipelines") / "tiny-sd")
    with ServerProcess(str(folder), "0:0") as server, \
            WebProcess(full_server.url, "--image-server", server.url, "--image-model", str(folder)) as app:
        app.folder, app.image_server = folder, server
        yield app
        assert app.proc.poll() is None, "the web app died during the tests:\n" + "\n".join(app.log)


@pytest.fixture(scope="session")
def browser_export(smol_dir, tmp_path_factory):
    """`export-web`'s folder for split 1:29 of the embedded model (fp32 parts only), with the page and its
    runtimes: what the browser device's tests load."""
    from lambdasplit.browser.export import export_web
    from lambdasplit.browser.page import write_page

    out = tmp_path_factory.mktemp("browser-export")
    export_web(smol_dir, 1, 29, out, int8=False, log=lambda _: None)
    write_page(out)
    return out
