"""moa serve: the OpenAI API over real HTTP (uvicorn on a loopback port) on a tiny MoA.

The session server runs a 3-expert tiny MoA whose routers were fitted to separate three prompt
kinds, so routing can be checked end to end. Queue, auth and disconnect behaviour of the static
batcher run against a stand-in model whose `generate` waits on a gate, which makes the worker's state
controllable; those of the continuous engine, and its token-by-token streaming, hot reload and
metrics, run on the tiny MoA (tests/test_engine.py).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROUTED_DOMAINS, ROUTED_PROMPTS, serving
from moa.errors import MoAError
from moa.model import GenerationResult, MoAModel
from moa.serve import Batcher, Decoding, Job, _pieces, create_app
from moa.testing import make_tokenizer

DOMAINS, PROMPTS = ROUTED_DOMAINS, ROUTED_PROMPTS
MAX_TOKENS_LIMIT = 32
MAX_PROMPT_TOKENS = 64


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def served(routed_moa_dir):
    """(base URL, app) of the real server on the tiny MoA."""
    model = MoAModel.from_pretrained(routed_moa_dir)
    app = create_app(model, max_batch_size=8, max_queue=64, max_new_tokens_limit=MAX_TOKENS_LIMIT,
                     max_prompt_tokens=MAX_PROMPT_TOKENS)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="session")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="session")
def http(url) -> httpx.Client:
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content, model="moa", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 6)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def assert_error_body(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# --------------------------------------------------------------------------- the OpenAI API


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["moa", "moa:math", "moa:echo", "moa:json", "base"]
    assert client.models.retrieve("moa:echo").id == "moa:echo"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["domains"] == DOMAINS and health["scheduler"] == "continuous"


def test_chat_completion_routes_automatically(client):
    r = chat(client, PROMPTS["math"][0])
    assert r.object == "chat.completion" and r.model == "moa" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    moa = r.model_extra["moa"]
    assert moa["routing"] == "vote" and moa["domain"] == "math"
    assert set(moa["router_probs"]) == set(DOMAINS) and abs(sum(moa["router_probs"].values()) - 1) < 1e-4
    assert max(moa["router_probs"], key=moa["router_probs"].get) == "math"


def test_explicit_model_forces_the_expert(client):
    prompt = PROMPTS["math"][1]
    forced = chat(client, prompt, model="moa:echo")
    assert forced.model == "moa:echo"
    assert forced.model_extra["moa"] == {"domain": "echo", "router_probs": None, "routing": "explicit",
                                        "fallback": False}
    # the routed request runs the math expert: same text as forcing it
    routed, forced_math = chat(client, prompt), chat(client, prompt, model="moa:math")
    assert routed.choices[0].message.content == forced_math.choices[0].message.content


def test_streamed_chat_equals_the_non_streamed_reply(client, url):
    prompt = PROMPTS["json"][0]
    whole = chat(client, prompt, max_tokens=12)
    chunks = list(chat(client, prompt, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.model_extra["moa"]["domain"] == "json" for c in chunks)
    # the wire format: server-sent events ending with [DONE]
    body = {"model": "moa", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text


def _layer_probs_ok(probs) -> bool:
    """One row per layer of the tiny base (2), E probabilities each, summing to 1."""
    return (len(probs) == 2 and all(len(row) == len(DOMAINS) for row in probs)
            and all(abs(sum(row) - 1) < 1e-5 and min(row) >= 0 for row in probs))


def _flat(rows):
    return [p for row in rows for p in row]


def test_return_layer_probs_adds_one_row_per_layer(client, http):
    prompt = PROMPTS["echo"][2]
    asked = chat(client, prompt, extra_body={"moa": {"return_layer_probs": True}})
    moa = asked.model_extra["moa"]
    assert moa["routing"] == "vote" and moa["domain"] == "echo" and _layer_probs_ok(moa["layer_probs"])
    # the vote's probabilities are the mean of the layers'
    means = [sum(row[e] for row in moa["layer_probs"]) / 2 for e in range(len(DOMAINS))]
    assert means == pytest.approx([moa["router_probs"][d] for d in DOMAINS], abs=1e-5)
    # a forced expert answers as it does without the field, and the routers' view comes along
    forced = chat(client, prompt, model="moa:json", extra_body={"moa": {"return_layer_probs": True}})
    assert forced.choices[0].message.content == chat(client, prompt, model="moa:json").choices[0].message.content
    assert forced.model_extra["moa"]["router_probs"] is None
    assert _flat(forced.model_extra["moa"]["layer_probs"]) == pytest.approx(_flat(moa["layer_probs"]), abs=1e-5)
    # streamed: the first chunk carries them, the others stay small
    chunks = list(chat(client, prompt, stream=True, extra_body={"moa": {"return_layer_probs": True}}))
    assert _flat(chunks[0].model_extra["moa"]["layer_probs"]) == pytest.approx(_flat(moa["layer_probs"]), abs=1e-5)
    assert all("layer_probs" not in c.model_extra["moa"] for c in chunks[1:])
    # /v1/completions too, streamed or not
    body = {"model": "moa", "prompt": prompt, "max_tokens": 3, "temperature": 0, "moa": {"return_layer_probs": True}}
    assert _layer_probs_ok(http.post("/v1/completions", json=body).json()["moa"]["layer_probs"])
    first = next(line for line in http.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
                 if line.startswith("data: "))
    assert _layer_probs_ok(json.loads(first[6:])["moa"]["layer_probs"])


def test_clients_that_do_not_ask_see_no_new_field(client):
    prompt = PROMPTS["math"][2]
    for extra in ({}, {"extra_body": {"moa": {"return_layer_probs": False}}}, {"extra_body": {"moa": {}}}):
        assert set(chat(client, prompt, **extra).model_extra["moa"]) == {"domain", "router_probs", "routing", "fallback"}
        for c in chat(client, prompt, stream=True, **extra):
            assert set(c.model_extra["moa"]) == {"domain", "router_probs", "routing", "fallback"}


def test_the_base_model_answers_without_an_expert(client, routed_moa_dir):
    prompt = PROMPTS["math"][0]
    r = chat(client, prompt, model="base", max_tokens=8)
    assert r.model == "base" and r.model_extra["moa"] == {"domain": None, "router_probs": None, "routing": "base",
                                                   "fallback": False}
    want = MoAModel.from_pretrained(routed_moa_dir).generate([prompt], domains=[None], max_new_tokens=8)[0]
    assert r.choices[0].message.content == want.text
    # not what any expert says (the experts are random, non-zero LoRAs)
    experts = {chat(client, prompt, model=f"moa:{d}", max_tokens=8).choices[0].message.content for d in DOMAINS}
    assert r.choices[0].message.content not in experts
    assert client.models.retrieve("base").id == "base"


def test_completions_render_the_prompt_as_one_user_turn(client):
    prompt = PROMPTS["echo"][0]
    r = client.completions.create(model="moa", prompt=prompt, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model_extra["moa"]["domain"] == "echo"
    assert r.choices[0].text == chat(client, prompt).choices[0].message.content
    ask = dict(model="moa:json", prompt=prompt, max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True))
    assert streamed == client.completions.create(**ask).choices[0].text


def test_stop_strings_seed_and_max_tokens_are_honoured(client):
    prompt = PROMPTS["echo"][1]
    full = chat(client, prompt, max_tokens=10).choices[0].message.content
    stop = next(c for c in full[1:] if c.isascii() and c.isalnum())  # the random model's bytes hold some
    cut = chat(client, prompt, max_tokens=10, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert chat(client, prompt, max_tokens=3).usage.completion_tokens <= 3
    sampled = [chat(client, prompt, temperature=1.0, top_p=0.9, seed=7, max_tokens=4).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_forty_concurrent_requests_are_batched_and_routed_right(client, served):
    app = served[1]
    cases = [(d, p) for d in DOMAINS for p in PROMPTS[d]]
    alone = {p: chat(client, p, max_tokens=3).choices[0].message.content for _, p in cases}  # one at a time
    before = dict(app.state.engine.stats)
    jobs = [cases[i % len(cases)] for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda job: chat(client, job[1], max_tokens=3), jobs))
    for (domain, prompt), r in zip(jobs, replies):
        assert r.model_extra["moa"]["domain"] == domain, prompt
        # rows of a mixed-expert batch decode exactly as they do alone
        assert r.choices[0].message.content == alone[prompt]
    stats = app.state.engine.stats
    assert stats["requests"] - before["requests"] == 40 and stats["max_batch"] > 1


# --------------------------------------------------------------------------- errors


def _chat_body(**kw):
    body = {"model": "moa", "messages": [{"role": "user", "content": "Add 1 and 2."}], "max_tokens": 2}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not ...}


MALFORMED = [
    ("invalid-json", "/v1/chat/completions", b'{"model": "moa", "messages": [', 400, None),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("empty-body", "/v1/chat/completions", b"", 400, None),
    ("missing-messages", "/v1/chat/completions", _chat_body(messages=...), 400, "messages"),
    ("missing-model", "/v1/chat/completions", _chat_body(model=...), 400, "model"),
    ("messages-not-a-list", "/v1/chat/completions", _chat_body(messages="hi"), 400, "messages"),
    ("empty-messages", "/v1/chat/completions", _chat_body(messages=[]), 400, "messages"),
    ("unknown-role", "/v1/chat/completions", _chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "messages.0.role"),
    ("content-int", "/v1/chat/completions", _chat_body(messages=[{"role": "user", "content": 5}]), 400,
     "messages.0.content"),
    ("blank-content", "/v1/chat/completions", _chat_body(messages=[{"role": "user", "content": "  "}]), 400,
     "messages"),
    ("temperature-string", "/v1/chat/completions", _chat_body(temperature="0.5"), 400, "temperature"),
    ("temperature-negative", "/v1/chat/completions", _chat_body(temperature=-1), 400, "temperature"),
    ("top-p-zero", "/v1/chat/completions", _chat_body(top_p=0), 400, "top_p"),
    ("stream-not-bool", "/v1/chat/completions", _chat_body(stream="yes"), 400, "stream"),
    ("max-tokens-zero", "/v1/chat/completions", _chat_body(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-over-limit", "/v1/chat/completions", _chat_body(max_tokens=MAX_TOKENS_LIMIT + 1), 400, "max_tokens"),
    ("max-tokens-huge", "/v1/chat/completions", _chat_body(max_tokens=10**40), 400, "max_tokens"),
    ("prompt-too-long", "/v1/chat/completions",
     _chat_body(messages=[{"role": "user", "content": "word " * MAX_PROMPT_TOKENS}]), 400, "messages"),
    ("five-stops", "/v1/chat/completions", _chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("n-two", "/v1/chat/completions", _chat_body(n=2), 400, "n"),
    ("unknown-model", "/v1/chat/completions", _chat_body(model="gpt-4"), 404, "model"),
    ("unknown-domain", "/v1/chat/completions", _chat_body(model="moa:law"), 404, "model"),
    ("nan-temperature", "/v1/chat/completions",
     b'{"model": "moa", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    ("completion-token-ids", "/v1/completions", {"model": "moa", "prompt": [1, 2, 3], "max_tokens": 2}, 400, "prompt"),
    ("completion-two-prompts", "/v1/completions", {"model": "moa", "prompt": ["a", "b"], "max_tokens": 2}, 400,
     "prompt"),
    ("completion-missing-prompt", "/v1/completions", {"model": "moa", "max_tokens": 2}, 400, "prompt"),
    ("moa-unknown-key", "/v1/chat/completions", _chat_body(moa={"return_layer_prob": True}), 400,
     "moa.return_layer_prob"),
    ("moa-not-bool", "/v1/chat/completions", _chat_body(moa={"return_layer_probs": "yes"}), 400,
     "moa.return_layer_probs"),
    ("moa-int", "/v1/chat/completions", _chat_body(moa={"return_layer_probs": 1}), 400, "moa.return_layer_probs"),
    ("moa-not-object", "/v1/chat/completions", _chat_body(moa=True), 400, "moa"),
    ("moa-list", "/v1/completions", {"model": "moa", "prompt": "x", "max_tokens": 2, "moa": []}, 400, "moa"),
    ("base-is-no-domain", "/v1/chat/completions", _chat_body(model="moa:base"), 404, "model"),
]


@pytest.mark.parametrize("path, body, status, param", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_an_openai_error(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = assert_error_body(r)
    if param is not None:
        assert error["param"] == param, error


def test_a_bad_moa_field_says_what_it_accepts(http):
    r = http.post("/v1/chat/completions", json=_chat_body(moa={"return_layer_probs": True, "layers": [0]}))
    error = assert_error_body(r)
    assert r.status_code == 400 and error["param"] == "moa.layers"
    assert "moa.layers" in error["message"] and '{"return_layer_probs": true}' in error["message"]


def test_unknown_routes_answer_in_the_openai_shape(http):
    assert_error_body(http.get("/v1/nothing-here"))
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and assert_error_body(r)


# Fuzzing: a valid request, then up to two fields replaced by junk or deleted (nested fields too).
_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_edge = st.sampled_from([None, True, 0, -1, 0.5, 2.5, MAX_TOKENS_LIMIT + 1, 2**63, 2**64, "", "moa", [], {},
                         [""] * 5, "\ud800"])
_bad = _junk | _edge
_DELETE = object()


def _mostly(valid):
    return st.one_of(valid, valid, valid, _bad)


_text = st.text(max_size=12) | st.sampled_from(["Add 2 and 9.", "REPEAT: stone stone", "lone \ud800 surrogate"])
_message = st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["user", "system", "assistant", "developer"])),
     "content": _mostly(_text | st.lists(st.fixed_dictionaries({"type": _mostly(st.just("text")),
                                                                 "text": _mostly(_text)}), max_size=2))},
    optional={"name": _mostly(_text)},
)
_OPTIONAL = {
    "temperature": st.sampled_from([0, 0.0, 0.7, 2]) | st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**63 - 1),
    "stop": _text | st.lists(_text, max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
    "user": _text,
    "extra_field": _junk,
    "moa": st.fixed_dictionaries({}, optional={"return_layer_probs": st.booleans()}),
}
_FIELDS = ["model", "max_tokens", "messages", "prompt", *_OPTIONAL]


@st.composite
def _requests(draw):
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    payload = {"model": draw(st.sampled_from(["moa", "moa:math", "moa:echo", "moa:json", "base"])),
               "max_tokens": draw(st.integers(1, 3))}  # small: a missing max_tokens means a long reply
    if path == "/v1/chat/completions":
        payload["messages"] = draw(st.lists(_message, min_size=1, max_size=3))
    else:
        payload["prompt"] = draw(_text | st.lists(_text, min_size=1, max_size=1))
    payload.update(draw(st.fixed_dictionaries({}, optional=_OPTIONAL)))
    for name, value in draw(st.lists(st.tuples(st.sampled_from(_FIELDS), st.just(_DELETE) | _bad), max_size=2)):
        if value is _DELETE:
            payload.pop(name, None)
        else:
            payload[name] = value
    return path, payload


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(request=_requests())
def test_fuzzed_requests_never_get_a_5xx(http, request):
    path, payload = request
    body = json.dumps(payload)  # floats may be NaN/Infinity, which Python's JSON reads back
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (payload, r.text)
    if r.status_code >= 400:
        assert_error_body(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
    else:
        assert r.json()["choices"] and "moa" in r.json()


# --------------------------------------------------------------------------- queue, auth, disconnects


class GatedModel:
    """Stands in for MoAModel: its generate waits until `gate` is set and records what it ran."""

    domains = ["a", "b"]

    def __init__(self, open_gate: bool = False):
        self.tokenizer = make_tokenizer()
        self.gate, self.running = threading.Event(), threading.Event()
        self.calls: list[tuple[list[str], list[str] | None, int]] = []
        self.layer_probs_asked: list[bool] = []
        if open_gate:
            self.gate.set()

    def generate(self, prompts, routing=None, domains=None, max_new_tokens=16, **kw):
        self.running.set()
        assert self.gate.wait(30)
        texts = [p[-1]["content"] for p in prompts]
        if "bad" in texts:
            raise MoAError("bad prompt")
        self.calls.append((texts, None if domains is None else list(domains), max_new_tokens))
        self.layer_probs_asked.append(kw.get("return_layer_probs", False))
        return [GenerationResult(text=f"re: {t}", domain=domains[i] if domains else "a",
                                 router_probs=None if domains else {"a": 1.0, "b": 0.0}, prompt_tokens=3,
                                 completion_tokens=2, finish_reason="stop") for i, t in enumerate(texts)]

    @property
    def seen(self) -> list[str]:
        return [t for texts, _, _ in self.calls for t in texts]


def _post(url, text, timeout=30.0):
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "moa", "messages": [{"role": "user", "content": text}], "max_tokens": 4})


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_503_and_a_departed_client_is_dropped():
    fake = GatedModel()
    app = create_app(fake, max_batch_size=1, max_queue=2, scheduler="static")
    depth = lambda: app.state.batcher.depth  # noqa: E731
    with serving(app) as url, ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, url, "A")
        assert fake.running.wait(10)  # the worker is busy with A
        second = pool.submit(_post, url, "B")
        _wait_until(lambda: depth() == 1)
        with pytest.raises(httpx.ReadTimeout):  # this client gives up while queued
            _post(url, "gone", timeout=0.5)
        _wait_until(lambda: depth() == 1)
        third = pool.submit(_post, url, "C")
        _wait_until(lambda: depth() == 2)
        full = _post(url, "D")
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert assert_error_body(full)["code"] == "queue_full"
        fake.gate.set()
        assert [f.result().status_code for f in (first, second, third)] == [200, 200, 200]
    assert fake.seen == ["A", "B", "C"]  # "gone" was never computed


def test_api_key_is_required_on_the_api():
    app = create_app(GatedModel(open_gate=True), api_key="sekret", scheduler="static")
    with serving(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(f"{url}/v1/chat/completions", content=b"not json", headers=headers)
            assert r.status_code == 401 and assert_error_body(r)["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        r = good.chat.completions.create(model="moa:b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].message.content == "re: hi" and r.model_extra["moa"]["domain"] == "b"
        stream = good.chat.completions.create(model="moa", messages=[{"role": "user", "content": "one two  three"}],
                                              max_tokens=4, stream=True)
        pieces = [c.choices[0].delta.content for c in stream][1:-1]  # between the role and the finish chunks
        assert pieces == ["re: ", "one ", "two  ", "three"]


@settings(max_examples=50, database=None)
@given(st.text())
def test_streamed_pieces_join_to_the_text(text):
    assert "".join(_pieces(text)) == text


def _job(text, domain=None, decoding=Decoding(16, False), out=None):
    def done(result, error):
        out[text] = error if error is not None else result

    return Job([{"role": "user", "content": text}], domain, decoding, done)


def test_worker_batches_compatible_requests_with_mixed_experts():
    fake = GatedModel(open_gate=True)
    batcher = Batcher(fake, max_batch_size=3, max_queue=16, batch_wait_ms=0)
    out: dict = {}
    seeded = Decoding(16, True, 0.8, 0.9, seed=3)
    jobs = [_job("1", "a", out=out), _job("2", "b", out=out), _job("3", "a", Decoding(8, False), out=out),
            _job("4", None, out=out), _job("5", "b", out=out), _job("6", "a", out=out),
            _job("7", "a", seeded, out=out), _job("8", "a", seeded, out=out), _job("dropped", "a", out=out)]
    batcher.submit(jobs)  # queued before the worker starts, so the batches are deterministic
    batcher.cancel(jobs[-1])
    batcher.start()
    _wait_until(lambda: len(out) == 8)
    batcher.close()
    assert fake.calls == [
        (["1", "2", "5"], ["a", "b", "b"], 16),  # different experts, one batch; capped at 3
        (["3"], ["a"], 8),  # another max_tokens
        (["4"], None, 16),  # routed, not explicit
        (["6"], ["a"], 16),
        (["7"], ["a"], 16),  # seeded sampling runs alone
        (["8"], ["a"], 16),
    ]
    assert out["5"].text == "re: 5" and "dropped" not in out


def test_base_rows_batch_with_forced_ones_and_only_forced_rows_that_ask_pay_a_routing_pass():
    fake = GatedModel(open_gate=True)
    batcher = Batcher(fake, max_batch_size=8, max_queue=16, batch_wait_ms=0)
    out: dict = {}
    jobs = [_job("1", "a", out=out), _job("2", None, out=out), _job("3", "b", out=out), _job("4", None, out=out),
            _job("5", "a", out=out), _job("6", None, out=out)]
    jobs[1].base = jobs[5].base = True  # 2 and 6: the base model; 4: routed
    jobs[4].layer_probs = True
    batcher.submit(jobs)
    batcher.start()
    _wait_until(lambda: len(out) == 6)
    batcher.close()
    assert fake.calls == [(["1", "2", "3", "6"], ["a", None, "b", None], 16), (["4"], None, 16), (["5"], ["a"], 16)]
    assert fake.layer_probs_asked == [False, False, True]


def test_a_failing_row_does_not_fail_its_batch():
    fake = GatedModel(open_gate=True)
    batcher = Batcher(fake, max_batch_size=4, max_queue=8, batch_wait_ms=0)
    out: dict = {}
    batcher.submit([_job(t, "a", out=out) for t in ("x", "bad", "y")])
    batcher.start()
    _wait_until(lambda: len(out) == 3)
    batcher.close()
    assert isinstance(out["bad"], MoAError) and out["x"].text == "re: x" and out["y"].text == "re: y"


def test_cli_reports_user_mistakes_in_one_line(tmp_path, capsys):
    from moa.cli import main

    assert main(["serve", "--moa", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert main(["serve", "--moa", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--max-batch-size must be >= 1" in err and "not a MoA checkpoint" in err


# --------------------------------------------------------------------------- the continuous engine over HTTP

STEP_S = 0.01
"""Seconds each forward of the slowed model sleeps: decode steps long enough to see joins and leaves."""


def _slowed(model: MoAModel) -> MoAModel:
    model.base_model.register_forward_pre_hook(lambda module, args: time.sleep(STEP_S))
    return model


@pytest.fixture(scope="module")
def slow(routed_moa_dir):
    """(base URL, app, openai client) of a server whose model takes STEP_S per step."""
    app = create_app(_slowed(MoAModel.from_pretrained(routed_moa_dir)), max_batch_size=16,
                     max_new_tokens_limit=128)
    with serving(app) as base:
        yield base, app, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def _timed_stream(client, prompt, max_tokens, model="moa:echo", first=None):
    """[(perf_counter, chunk)] of a streamed ignore_eos completion; sets `first` at the first text."""
    out = []
    for c in chat(client, prompt, model=model, max_tokens=max_tokens, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        out.append((time.perf_counter(), c))
        if first is not None and c.choices and c.choices[0].delta.content:
            first.set()
    return out


def test_a_streamed_completion_arrives_token_by_token(slow):
    _, _, client = slow
    prompt = PROMPTS["math"][0]
    start = time.perf_counter()
    timed = _timed_stream(client, prompt, 64, model="moa:math")
    content = [(t - start, c.choices[0].delta.content) for t, c in timed if c.choices and c.choices[0].delta.content]
    total = timed[-1][0] - start
    assert len(content) >= 32 and content[0][0] < total / 3, (len(content), content[0][0], total)
    assert timed[-1][1].usage.completion_tokens == 64 and not timed[-1][1].choices  # include_usage
    whole = chat(client, prompt, model="moa:math", max_tokens=64, extra_body={"ignore_eos": True})
    assert "".join(text for _, text in content) == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length"
    # without include_usage no chunk carries usage
    assert all(c.usage is None for c in chat(client, prompt, max_tokens=4, stream=True))


def test_short_requests_overtake_a_long_one(slow):
    _, app, client = slow

    def short(prompt):
        r = chat(client, prompt, max_tokens=4, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, time.perf_counter()

    first = threading.Event()
    with ThreadPoolExecutor(9) as pool:
        long = pool.submit(_timed_stream, client, PROMPTS["echo"][0], 96, first=first)
        assert first.wait(30)
        shorts = [pool.submit(short, PROMPTS[d][i]) for d in DOMAINS for i in range(3)][:8]
        ends = [f.result() for f in shorts]
        long_end = long.result()[-1][0]
    assert all(n == 4 for n, _ in ends)
    assert max(t for _, t in ends) < long_end  # all eight finished while the long one was still streaming
    assert app.state.engine.stats["max_batch"] >= 2


def test_a_client_that_leaves_frees_its_row(slow, url):
    base, app, _ = slow
    engine = app.state.engine
    body = {"model": "moa:json", "messages": [{"role": "user", "content": PROMPTS["json"][0]}], "max_tokens": 128,
            "temperature": 0, "stream": True, "ignore_eos": True}
    _wait_until(lambda: engine.running == 0)  # nothing of an earlier test still decoding
    steps = engine.stats["steps"]
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the client leaves after its first token
    _wait_until(lambda: engine.running == 0)
    # counted from before the request (a loaded machine may let the row run a few steps before this
    # thread looks again): the row stopped soon after the client left, not after its 128 tokens
    assert engine.stats["steps"] - steps <= 32


def test_metrics_are_prometheus_text(served, client):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = served
    chat(client, PROMPTS["math"][0], max_tokens=3)
    chat(client, PROMPTS["math"][0], model="base", max_tokens=3)
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = {s.labels["expert"]: s.value for s in families["moa_requests"].samples if s.name.endswith("_total")}
    assert requests["math"] >= 1 and requests["base"] >= 1
    tokens = {s.labels["expert"]: s.value for s in families["moa_generated_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens["math"] >= 1
    for name in ("moa_time_to_first_token_seconds", "moa_e2e_request_latency_seconds"):
        count = next(s.value for s in families[name].samples if s.name.endswith("_count"))
        assert families[name].type == "histogram" and count >= 2
    assert {"moa_queue_depth", "moa_running_batch_size"} <= set(families)


BENCH_FIELDS = [
    ("min-tokens-negative", _chat_body(min_tokens=-1), "min_tokens"),
    ("min-tokens-string", _chat_body(min_tokens="2"), "min_tokens"),
    ("min-tokens-over-max", _chat_body(min_tokens=3, max_tokens=2), "min_tokens"),
    ("ignore-eos-string", _chat_body(ignore_eos="yes"), "ignore_eos"),
    ("ignore-eos-int", _chat_body(ignore_eos=1), "ignore_eos"),
]


@pytest.mark.parametrize("body, param", [b[1:] for b in BENCH_FIELDS], ids=[b[0] for b in BENCH_FIELDS])
def test_benchmark_fields_are_validated(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and assert_error_body(r)["param"] == param


def test_ignore_eos_and_min_tokens_reach_the_model(client):
    r = chat(client, PROMPTS["echo"][0], max_tokens=20, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="moa", prompt=PROMPTS["echo"][0], max_tokens=9, temperature=0,
                                  extra_body={"min_tokens": 9})
    assert r.usage.completion_tokens == 9


@pytest.fixture
def four_experts(routed_moa_dir, tmp_path):
    """The routed MoA with a fourth expert (another copy of math's adapter, as `moa add-expert` makes)."""
    model = MoAModel.from_pretrained(routed_moa_dir)
    model.add_expert("code", routed_moa_dir.parent / "math")
    return model.save_pretrained(tmp_path / "four")


def test_hot_reload_swaps_the_model_without_losing_a_request(four_experts, routed_moa_dir, tmp_path):
    four = MoAModel.from_pretrained(four_experts)
    prompt = PROMPTS["math"][2]
    want = four.generate([prompt], domains=["code"], max_new_tokens=64, ignore_eos=True)[0].text
    app = create_app(_slowed(four), max_new_tokens_limit=64)
    with serving(app) as base, ThreadPoolExecutor(2) as pool:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["moa", *[f"moa:{d}" for d in DOMAINS + ["code"]], "base"]
        first = threading.Event()
        flight = pool.submit(_timed_stream, client, prompt, 64, "moa:code", first)
        assert first.wait(30)
        r = httpx.post(f"{base}/v1/admin/reload", json={"path": str(routed_moa_dir)}, timeout=60)
        assert r.status_code == 200 and r.json()["domains"] == DOMAINS
        assert not flight.done()  # the reload happened with the request in flight
        chunks = [c for _, c in flight.result()]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == 64
        assert [m.id for m in client.models.list().data] == ["moa", *[f"moa:{d}" for d in DOMAINS], "base"]
        with pytest.raises(openai.NotFoundError):
            chat(client, prompt, model="moa:code")
        assert chat(client, PROMPTS["echo"][0]).model_extra["moa"]["domain"] == "echo"
        # a bad checkpoint is refused with the reason, and the model in service stays
        for body, param in (({"path": str(tmp_path / "missing")}, "path"), ({"path": 5}, "path"), ({}, "path"),
                            ({"path": str(routed_moa_dir), "extra": 1}, "extra")):
            r = httpx.post(f"{base}/v1/admin/reload", json=body, timeout=60)
            assert r.status_code == 400 and assert_error_body(r)["param"] == param, r.text
        assert "missing" in httpx.post(f"{base}/v1/admin/reload", json={"path": str(tmp_path / "missing")}).text
        assert [m.id for m in client.models.list().data] == ["moa", *[f"moa:{d}" for d in DOMAINS], "base"]
        assert app.state.engine.stats["requests"] >= 2


def test_reload_needs_the_key_or_loopback(routed_moa_dir):
    from starlette.testclient import TestClient

    model = GatedModel(open_gate=True)
    with TestClient(create_app(model)) as remote:  # its client address is not loopback
        assert remote.get("/health").json()["scheduler"] == "static"  # a stand-in with only generate
        r = remote.post("/v1/admin/reload", json={"path": str(routed_moa_dir)})
        assert r.status_code == 403 and "loopback" in assert_error_body(r)["message"]
    with TestClient(create_app(model, api_key="k", scheduler="static")) as remote:
        assert remote.post("/v1/admin/reload", json={"path": str(routed_moa_dir)}).status_code == 401
        r = remote.post("/v1/admin/reload", json={"path": "/nonexistent"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 400 and "/nonexistent" in assert_error_body(r)["message"]
