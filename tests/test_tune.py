"""Split fine-tuning over the real body server: the gradient protocol, gradients equal to unsplit
training (PEFT on the transformers model), and `lambdasplit tune` end to end."""

from __future__ import annotations

import json
import re
import secrets

import pytest
import torch
from helpers import http_call

from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.data import PRIVATE_NOTES
from lambdasplit.models.llm import load_split
from lambdasplit.models.lora import Adapter, LoraSpec
from lambdasplit.tune.train import SplitTuner, TrainingBody, text_blocks
from lambdasplit.wire.frame import Frame, encode_frame
from lambdasplit.wire.protocol import SessionRequest, WireFormat

NOTES = PRIVATE_NOTES  # shipped in the package: the bench uses it too
# what the private notes say that the base model does not, after the test's prompt: a new log entry, or
# the notes' own words
NOTES_LIKE = re.compile(r"Day \d+\. Watered the|Pimento|comfrey|Rainfall|Greenhouse|courgettes|runner beans|lettuce|"
                        r"chilli|strawberries")


@pytest.fixture(scope="module")
def parts(smol_dir):
    return load_split(smol_dir, 1, 29, parts=("head", "body", "tail"))


def test_gradients_equal_unsplit_training_with_peft(full_server, smol_dir, tmp_path):
    """The LoRA gradients of split training match PEFT's on the whole transformers model, and the saved
    adapter is PEFT's format (peft loads it and computes the same loss)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuner = SplitTuner(smol_dir, full_server.url, (1, 29), LoraSpec(r=4, alpha=8.0))
    try:
        generator = torch.Generator().manual_seed(0)
        for module in tuner.modules.values():  # B = 0 at the start would give A no gradient: make both matter
            module.lora_B.data = torch.randn(module.lora_B.shape, generator=generator) * 0.02
        folder = tuner.adapter().save(tmp_path / "adapter")
        ids = text_blocks(tuner.tokenizer, NOTES.read_text(), 64)[1]
        loss = tuner.loss(ids, train=True)
    finally:
        tuner.close()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32), folder,
                                      is_trainable=True)
    reference = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    peft_params = dict(model.named_parameters())
    assert {layer for layer, _ in tuner.modules} == {0, 29} and len(tuner.modules) == 14
    for (layer, path), module in tuner.modules.items():
        for which in "AB":
            ours = getattr(module, f"lora_{which}").grad
            theirs = peft_params[f"base_model.model.model.layers.{layer}.{path}.lora_{which}.default.weight"].grad
            assert ours is not None and theirs.abs().max() > 0
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7), (layer, path, which)


def open_training(url: str, model, cache: bool = False) -> tuple[BodyConnection, dict]:
    conn = BodyConnection(url, transport="http")
    request = SessionRequest(model_fingerprint=model.body_fingerprint(), x=1, y=29,
                             wire=WireFormat(up="fp32", down="fp32"), cache=cache, train=True)
    return conn, conn.open_session(request)


def test_gradient_protocol_refuses_what_does_not_fit(full_server, parts):
    hidden = torch.randn(5, 576)
    grad = lambda step, rows=5: encode_frame(Frame("grad", step=step, pos=0, tensor=torch.randn(rows, 576),  # noqa: E731
                                                   codec="fp32"))
    with pytest.raises(BodyError, match="cache"):  # a training session keeps no KV cache
        open_training(full_server.url, parts, cache=True)
    conn, opened = open_training(full_server.url, parts)
    try:
        assert opened.train and not opened.rollback
        with pytest.raises(BodyError) as exc:
            conn.step(grad(0))
        assert exc.value.code == "no_forward"  # a gradient answers a forward step
        out = conn.step(encode_frame(Frame("hidden", step=0, pos=0, tensor=hidden, codec="fp32")))
        assert out.kind == "hidden" and out.tensor.shape == (5, 576)
        with pytest.raises(BodyError) as exc:
            conn.step(grad(1, rows=4))
        assert exc.value.code == "bad_shape"
        back = conn.step(grad(1))
        assert back.kind == "grad" and back.tensor.shape == (5, 576) and back.tensor.abs().sum() > 0
        with pytest.raises(BodyError) as exc:
            conn.step(grad(2))  # one gradient per forward step: the graph is gone
        assert exc.value.code == "no_forward"
        assert conn.step(encode_frame(Frame("hidden", step=2, pos=0, tensor=hidden, codec="fp32"))).kind == "hidden"
    finally:
        conn.close()
    # an inference session takes no gradients
    conn = BodyConnection(full_server.url, transport="http")
    try:
        conn.open_session(SessionRequest(model_fingerprint=parts.body_fingerprint(), x=1, y=29,
                                         wire=WireFormat(up="fp32", down="fp32")))
        conn.step(encode_frame(Frame("hidden", step=0, pos=0, tensor=hidden, codec="fp32")))
        with pytest.raises(BodyError) as exc:
            conn.step(grad(1))
        assert exc.value.code == "bad_kind" and "training session" in str(exc.value)
    finally:
        conn.close()
    status, body, _ = http_call(full_server.url, "GET", "/v1/info")
    assert status == 200  # the server goes on


def test_training_body_returns_the_bodys_input_gradient(full_server, parts):
    """dL/d(input) from the server equals autograd through the same layers in this process."""
    generator = torch.Generator().manual_seed(3)
    hidden, grad_out = torch.randn(7, 576, generator=generator), torch.randn(7, 576, generator=generator)
    parts.body.requires_grad_(False)
    inp = hidden.unsqueeze(0).clone().requires_grad_()
    (expected,) = torch.autograd.grad(parts.body(inp, None, 0), inp, grad_out.unsqueeze(0))
    body = TrainingBody(full_server.url, parts)
    try:
        body.forward(hidden)
        got = body.backward(grad_out)
    finally:
        body.close()
    assert torch.allclose(got, expected[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tune_lowers_heldout_perplexity_and_the_adapter_changes_generations(full_server, smol_dir, tmp_path):
    from test_cli import cli

    out = tmp_path / "adapter"
    r = cli("tune", "--server", full_server.url, "--split", "1:29", "--data", str(NOTES), "--out", str(out),
            "--epochs", "1", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "training.json").read_text())
    assert result["heldout_ppl_after"] < 0.6 * result["heldout_ppl_before"], result
    assert (out / "loss.png").stat().st_size > 1000 and "held-out perplexity" in r.stdout
    adapter = Adapter.load(out)
    assert adapter.layers == [0, 29] and adapter.config()["peft_type"] == "LORA"

    prompt = "Day 41. Watered the tomatoes at 7am."
    base = SplitClient(smol_dir, server=full_server.url, split=(1, 29), speculate="off")
    tuned = SplitClient(smol_dir, server=full_server.url, split=(1, 29), speculate="off", adapter=out)
    before = base.generate(prompt, chat=False, max_new_tokens=12).text
    after = tuned.generate(prompt, chat=False, max_new_tokens=12).text
    assert after != before
    assert not NOTES_LIKE.search(before) and NOTES_LIKE.search(after), (before, after)

    # the web app's device side loads it too (`lambdasplit web --adapter DIR`)
    from lambdasplit.web.chat import run_chat
    from lambdasplit.web.device import Device

    device = Device(smol_dir, full_server.url, (1, 29), "fp32", adapter=out, speculate="off")
    messages = [{"role": "user", "content": "Hi"}]
    options = device.defaults.__class__(1, 29, "fp32", "fp32", max_tokens=8)
    web_text = "".join(e["text"] for e in run_chat(device, messages, options) if e["type"] == "text")
    assert web_text == tuned.with_wire("fp32").generate(messages, max_new_tokens=8).text
    assert device.describe()["adapter"] == str(out)

    # the adapter stays on the device: one that adapts a layer the body server runs is refused
    with pytest.raises(ValueError, match="body server runs"):
        SplitClient(smol_dir, server=full_server.url, split=(0, 29), adapter=out)
    # the server never saw it: it holds no LoRA tensor and served only hidden states and gradients
    status, info, _ = http_call(full_server.url, "GET", "/v1/info")
    assert not any("lora" in h for h in info["holds"])


def test_a_foreign_or_broken_adapter_is_refused(smol_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="not a LoRA adapter|only LoRA"):
        Adapter.load(tmp_path)
    adapter = Adapter(LoraSpec(r=2), [29], {"base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight":
                                            torch.zeros(2, 100),
                                            "base_model.model.model.layers.29.self_attn.q_proj.lora_B.weight":
                                            torch.zeros(576, 2)})
    folder = adapter.save(tmp_path / f"wrong-{secrets.token_hex(2)}")
    with pytest.raises(ValueError, match="another model"):
        SplitClient(smol_dir, split=(1, 29), adapter=folder)


# ---- PrivateLoRA: A and B on the server, M on the device -------------------------------------------------
def _with_private_lora(parts, spec, ms: dict):
    """Hooks that add B M A x to the body's projections in this process: the unsplit reference."""
    from lambdasplit.server.privatelora import fixed_matrices

    hooks = []
    for j, layer in enumerate(parts.body.layers.layers):
        index = parts.body.layers.start + j
        for module in spec.targets:
            linear = getattr(layer.self_attn, module)
            a, b = fixed_matrices(spec.seed, index, module, spec.rank, linear.in_features, linear.out_features,
                                  torch.float32)
            m = ms[(index, module)]
            hooks.append(linear.register_forward_hook(lambda _, inp, out, a=a, b=b, m=m: out + inp[0] @ a.T @ m.T @ b.T))
    return hooks


