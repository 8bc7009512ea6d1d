"""A body sharded over several servers, chained by the client or forwarded by the servers, with replicas
per hop, fault recovery of one hop, and cross-checking that catches a dishonest server. Real servers on
loopback ports; the embedded model split 1 | 15 | 29."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lambdasplit.client.chain import ChainBody
from lambdasplit.client.generate import GenerationStats, SplitClient
from lambdasplit.client.route import RouteError, discover_route, plan_route
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.client.verify import VerifiedBody, relative_difference, tolerance
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.protocol import ForwardHop, SessionRequest

PROMPT = "Name three colors."
TOKENS = 10


# ---- the route, from what each server holds ----------------------------------------------------------
def test_route_groups_replicas_and_chains_hops_in_layer_order():
    route = plan_route({"b1": (15, 29), "a": (1, 15), "b2": (15, 29)})
    assert [(h.x, h.y, h.replicas) for h in route.hops] == [(1, 15, ("a",)), (15, 29, ("b1", "b2"))]
    assert (route.x, route.y) == (1, 29) and "->" in str(route)
    # replicas of one body: any split inside it; a narrower split trims the end hops
    assert [(h.x, h.y) for h in plan_route({"s": (0, 30), "t": (0, 30)}, (3, 7)).hops] == [(3, 7)]
    trimmed = plan_route({"a": (1, 15), "b": (15, 29)}, (2, 20))
    assert [(h.x, h.y) for h in trimmed.hops] == [(2, 15), (15, 20)]


@pytest.mark.parametrize("served, split, problem", [
    ({"a": (1, 10), "b": (12, 29)}, None, "stuck at layer 10"),
    ({"a": (1, 15), "b": (10, 29)}, None, "overlap"),
    ({"a": (1, 15), "b": (15, 29)}, (0, 29), "stuck at layer 0"),
    ({"a": (1, 15)}, (1, 20), "not inside"),
    ({}, None, "no body server"),
])
def test_routes_that_cannot_work_are_refused_in_words(served, split, problem):
    with pytest.raises(RouteError, match=problem):
        plan_route(served, split)


def test_discovery_leaves_out_a_dead_server_and_refuses_mixed_models():
    from lambdasplit.wire.protocol import ServerInfo

    def info(url, name="m", layers=30):
        return ServerInfo(model_name=name, num_layers=layers, hidden_size=8, x=0, y=layers, dtype="float32",
                          codecs=[], max_positions=8, max_frame_bytes=1, max_sessions=1, sessions=0, parameters=1,
                          parameter_bytes=1, rss_bytes=1, holds=[])

    def ask(url):
        if url == "dead":
            raise BodyError("unreachable", "connection refused")
        return info(url, name="other" if url == "odd" else "m")

    events = []
    route, facts = discover_route(["dead", "ok"], ask, on_event=events.append)
    assert route.hops[0].replicas == ("ok",) and facts.model_name == "m" and "dead" in events[0]
    with pytest.raises(RouteError, match="different models"):
        discover_route(["ok", "odd"], ask)
    with pytest.raises(BodyError, match="no body server answered"):
        discover_route(["dead"], ask)


def test_verification_tolerance_follows_the_codec():
    assert tolerance("fp32", "fp32") < tolerance("fp32", "fp16") < tolerance("int8", "int8") < tolerance("fp32", "int4")
    assert tolerance("fp32", "noise:0.1+fp16") > 0.5  # fresh noise on each replica's answer
    with pytest.raises(ValueError, match="same input"):
        tolerance("noise:0.1+fp32", "fp32")
    a = torch.randn(3, 16)
    assert relative_difference(a, a) == 0 and relative_difference(a, -a) == pytest.approx(2.0)
    assert relative_difference(a, a[:2]) == float("inf")


# ---- real servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(smol_dir):
    """Hop [1, 15): a, a2 (a forwards to its peers). Hop [15, 29): b, b2, and a liar (answers perturbed by
    half their RMS from step 2 on)."""
    folder = str(smol_dir)
    specs = {"b": ("15:29",), "b2": ("15:29",), "liar": ("15:29", "--dishonest", "0.5", "--dishonest-after", "2"),
             "a2": ("1:15",)}
    with ThreadPoolExecutor(len(specs)) as pool:
        started = dict(zip(specs, pool.map(lambda spec: ServerProcess(folder, *spec), specs.values())))
    try:
        peers = ",".join(started[n].url for n in ("b", "b2", "liar"))
        started["a"] = ServerProcess(folder, "1:15", "--peers", peers)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def reference(smol_dir):
    """The unsplit model's greedy answer (the device runs every layer)."""
    client = SplitClient(smol_dir, server=None, split=(1, 29), speculate="off")
    return client.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False).token_ids


