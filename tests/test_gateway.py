"""moa gateway in front of a real `moa serve` upstream (both uvicorn on loopback ports), and
early-exit routing (`route_layers`, `load_routing_part`) on the tiny routed MoA.

The upstream is moa serve's app on the same checkpoint, addressed as `moa:<domain>`; so the
gateway's answer for a prompt must equal the upstream's own answer with that expert forced, and
its routing decision must equal moa serve's. Upstream failures use small stand-in apps.
"""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
import torch

from conftest import ROUTED_DOMAINS, ROUTED_PROMPTS, serving
from moa.checkpoint import load_routing_part
from moa.errors import MoAError
from moa.gateway import Upstreams, create_gateway_app, upstream_base
from moa.generation import encode_prompts
from moa.model import MoAModel
from moa.serve import create_app

DOMAINS, PROMPTS = ROUTED_DOMAINS, ROUTED_PROMPTS
TEMPLATE = "moa:{domain}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def full_model(routed_moa_dir):
    return MoAModel.from_pretrained(routed_moa_dir)


@pytest.fixture(scope="module")
def upstream(full_model):
    """(URL, app) of a real moa serve on the routed MoA: the upstream."""
    app = create_app(full_model, max_batch_size=8, max_new_tokens_limit=32)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def routing_part(routed_moa_dir):
    return load_routing_part(MoAModel, routed_moa_dir)