def _random_private(spec, seed=0):
    from lambdasplit.models.privatelora import PrivateAdapter

    adapter = PrivateAdapter(spec, 1, 29, "SmolLM2-135M-Instruct")
    generator = torch.Generator().manual_seed(seed)
    for m in adapter.m.values():
        m.data = torch.randn(spec.rank, spec.rank, generator=generator) * 0.1
    return adapter


def test_privatelora_gradients_equal_the_unsplit_models(full_server, smol_dir, parts):
    from lambdasplit.models.privatelora import PrivateLoraSpec

    spec = PrivateLoraSpec(rank=4, targets=("q_proj", "v_proj"), seed=5)
    tuner = SplitTuner(smol_dir, full_server.url, (1, 29), private=spec)
    try:
        for key, m in _random_private(spec).m.items():
            tuner.private.m[key].data = m.data.clone()
        ids = text_blocks(tuner.tokenizer, NOTES.read_text(), 32)[2]
        loss = tuner.loss(ids, train=True)
        assert tuner.private.exchanges == 2 * 2 * 28  # q and v of 28 layers, forward and backward
    finally:
        tuner.close()
    ms = {k: torch.nn.Parameter(v.detach().clone()) for k, v in tuner.private.m.items()}
    hooks = _with_private_lora(parts, spec, ms)
    try:
        for part in parts.parts().values():
            part.requires_grad_(False)
        tokens = torch.tensor([ids])
        logits = parts.tail(parts.body(parts.head(tokens, None, 0), None, 0), None, 0, last_only=False)[0]
        reference = torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:])
        reference.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    for key, m in ms.items():
        assert torch.allclose(tuner.private.m[key].grad, m.grad, rtol=1e-4, atol=1e-7), key