def _client(smol_dir, urls, **options):
    options.setdefault("wire", "fp32")
    return SplitClient(smol_dir, server=",".join(urls), speculate="off", **options)


def _generate(client):
    return client.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False)


@pytest.mark.parametrize("hops", ["chain", "forward"])
def test_a_sharded_body_gives_the_unsplit_answer(smol_dir, servers, reference, hops):
    client = _client(smol_dir, [servers["a"].url, servers["b"].url], hops=hops)
    result = _generate(client)
    assert result.token_ids == reference
    assert [(h.x, h.y) for h in client.route.hops] == [(1, 15), (15, 29)]
    # chained: the device exchanges a frame with each hop per step; forwarded: with the first server only
    assert result.stats.traffic.steps == TOKENS * (2 if hops == "chain" else 1)


def test_chained_and_forwarded_agree_over_a_lossy_wire(smol_dir, servers):
    outs = {hops: _generate(_client(smol_dir, [servers["a"].url, servers["b"].url], hops=hops, wire="int8")).token_ids
            for hops in ("chain", "forward")}
    assert outs["chain"] == outs["forward"]


def test_forwarding_only_to_peers_and_auto_falls_back_to_chaining(smol_dir, servers, reference):
    events = []
    # a2 has no --peers: auto chains instead (and says so); forward is refused with the reason
    client = _client(smol_dir, [servers["a2"].url, servers["b"].url], on_event=events.append)
    result = _generate(client)
    assert result.token_ids == reference and result.stats.traffic.steps == 2 * TOKENS
    assert any("does not forward" in e and "chaining" in e for e in events)
    with pytest.raises(BodyError, match="does not forward"):
        _generate(_client(smol_dir, [servers["a2"].url, servers["b"].url], hops="forward"))
    # a forwards, but only to its peers: not to a2 (a server it was not told of)
    request = SessionRequest(model_fingerprint="0" * 64, x=1, y=15, wire={"up": "fp32", "down": "fp32"},
                             forward=[ForwardHop(urls=[servers["a2"].url], x=15, y=29, model_fingerprint="0" * 64)])
    client = _client(smol_dir, [servers["a"].url])
    request.model_fingerprint = client.model.body_fingerprint(1, 15)
    with BodyConnection(servers["a"].url, transport="http") as conn, pytest.raises(BodyError) as caught:
        conn.open_session(request)
    assert caught.value.code == "no_forward" and servers["a2"].url in str(caught.value)
    with BodyConnection(servers["a"].url, transport="http") as conn:
        assert conn.info().forwards and not BodyConnection(servers["a2"].url, transport="http").info().forwards


@pytest.mark.parametrize("k", [2, 3])
def test_cross_checking_catches_the_liar_and_keeps_the_honest_answer(smol_dir, servers, reference, k):
    events = []
    urls = [servers[n].url for n in ("a", "a2", "liar", "b", "b2")]
    client = _client(smol_dir, urls, verify=k, on_event=events.append)
    if k == 3:  # hop [1, 15) has only two servers
        with pytest.raises(ValueError, match="at least 3 servers for layers \\[1, 15\\)"):
            _generate(client)
        client = _client(smol_dir, [servers["a"].url, *urls[2:]], split=(15, 29), verify=3, on_event=events.append)
    result = _generate(client)
    assert result.token_ids == reference  # every split of the same model, over fp32, gives the same answer
    body = result.stats.body
    body = body.hops[-1] if isinstance(body, ChainBody) else body
    assert isinstance(body, VerifiedBody)
    (caught,) = body.disagreements
    assert caught.server == servers["liar"].url and caught.step == 2 and (caught.x, caught.y) == (15, 29)
    assert caught.difference > 10 * caught.tolerance
    assert any(servers["liar"].url in e and "excluded" in e for e in events)
    assert servers["liar"].url not in [m.url for m in body.members]


