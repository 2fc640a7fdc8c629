"""moa.engine: continuous batching on the tiny routed MoA, without HTTP.

Rows join the running batch at different steps (a job is submitted from another job's callback,
so the step it joins at is fixed) and must decode exactly what `MoAModel.generate` gives each
prompt alone; sampling parameters, ignore_eos and min_tokens are per row.
"""

from __future__ import annotations

import time

import pytest

from conftest import ROUTED_PROMPTS
from moa.engine import Decoding, Detokenizer, Engine, Job
from moa.model import MoAModel
from moa.testing import make_tokenizer


@pytest.fixture(scope="module")
def model(routed_moa_dir) -> MoAModel:
    return MoAModel.from_pretrained(routed_moa_dir)


class Recorder:
    """Collects each job's callbacks; `results[name]` is (result, error)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.results: dict[str, tuple] = {}
        self.texts: dict[str, list[str]] = {}
        self.joined_at: dict[str, int] = {}
        self.order: list[str] = []

    def job(self, name, prompt, domain=None, decoding=Decoding(12, False), base=False, then=None, after=3):
        """A job; `then` (a list of jobs) is submitted once this job has produced `after` pieces of text."""
        def on_start(info):
            self.joined_at[name] = self.engine.stats["steps"]

        def on_text(delta):
            self.texts.setdefault(name, []).append(delta)
            if then and len(self.texts[name]) == after:
                self.engine.submit(then)

        def done(result, error):
            self.results[name] = (result, error)
            self.order.append(name)

        return Job([{"role": "user", "content": prompt}], domain, decoding, done, base=base, on_start=on_start,
                   on_text=on_text)

    def wait(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            assert time.monotonic() < deadline, f"only {sorted(self.results)} finished"
            time.sleep(0.005)


def _alone(model, prompt, domain=None, base=False, **kw):
    if base:
        return model.generate([prompt], domains=[None], **kw)[0]
    if domain is None:
        return model.generate([prompt], routing="vote", **kw)[0]
    return model.generate([prompt], domains=[domain], **kw)[0]


def test_rows_that_join_at_different_steps_decode_as_generate_alone(model):
    engine = Engine(model, max_batch_size=3, max_queue=16)
    rec = Recorder(engine)
    long = Decoding(24, False, ignore_eos=True)
    cases = {  # name: (prompt, domain, base, decoding)
        "routed-long": (ROUTED_PROMPTS["math"][0], None, False, long),
        "forced-json": (ROUTED_PROMPTS["echo"][0], "json", False, Decoding(10, False, ignore_eos=True)),
        "base": (ROUTED_PROMPTS["json"][1], None, True, Decoding(6, False, ignore_eos=True)),
        "routed-echo": (ROUTED_PROMPTS["echo"][1], None, False, Decoding(8, False)),
        "waits-for-a-row": (ROUTED_PROMPTS["json"][0], None, False, Decoding(5, False, ignore_eos=True)),
    }
    jobs = {name: rec.job(name, p, d, dec, b) for name, (p, d, b, dec) in cases.items()}
    # the late ones come in from callbacks: joined while the others are mid-decode
    late = [jobs["base"], jobs["routed-echo"], jobs["waits-for-a-row"]]
    jobs["forced-json"] = rec.job("forced-json", *cases["forced-json"][:2], cases["forced-json"][3], then=late,
                                  after=2)
    jobs["routed-long"] = rec.job("routed-long", *cases["routed-long"][:2], long, then=[jobs["forced-json"]],
                                  after=4)
    engine.start()
    try:
        engine.submit([jobs["routed-long"]])
        rec.wait(len(cases))
    finally:
        engine.close()
    assert len(set(rec.joined_at.values())) >= 3, rec.joined_at  # joins at different steps
    assert engine.stats["max_batch"] == 3  # the limit held: the fifth waited for a row to leave
    assert rec.joined_at["waits-for-a-row"] > rec.joined_at["base"]
    for name, (prompt, domain, base, dec) in cases.items():
        result, error = rec.results[name]
        assert error is None, (name, error)
        want = _alone(model, prompt, domain, base, max_new_tokens=dec.max_new_tokens, ignore_eos=dec.ignore_eos)
        assert (result.text, result.completion_tokens, result.finish_reason, result.domain) == \
               (want.text, want.completion_tokens, want.finish_reason, want.domain), name
        assert result.prompt_tokens == want.prompt_tokens
        if domain is None and not base:
            assert result.router_probs == pytest.approx(want.router_probs, abs=1e-5)
        # the streamed pieces are the text, in order
        assert "".join(rec.texts.get(name, [])) == result.text
    assert rec.order.index("base") < rec.order.index("routed-long")  # short rows leave before long ones


def test_each_row_samples_with_its_own_parameters(model):
    prompt = ROUTED_PROMPTS["echo"][2]
    engine = Engine(model, max_batch_size=4, max_queue=8)
    rec = Recorder(engine)
    seeded = Decoding(10, True, 1.0, 0.9, seed=11, ignore_eos=True)
    jobs = [rec.job("seeded", prompt, "echo", seeded), rec.job("greedy", prompt, "echo", Decoding(10, False)),
            rec.job("seeded-again", prompt, "echo", seeded),
            rec.job("hot", prompt, "math", Decoding(10, True, 2.0, 1.0, ignore_eos=True))]
    engine.submit(jobs)
    engine.start()
    try:
        rec.wait(4)
    finally:
        engine.close()
    got = {name: r for name, (r, _) in rec.results.items()}
    # a seeded row draws as generate draws for that request alone, whatever shares its batch
    want = _alone(model, prompt, "echo", max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.9, seed=11,
                  ignore_eos=True)
    assert got["seeded"].text == got["seeded-again"].text == want.text
    assert got["greedy"].text == _alone(model, prompt, "echo", max_new_tokens=10).text
    assert got["hot"].completion_tokens == 10 and got["hot"].domain == "math"


@pytest.fixture
def eos_model(routed_moa_dir):
    """The tiny MoA made to say its end-of-turn token first, whatever the prompt."""
    model = MoAModel.from_pretrained(routed_moa_dir)
    eos = model.tokenizer.eos_token_id

    def push_eos(module, args, out):
        out[..., eos] += 100.0
        return out

    handle = model.base_model.lm_head.register_forward_hook(push_eos)
    yield model
    handle.remove()


@pytest.mark.parametrize("decoding, tokens, reason", [
    (Decoding(6, False), 1, "stop"),  # the end-of-turn token ends it at once
    (Decoding(6, False, min_tokens=4), 5, "stop"),  # not before 4 tokens: the fifth is the end-of-turn token
    (Decoding(6, False, ignore_eos=True), 6, "length"),
    (Decoding(6, True, 0.7, ignore_eos=True, min_tokens=2), 6, "length"),
])
def test_ignore_eos_and_min_tokens(eos_model, decoding, tokens, reason):
    prompt = ROUTED_PROMPTS["math"][1]
    engine = Engine(eos_model, max_batch_size=2)
    rec = Recorder(engine)
    engine.submit([rec.job("x", prompt, "math", decoding)])
    engine.start()
    try:
        rec.wait(1)
    finally:
        engine.close()
    result, error = rec.results["x"]
    assert error is None and (result.completion_tokens, result.finish_reason) == (tokens, reason)
    want = eos_model.generate([prompt], domains=["math"], max_new_tokens=6, do_sample=decoding.do_sample,
                              temperature=decoding.temperature, ignore_eos=decoding.ignore_eos,
                              min_tokens=decoding.min_tokens)[0]
    assert (want.completion_tokens, want.finish_reason) == (tokens, reason)


def test_a_cancelled_row_leaves_at_the_next_step_and_others_go_on(model):
    engine = Engine(model, max_batch_size=4)
    rec = Recorder(engine)
    gone = rec.job("gone", ROUTED_PROMPTS["math"][2], "math", Decoding(200, False, ignore_eos=True))
    stays = rec.job("stays", ROUTED_PROMPTS["echo"][2], "echo", Decoding(40, False, ignore_eos=True))
    # Seen from the worker thread itself (a polling test thread can lag steps behind on a busy
    # machine): the rows of every decode step, and whether `gone` was cancelled before it began.
    steps: list[tuple[int, bool]] = []
    step = engine._step

    def watched(batch):
        steps.append((len(batch.rows), gone.cancelled))
        return step(batch)

    engine._step = watched
    engine.submit([gone, stays])
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while engine.stats["steps"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine.cancel(gone)
        rec.wait(1)
    finally:
        engine.close()
    assert "gone" not in rec.results and rec.results["stays"][0].completion_tokens == 40
    # the step under way when it was cancelled may still carry it; the next one does not
    after = [rows for rows, cancelled in steps if cancelled]
    assert after and after[0] <= 2 and all(rows == 1 for rows in after[1:]), steps


def test_incremental_detokenizer_never_splits_a_character():
    tok = make_tokenizer()  # byte-level: "é" is two tokens, "🙂" four
    text = "aé🙂 b"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces.count("") == len(ids) - len([p for p in pieces if p]) and pieces[1] == "" and pieces[2] == "é"


def test_the_engine_refuses_work_beyond_its_queue(model):
    from moa.engine import QueueFull

    engine = Engine(model, max_batch_size=1, max_queue=2)  # not started: nothing leaves the queue
    rec = Recorder(engine)
    engine.submit([rec.job(str(i), "hi") for i in range(2)])
    with pytest.raises(QueueFull):
        engine.submit([rec.job("3", "hi")])
    engine.close()
    assert all(isinstance(e, QueueFull) for _, e in rec.results.values()) and len(rec.results) == 2


def test_rows_of_different_models_run_side_by_side(model, routed_moa_dir):
    """After a reload, rows accepted for the old model finish on it while new rows run on the new one."""
    other = MoAModel.from_pretrained(routed_moa_dir)
    other.remove_expert("json")
    engine = Engine(model, max_batch_size=4)
    rec = Recorder(engine)
    prompt = ROUTED_PROMPTS["json"][2]
    old = rec.job("old", prompt, "json", Decoding(12, False, ignore_eos=True))
    new = rec.job("new", prompt, None, Decoding(12, False, ignore_eos=True))
    new.model = other
    engine.submit([old, new])
    engine.start()
    try:
        rec.wait(2)
    finally:
        engine.close()
    assert rec.results["old"][0].text == _alone(model, prompt, "json", max_new_tokens=12, ignore_eos=True).text
    assert rec.results["new"][0].domain in ("math", "echo")
    assert rec.results["new"][0].text == _alone(other, prompt, max_new_tokens=12, ignore_eos=True).text


def test_an_error_in_a_step_fails_its_rows_and_the_engine_goes_on(routed_moa_dir):
    model = MoAModel.from_pretrained(routed_moa_dir)
    broken = {"on": False}

    def maybe_fail(module, args, kwargs):
        if broken["on"] and kwargs["input_ids"].shape[1] == 1:  # decode steps only
            raise RuntimeError("device lost")

    handle = model.base_model.register_forward_pre_hook(maybe_fail, with_kwargs=True)
    engine = Engine(model, max_batch_size=4)
    rec = Recorder(engine)
    broken["on"] = True
    engine.submit([rec.job("a", ROUTED_PROMPTS["math"][0], "math", Decoding(8, False, ignore_eos=True)),
                   rec.job("b", ROUTED_PROMPTS["echo"][0], None, Decoding(8, False, ignore_eos=True))])
    engine.start()
    try:
        rec.wait(2)
        broken["on"] = False
        engine.submit([rec.job("c", ROUTED_PROMPTS["json"][0], None, Decoding(8, False, ignore_eos=True))])
        rec.wait(3)
    finally:
        engine.close()
        handle.remove()
    assert [str(rec.results[n][1]) for n in "ab"] == ["device lost", "device lost"]
    assert rec.results["c"][1] is None and rec.results["c"][0].completion_tokens == 8