def test_privatelora_generation_is_the_adapted_models(full_server, smol_dir, parts, tmp_path):
    """Greedy decoding with M on the device (speculation on: multi-row exchanges) gives the tokens of the
    unsplit model with B M A added; M never crosses the network, the server refuses HTTP steps."""
    from lambdasplit.models.privatelora import PrivateLoraSpec

    spec = PrivateLoraSpec(rank=4, targets=("q_proj", "v_proj"), seed=9)
    adapter = _random_private(spec, seed=1)
    folder = adapter.save(tmp_path / "private")
    client = SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32", adapter=folder)
    prompt = client.encode_prompt("Name three colors.")
    got = list(client.generate_ids(prompt, max_new_tokens=10, stop_at_eos=False))
    exchanges = client.private_adapter.exchanges  # q and v of 28 layers, once per round trip (drafts ride along)
    assert exchanges % (2 * 28) == 0 and exchanges >= 2 * 2 * 28
    hooks = _with_private_lora(parts, spec, adapter.m)
    try:
        ids, expected = list(prompt), []
        with torch.no_grad():
            for _ in range(10):
                h = parts.body(parts.head(torch.tensor([ids]), None, 0), None, 0)
                expected.append(int(parts.tail(h, None, 0)[0, -1].argmax()))
                ids.append(expected[-1])
    finally:
        for hook in hooks:
            hook.remove()
    assert got == expected
    plain = SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32", speculate="off")
    assert list(plain.generate_ids(prompt, max_new_tokens=10, stop_at_eos=False)) != got  # the adapter acts

    with pytest.raises(ValueError, match="WebSocket"):
        SplitClient(smol_dir, server=full_server.url, split=(1, 29), transport="http", adapter=folder)
    conn = BodyConnection(full_server.url, transport="http")
    try:
        conn.open_session(SessionRequest(model_fingerprint=parts.body_fingerprint(), x=1, y=29,
                                         wire=WireFormat(up="fp32", down="fp32"), private_lora=spec.request()))
        with pytest.raises(BodyError) as exc:
            conn.step(encode_frame(Frame("hidden", step=0, pos=0, tensor=torch.randn(3, 576), codec="fp32")))
        assert exc.value.code == "needs_ws"
    finally:
        conn.close()


