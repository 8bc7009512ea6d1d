"""The compiled decode step (models/compiled.py): one torch.compile graph for a Llama stack's single-position
steps, over the session's own DynamicCache. It must compute what the stock layers compute, leave the cache as they
do (rollbacks included), step aside wherever it does not apply, refuse other architectures before compiling, and,
with `--compile` on both sides, keep the split exact."""

from __future__ import annotations

import pytest
import torch
from test_families import build
from torch._dynamo.utils import counters

from lambdasplit.client.generate import SplitClient
from lambdasplit.models.compiled import CompileError
from lambdasplit.models.kvcache import cached_length, truncate_cache
from lambdasplit.models.llm import load_split
from lambdasplit.models.source import resolve_model
from lambdasplit.server.process import ServerProcess


@pytest.fixture(scope="module", params=["fp32", "int4"])
def compiled_stack(request):
    folder = resolve_model(None, storage="float16" if request.param == "int4" else "float32")
    model = load_split(folder, 1, 4, parts=("body",), weights=request.param)
    held = model.parameter_report()
    stack = model.body.layers
    assert stack.compile() > 0
    assert model.parameter_report() == held  # compiling holds no second copy of the weights
    if request.param == "int4":  # q/k/v and gate/up fused into one product each, over the layers' own rows
        attn, fused = stack.layers[0].self_attn, stack.decode_step.fused[0]
        assert set(fused) == {"qkv", "gate_up"}
        assert attn.k_proj.packed.untyped_storage().data_ptr() == fused["qkv"].packed.untyped_storage().data_ptr()
    return request.param, stack


@pytest.mark.slow  # compiling takes 5-30 s, more on a cold inductor cache
def test_the_compiled_step_computes_what_the_stock_layers_compute(compiled_stack):
    name, stack = compiled_stack
    torch.manual_seed(0)
    dim = stack.config.hidden_size
    fast, stock = stack.new_cache(), stack.new_cache()
    prompt = torch.randn(1, 6, dim)
    calls, graphs = stack.decode_step.calls, counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        stack(prompt, fast, 0)
        stack(prompt, stock, 0, compiled=False)
        for pos in [*range(6, 14), 9, 10, 11]:  # eight steps, then a rollback to 9 and three more
            if pos == 9 and cached_length(fast) == 14:
                truncate_cache(fast, 9)
                truncate_cache(stock, 9)
            x = torch.randn(1, 1, dim)
            got, want = stack(x, fast, pos), stack(x, stock, pos, compiled=False)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    assert stack.decode_step.calls == calls + 11  # every one of those steps went through the graph
    assert counters["stats"]["unique_graphs"] == graphs  # and the rollback's cropped cache compiled no second one
    for i in range(stack.start, stack.stop):
        a, b = fast.layers[i], stock.layers[i]
        assert a.keys.shape == b.keys.shape == (1, stack.config.num_key_value_heads, 12, a.keys.shape[-1])
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # compiling takes 5-30 s, more on a cold inductor cache
def test_steps_it_does_not_take_run_the_stock_layers(compiled_stack):
    _, stack = compiled_stack
    dim = stack.config.hidden_size
    step = stack.decode_step
    cache = stack.new_cache()
    with torch.inference_mode():
        stack(torch.randn(1, 1, dim), cache, 0)  # a cache of one position: torch specialises sizes 0 and 1
        assert not step.applies(torch.randn(1, 1, dim), cache, stack.start, stack.stop)
        stack(torch.randn(1, 1, dim), cache, 1)
        assert step.applies(torch.randn(1, 1, dim), cache, stack.start, stack.stop)
        assert not step.applies(torch.randn(1, 2, dim), cache, stack.start, stack.stop)  # a prefill or verification
        assert not step.applies(torch.randn(1, 1, dim), None, stack.start, stack.stop)
        assert not step.applies(torch.randn(1, 1, dim), cache, stack.start, stack.start)
    assert not step.applies(torch.randn(1, 1, dim), cache, stack.start, stack.stop)  # autograd on: training