def test_without_cross_checking_the_liar_changes_the_answer(smol_dir, servers, reference):
    """The control: the same liar, asked alone, is believed (so the test above can fail)."""
    result = _generate(_client(smol_dir, [servers["a"].url, servers["liar"].url], hops="chain"))
    assert result.token_ids != reference


def test_cross_checking_refuses_what_it_cannot_do(smol_dir, servers):
    with pytest.raises(ValueError, match="same input"):
        _generate(_client(smol_dir, [servers["b"].url, servers["b2"].url], split=(15, 29), verify=2,
                          wire="noise:0.1+fp32,fp32"))
    with pytest.raises(ValueError, match="verify takes"):
        _client(smol_dir, [servers["b"].url], verify=0)
    with pytest.raises(ValueError, match="hops must be"):
        _client(smol_dir, [servers["b"].url], hops="sideways")
    with pytest.raises(ValueError, match="compares each hop"):
        _generate(_client(smol_dir, [servers["a"].url, servers["a2"].url, servers["b"].url, servers["b2"].url],
                          verify=2, hops="forward"))


@pytest.mark.slow
def test_generate_cli_reports_the_liar(smol_dir, servers):
    urls = ",".join(servers[n].url for n in ("liar", "b", "b2"))
    run = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", PROMPT, "--server", urls, "--split", "15:29",
                          "--verify", "2", "--wire", "fp32", "--max-new-tokens", "6", "--speculate", "off",
                          "--model", str(smol_dir), "--ignore-eos"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert f"{servers['liar'].url} disagreed with the majority" in run.stderr and run.stdout.strip()


def _kill_midway(client, victim, stats):
    out = []
    for token in client.generate_ids(client.encode_prompt(PROMPT), max_new_tokens=TOKENS, stop_at_eos=False,
                                     stats=stats):
        out.append(token)
        if len(out) == 4:
            victim.stop()
    return out


@pytest.mark.slow
def test_bench_scale_verify_part_writes_its_table(tmp_path, smol_dir):
    import json

    run = subprocess.run([sys.executable, "-m", "lambdasplit", "bench", "scale", "--parts", "verify", "--tokens", "3",
                          "--repeats", "1", "--model", str(smol_dir), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [(r["part"], r["device_round_trips_per_token"]) for r in rows] == [("verify", 1.0), ("verify", 2.0),
                                                                           ("verify", 3.0)]
    assert all(r["identical"] and r["tokens_per_s"] > 0 for r in rows)
    assert "| verify | k = 2 |" in (tmp_path / "scale.md").read_text() and (tmp_path / "scale.png").stat().st_size


# the last tests: they kill servers
@pytest.mark.slow
def test_a_dead_hop_server_is_replaced_and_only_its_hop_replays(smol_dir, servers, reference):
    """Chained: the client holds each hop's session; hop 2 moves to its replica b, hop 1 keeps its own."""
    with ServerProcess(str(smol_dir), "15:29") as victim:
        stats = GenerationStats()
        client = _client(smol_dir, [servers["a2"].url, victim.url, servers["b"].url], hops="chain")
        assert _kill_midway(client, victim, stats) == reference
    assert isinstance(stats.body, ChainBody)
    assert [h.recoveries for h in stats.body.hops] == [0, 1]


def test_a_forwarding_server_replaces_a_dead_next_hop_unseen(smol_dir, servers, reference):
    """Forwarded: the first server holds hop 2's session; it moves it from b2 to b itself, and the device
    sees nothing but its answers."""
    stats = GenerationStats()
    client = _client(smol_dir, [servers["a"].url, servers["b2"].url, servers["b"].url], hops="forward")
    assert _kill_midway(client, servers["b2"], stats) == reference
    assert stats.recoveries == 0 and stats.traffic.steps == TOKENS