@pytest.fixture(scope="module")
def gateway(routing_part, upstream):
    with serving(create_gateway_app(routing_part, [upstream[0]], template=TEMPLATE)) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def upstream_client(upstream):
    return openai.OpenAI(base_url=f"{upstream[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content, model="moa", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def free_port_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def stand_in(status: int = 200, hits: list | None = None, name: str = "stub"):
    """A minimal OpenAI-style upstream: answers every chat request with `status` (a fixed reply on
    200, an OpenAI error body otherwise) and records (name, requested model) in `hits`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat_completions(request):
        body = await request.json()
        if hits is not None:
            hits.append((name, body["model"]))
        if status != 200:
            return JSONResponse({"error": {"message": f"{name} is broken", "type": "server_error", "param": None,
                                           "code": None}}, status)
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": name},
                                          "finish_reason": "stop"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])


# --------------------------------------------------------------------------- routing and forwarding


def test_routed_requests_reach_the_upstream_as_the_routed_domain(client, upstream_client):
    for domain, prompts in PROMPTS.items():
        for prompt in prompts:
            r = chat(client, prompt)
            moa = r.model_extra["moa"]
            assert r.model == "moa" and moa["routing"] == "vote" and moa["domain"] == domain, (prompt, moa)
            assert set(moa["router_probs"]) == set(DOMAINS) and abs(sum(moa["router_probs"].values()) - 1) < 1e-4
            assert max(moa["router_probs"], key=moa["router_probs"].get) == domain
            # forwarded as moa:<domain>: the text is the upstream's with that expert forced
            direct = chat(upstream_client, prompt, model=f"moa:{domain}")
            assert r.choices[0].message.content == direct.choices[0].message.content
            assert r.usage.completion_tokens == direct.usage.completion_tokens


def test_the_gateway_decides_as_moa_serve_does(client, upstream_client):
    prompts = [p for ps in PROMPTS.values() for p in ps] + ["Add REPEAT json", "hello there"]
    for prompt in prompts:
        mine, theirs = chat(client, prompt, max_tokens=1), chat(upstream_client, prompt, max_tokens=1)
        assert mine.model_extra["moa"]["domain"] == theirs.model_extra["moa"]["domain"]
        for d in DOMAINS:
            assert mine.model_extra["moa"]["router_probs"][d] == pytest.approx(
                theirs.model_extra["moa"]["router_probs"][d], abs=1e-4)


def test_a_moa_domain_model_forces_the_domain(client, upstream_client):
    prompt = PROMPTS["math"][0]
    r = chat(client, prompt, model="moa:echo")
    assert r.model == "moa:echo"
    assert r.model_extra["moa"] == {"domain": "echo", "router_probs": None, "routing": "explicit",
                                        "fallback": False}
    direct = chat(upstream_client, prompt, model="moa:echo")
    assert r.choices[0].message.content == direct.choices[0].message.content


def test_layer_probs_come_from_the_routers_that_ran(client, routing_part):
    r = client.chat.completions.create(model="moa", messages=[{"role": "user", "content": PROMPTS["json"][0]}],
                                       max_tokens=2, temperature=0, extra_body={"moa": {"return_layer_probs": True}})
    layers = r.model_extra["moa"]["layer_probs"]
    assert len(layers) == routing_part.route_layers and all(len(row) == len(DOMAINS) for row in layers)
    assert all(abs(sum(row) - 1) < 1e-4 for row in layers)


def test_streamed_text_equals_the_non_streamed_text(client, gateway):
    for domain in DOMAINS:
        prompt = PROMPTS[domain][1]
        whole = chat(client, prompt, max_tokens=12)
        chunks = list(chat(client, prompt, max_tokens=12, stream=True))
        assert len(chunks) > 2  # passed through chunk by chunk, not gathered into one
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert all(c.model == "moa" and c.model_extra["moa"]["domain"] == domain for c in chunks)
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # the wire format: server-sent events ending with [DONE]
    body = {"model": "moa", "prompt": PROMPTS["echo"][0], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][5:])["moa"]["domain"] == "echo"


def test_completions_are_routed_too(client):
    r = client.completions.create(model="moa", prompt=PROMPTS["math"][2], max_tokens=4, temperature=0)
    assert r.model == "moa" and r.model_extra["moa"]["domain"] == "math" and isinstance(r.choices[0].text, str)


# --------------------------------------------------------------------------- errors


def test_upstream_client_errors_pass_through_with_their_status(client, gateway):
    # moa serve refuses max_tokens above its limit (32) with 400 and says so; the gateway relays that
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, PROMPTS["math"][0], max_tokens=1000)
    assert e.value.status_code == 400 and "limit of 32" in e.value.message
    r = httpx.post(f"{gateway}/v1/chat/completions", timeout=60,
                   json={"model": "moa", "messages": [{"role": "user", "content": "Add 1 and 2."}], "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize("status", [500, 503])
def test_upstream_server_errors_pass_through_with_their_status(routing_part, status):
    with serving(stand_in(status, name="sick")) as up, \
            serving(create_gateway_app(routing_part, [up], template=TEMPLATE)) as gw:
        r = httpx.post(f"{gw}/v1/chat/completions", json={"model": "moa", "messages": [
            {"role": "user", "content": "Add 1 and 2."}]}, timeout=60)
    assert r.status_code == status and r.json()["error"]["message"] == "sick is broken"


def test_an_upstream_that_is_down_gives_502(routing_part):
    down = free_port_url()
    with serving(create_gateway_app(routing_part, [down], template=TEMPLATE)) as gw:
        client = openai.OpenAI(base_url=f"{gw}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, PROMPTS["math"][0])
        assert e.value.status_code == 502 and "cannot reach any upstream" in e.value.message and down in e.value.message
        with pytest.raises(openai.APIStatusError) as e:  # streaming too, before any chunk
            list(chat(client, PROMPTS["math"][0], stream=True))
        assert e.value.status_code == 502


@pytest.mark.parametrize("body, status, param", [
    ("not json", 400, None),
    ([1, 2], 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "moa"}, 400, "messages"),
    ({"model": "moa", "messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
    ({"model": "moa", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": "moa", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"model": "moa", "messages": [{"role": "user", "content": "hi"}], "moa": {"x": 1}}, 400, "moa"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "moa:nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
])
def test_bad_requests_get_an_openai_error_without_reaching_the_upstream(gateway, upstream, body, status, param):
    stats = dict(upstream[1].state.batcher.stats)
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, **kw)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert upstream[1].state.batcher.stats == stats


def test_models_health_and_api_key(routing_part, gateway):
    models = httpx.get(f"{gateway}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["moa"] + [f"moa:{d}" for d in DOMAINS]
    health = httpx.get(f"{gateway}/health").json()
    assert health["domains"] == DOMAINS and health["route_layers"] == routing_part.num_layers
    assert [u["available"] for u in health["upstreams"]] == [True]
    with serving(create_gateway_app(routing_part, [free_port_url()], api_key="sesame")) as gw:
        r = httpx.post(f"{gw}/v1/chat/completions", json={"model": "moa"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{gw}/health").status_code == 200


# --------------------------------------------------------------------------- several upstreams


def test_round_robin_skips_an_upstream_that_is_down(routing_part):
    hits = []
    down = free_port_url()
    with serving(stand_in(hits=hits, name="a")) as a, serving(stand_in(hits=hits, name="b")) as b:
        app = create_gateway_app(routing_part, [down, a, b], template=TEMPLATE, cooldown_s=60)
        with serving(app) as gw:
            texts = []
            for _ in range(6):
                r = httpx.post(f"{gw}/v1/chat/completions", timeout=60, json={
                    "model": "moa", "messages": [{"role": "user", "content": PROMPTS["echo"][0]}]})
                assert r.status_code == 200
                texts.append(r.json()["choices"][0]["message"]["content"])
            health = httpx.get(f"{gw}/health").json()["upstreams"]
    assert texts.count("a") == 3 and texts.count("b") == 3  # the live ones share the load evenly
    assert all(texts[i] != texts[i + 1] for i in range(5))  # alternating
    assert [h["available"] for h in health] == [False, True, True]
    assert {model for _, model in hits} == {"moa:echo"}


def test_upstreams_rotate_and_a_failed_one_returns_after_the_cooldown():
    now = [0.0]
    ups = Upstreams(["http://a:1", "http://b:1/v1", "http://c:1/"], cooldown_s=10, clock=lambda: now[0])
    assert ups.urls == ["http://a:1", "http://b:1", "http://c:1"]
    assert [ups.order()[0] for _ in range(4)] == ["http://a:1", "http://b:1", "http://c:1", "http://a:1"]
    ups.failed("http://b:1")
    assert ups.order() == ["http://c:1", "http://a:1", "http://b:1"]  # b was next in turn: skipped, tried last
    now[0] = 9.9
    assert [ups.order()[-1] for _ in range(3)] == ["http://b:1"] * 3
    now[0] = 10.0
    assert sorted(ups.order()[0] for _ in range(3)) == ["http://a:1", "http://b:1", "http://c:1"]
    assert all(u["available"] for u in ups.state())
    ups.failed("http://a:1")
    ups.succeeded("http://a:1")  # answered after all: available again, and its neighbour is next
    assert ups.order() == ["http://b:1", "http://c:1", "http://a:1"]
    for bad in ("ftp://x", "localhost:8000", "http://x:1/v1?k=1"):
        with pytest.raises(MoAError, match="not an http"):
            upstream_base(bad)
    with pytest.raises(MoAError, match="twice"):
        Upstreams(["http://a:1", "http://a:1/v1"])


# --------------------------------------------------------------------------- early-exit routing


def test_the_routing_part_decides_exactly_as_the_full_model(routed_moa_dir, full_model):
    prompts = [p for ps in PROMPTS.values() for p in ps]
    ids, mask = encode_prompts(full_model, prompts)
    full_params = sum(p.numel() for p in full_model.parameters())
    for K in range(1, full_model.num_layers + 1):
        part = load_routing_part(MoAModel, routed_moa_dir, K)
        assert part.num_layers == K and part.routing_only
        for how in ("vote", "last"):
            got, want = part.route(ids, mask, how), full_model.route(ids, mask, how, route_layers=K)
            assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-6)
        kept = sum(p.numel() for p in part.parameters() if p.device.type != "meta")
        assert kept < full_params
        # router K reads layer K's input: layer K itself is never run, so its weights are released
        assert all(p.device.type == "meta" for p in part._layers[-1].parameters())
    with pytest.raises(MoAError, match="routing only"):
        part(input_ids=ids, attention_mask=mask)
    with pytest.raises(MoAError, match="routing only"):
        part.generate(["Add 1 and 2."])
    for bad in (0, full_model.num_layers + 1):
        with pytest.raises(MoAError, match="route_layers"):
            load_routing_part(MoAModel, routed_moa_dir, bad)


def test_route_layers_decides_from_the_first_k_routers(routed_moa_dir):
    model = MoAModel.from_pretrained(routed_moa_dir)
    prompts = PROMPTS["math"]
    ids, mask = encode_prompts(model, prompts)
    first = model.route(ids, mask, "last", route_layers=1)[0]
    assert model.domain_names(first) == ["math"] * 3
    with torch.no_grad():  # the last router now always says json
        model.routers[-1].bias[DOMAINS.index("json")] = 1e4
    assert model.domain_names(model.route(ids, mask, "last")[0]) == ["json"] * 3
    model.route_layers = 1
    assert torch.equal(model.route(ids, mask, "last")[0], first)
    assert [r.domain for r in model.generate(prompts, routing="last", max_new_tokens=2)] == ["math"] * 3
    assert model(input_ids=ids, attention_mask=mask, routing="last").domains == ["math"] * 3
    model.route_layers = None
    assert model.route_layers == model.num_layers
    for bad in (0, model.num_layers + 1, True, 1.5):
        with pytest.raises(MoAError, match="route_layers must be an integer"):
            model.route_layers = bad


def test_cli_reports_bad_gateway_options_in_one_line(routed_moa_dir, capsys):
    from moa.cli import main

    base = ["gateway", "--moa", str(routed_moa_dir)]
    cases = [
        (base, "--upstream"),
        (base + ["--upstream", "localhost:8000"], "not an http(s) URL"),
        (base + ["--upstream", "http://127.0.0.1:1", "--upstream-model-template", "adapter"], "{domain}"),
        (base + ["--upstream", "http://127.0.0.1:1", "--route-layers", "3"], "--route-layers must be"),
        (["gateway", "--moa", "/nonexistent", "--upstream", "http://127.0.0.1:1"], "not a MoA checkpoint"),
    ]
    for argv, message in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moa: error:") and message in err and "\n" not in err, err


def test_a_gateway_with_fewer_layers_decides_as_the_model_with_route_layers(routed_moa_dir, full_model):
    part = load_routing_part(MoAModel, routed_moa_dir, 1)
    prompts = [p for ps in PROMPTS.values() for p in ps]
    ids, mask = encode_prompts(full_model, prompts)
    want_ids, want_probs = full_model.route(ids, mask, route_layers=1)
    hits = []
    with serving(stand_in(hits=hits)) as up, serving(create_gateway_app(part, [up], template=TEMPLATE)) as gw:
        for i, prompt in enumerate(prompts):
            r = httpx.post(f"{gw}/v1/chat/completions", timeout=60, json={
                "model": "moa", "messages": [{"role": "user", "content": prompt}],
                "moa": {"return_layer_probs": True}})
            moa = r.json()["moa"]
            assert moa["domain"] == DOMAINS[int(want_ids[i])] and len(moa["layer_probs"]) == 1
            assert [moa["router_probs"][d] for d in DOMAINS] == pytest.approx(want_probs[i].tolist(), abs=1e-5)
    assert [model for _, model in hits] == [f"moa:{DOMAINS[int(e)]}" for e in want_ids]