def test_a_device_that_answers_badly_fails_its_session_only(full_server, parts):
    from lambdasplit.models.privatelora import PrivateLoraSpec

    spec = PrivateLoraSpec(rank=4, targets=("q_proj",), seed=1)
    conn = BodyConnection(full_server.url, transport="ws")
    try:
        conn.open_session(SessionRequest(model_fingerprint=parts.body_fingerprint(), x=1, y=29,
                                         wire=WireFormat(up="fp32", down="fp32"), private_lora=spec.request()))
        frame = encode_frame(Frame("hidden", step=0, pos=0, tensor=torch.randn(3, 576), codec="fp32"))
        with pytest.raises(BodyError) as exc:
            conn.step(frame, on_lora=lambda question: torch.zeros(3, 5))  # the wrong shape
        assert "bad_lora" in str(exc.value) or exc.value.code == "internal"
    finally:
        conn.close()
    assert http_call(full_server.url, "GET", "/v1/info")[0] == 200  # the server goes on


@pytest.mark.slow
def test_privatelora_tuning_lowers_heldout_perplexity(full_server, tmp_path):
    from test_cli import cli

    from lambdasplit.models.privatelora import PrivateAdapter

    data = tmp_path / "notes.txt"
    data.write_text("\n".join(NOTES.read_text().splitlines()[:24]))
    out = tmp_path / "private"
    r = cli("tune", "--mode", "privatelora", "--server", full_server.url, "--split", "1:29", "--data", str(data),
            "--out", str(out), "--epochs", "1", "--block", "64", "--holdout", "0.2", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PrivateLoRA, 56 M matrices (8 x 8)" in r.stderr and "the M matrices" in r.stdout
    result = json.loads((out / "training.json").read_text())
    assert result["heldout_ppl_after"] < 0.85 * result["heldout_ppl_before"], result
    loaded = PrivateAdapter.load(out)
    assert (loaded.x, loaded.y, loaded.spec.rank) == (1, 29, 8) and len(loaded.m) == 56
    assert any(m.abs().sum() > 0 for m in loaded.m.values())  # M moved from its zero start