def test_other_architectures_are_refused_before_compiling(tmp_path):
    build(tmp_path, "gpt2")
    stack = load_split(tmp_path, 1, 3, parts=("body",)).body.layers
    with pytest.raises(CompileError, match="--compile runs Llama-architecture layers.*not GPT2Block"):
        stack.compile()
    assert stack.decode_step is None


@pytest.mark.slow
def test_compiled_on_both_sides_the_split_stays_exact():
    """`serve --compile` and SplitClient(compile=True), int4 on both sides and an fp32 wire, give the tokens of the
    same model compiled in one process."""
    with ServerProcess("smollm2", "14:16", "--weights", "int4", "--device", "cpu", "--compile") as server:
        local = SplitClient("smollm2", server=None, split=(14, 16), speculate="off", weights="int4", device="cpu",
                            compile=True)
        split = SplitClient("smollm2", server=server.url, wire="fp32", speculate="off", weights="int4",
                            device="cpu", compile=True)
        assert local.compile_s > 0 and split.compile_s > 0
        ids = local.encode_prompt("Name three primary colors.")
        want = list(local.generate_ids(ids, max_new_tokens=24, stop_at_eos=False))
        assert list(split.generate_ids(ids, max_new_tokens=24, stop_at_eos=False)) == want
        assert split.model.head.layers.decode_step.calls >= 22 and split.model.tail.layers.decode_step.calls >= 22


@pytest.mark.slow  # compiling takes 5-30 s, more on a cold inductor cache
def test_stacks_of_the_same_shape_never_share_a_graph():
    """Module guards are skipped for speed, so each stack's step must keep graphs of its own: an fp32 and an int4
    stack of the same layers, compiled in one process, each compute their own numbers."""
    stacks = [load_split(resolve_model(None, storage=storage), 1, 3, parts=("body",), weights=name).body.layers
              for name, storage in (("fp32", "float32"), ("int4", "float16"))]
    torch.manual_seed(1)
    prompt, x = torch.randn(1, 4, 576), torch.randn(1, 1, 576)
    with torch.inference_mode():
        for stack in stacks:
            stack.compile()
        for stack in stacks:
            fast, stock = stack.new_cache(), stack.new_cache()
            stack(prompt, fast, 0)
            stack(prompt, stock, 0, compiled=False)
            want = stack(x, stock, 4, compiled=False)
            torch.testing.assert_close(stack(x, fast, 4), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
            assert stack.decode_step.calls == 2  # the warm-up, and this step


@pytest.mark.slow
def test_inputs_of_any_provenance_take_the_same_graph(compiled_stack):
    """A prefill under no_grad (not inference mode), hidden states made outside inference mode or strided, and
    a cropped cache: each is settled into what the graph was compiled for, not compiled again (20-40 s)."""
    _, stack = compiled_stack
    dim = stack.config.hidden_size
    graphs, calls = counters["stats"]["unique_graphs"], stack.decode_step.calls
    cache = stack.new_cache()
    with torch.no_grad():
        stack(torch.randn(1, 4, dim), cache, 0)
        for pos in range(4, 8):
            stack(torch.randn(1, 1, 2 * dim)[..., ::2], cache, pos)
        truncate_cache(cache, 6)
        stack(torch.randn(1, 1, dim), cache, 6)
    assert stack.decode_step.calls == calls + 5
    assert counters["stats"]["unique_graphs"] == graphs
    assert cached_length(cache) == 7


@pytest.mark.slow  # two web apps, one compiling its head and tail (a few seconds each)
def test_web_compile_answers_as_web_does(full_server):
    """`lambdasplit web --compile` compiles the device's steps on a thread with the generations' torch threads, and
    answers the OpenAI API with the tokens `lambdasplit web` gives."""
    import openai

    from lambdasplit.web.process import WebProcess

    answers = []
    for extra in ((), ("--compile",)):
        with WebProcess(full_server.url, "--split", "1:29", "--wire", "fp32", "--speculate", "off", *extra) as app:
            client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="none", max_retries=0, timeout=300)
            r = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, max_tokens=16,
                                               messages=[{"role": "user", "content": "Name three primary colors."}])
            answers.append(r.choices[0].message.content)
            assert app.proc.poll() is None, "\n".join(app.log)
    assert answers[0] and answers[1] == answers[0]
