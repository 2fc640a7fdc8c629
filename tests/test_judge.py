"""moa judge against a real `moa serve` (uvicorn on a loopback port, the OpenAI API over HTTP).

A tiny random model cannot write verdicts, so the served model is a stand-in judge behind the
real app (as test_serve's queue tests do): it reads the rendered judge prompt, prefers the answer
that matches the reference, and misbehaves on marked answers the way real judges do (position
bias, an unparseable reply, a 500) so the win/tie/loss/invalid logic, the verdict retry and the
HTTP retry run through the real client and server.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from conftest import synthetic_records, write_jsonl
from moa.cli import main
from moa.model import GenerationResult
from moa.serve import create_app
from moa.testing import make_tokenizer
from test_serve import serving

SECTION = r"\[The Start of {name}\]\n(.*?)\n\[The End of {name}\]"


def section(text: str, name: str) -> str | None:
    m = re.search(SECTION.format(name=re.escape(name)), text, re.S)
    return m.group(1) if m else None


class StubJudge:
    """Stands in for the judge LLM: the rules below, applied to the default templates' sections.

    Pairwise: the answer equal to the reference wins ("[[A]]"/"[[B]]"), else "[[C]]". Answers
    marked BIASED get "[[A]]" whatever the order; GARBLE gets no verdict, ever; FLAKY gets no
    verdict the first time a prompt is asked; BUSY makes the first call of a prompt fail (HTTP 500).
    Single: "[[9]]" for an answer equal to the reference, else "[[2]]" (GARBLE: no rating).
    """

    domains = ["judge"]

    def __init__(self):
        self.tokenizer = make_tokenizer()
        self.calls: Counter[str] = Counter()
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    def generate(self, prompts, routing=None, domains=None, max_new_tokens=16, **kw):
        out = []
        for p in prompts:
            text = p[-1]["content"]
            with self.lock:
                self.calls[text] += 1
                self.prompts.append(text)
                first_time = self.calls[text] == 1
            reply = self.reply(text, first_time)
            out.append(GenerationResult(text=reply, domain="judge", router_probs={"judge": 1.0},
                                        prompt_tokens=len(text), completion_tokens=5, finish_reason="stop"))
        return out

    @staticmethod
    def reply(text: str, first_time: bool) -> str:
        ref = section(text, "Reference Answer")
        answers = [section(text, "Assistant A's Answer"), section(text, "Assistant B's Answer")]
        if answers[0] is None:
            answers = [section(text, "Assistant's Answer")]
        marks = " ".join(answers)
        if "BUSY" in marks and first_time:
            raise RuntimeError("judge overloaded")
        if "GARBLE" in marks or ("FLAKY" in marks and first_time):
            return "Both answers have merit; I cannot decide."
        if len(answers) == 1:
            return "Explanation: ... Rating: [[9]]" if answers[0] == ref else "Explanation: ... Rating: [[2]]"
        if "BIASED" in marks:
            return "The first answer is better. [[A]]"
        right = [a == ref for a in answers]
        verdict = "A" if right == [True, False] else "B" if right == [False, True] else "C"
        return f"Assistant A says {answers[0]!r}, B says {answers[1]!r}. Final verdict: [[{verdict}]]"


# (domain, reference, answer of moa, answer of mixed_lora, the pair's outcome for moa by the rules above)
CASES = [
    ("math", "7", "7", "8", "win"),
    ("math", "46", "46", "45", "win"),
    ("math", "39", "40", "39", "loss"),
    ("math", "12", "12", "12", "tie"),
    ("echo", "apple apple apple", "apple apple apple", "apple", "win"),
    ("echo", "tiger tiger tiger", "tiger BIASED", "tiger tiger tiger", "tie"),  # [[A]] in both orders
    ("echo", "cloud cloud cloud", "cloud cloud cloud", "FLAKY cloud", "win"),
    ("echo", "maple maple maple", "GARBLE", "maple", "invalid"),
    ("json", '{"key": "k1", "n": 1}', '{"key": "k1"}', '{"key": "k1", "n": 1}', "loss"),
    ("json", '{"key": "k2", "n": 2}', '{"key": "k2", "n": 2}', "BUSY", "win"),
    ("json", '{"key": "k3", "n": 3}', "k3", "{}", "tie"),
]


def write_generations(path: Path, cases=CASES, systems=("moa", "mixed_lora", "base")) -> Path:
    """generations.jsonl as `moa eval` writes it: one line per (system, record)."""
    rows = []
    for s_i, system in enumerate(systems):
        for i, (domain, ref, a, b, _) in enumerate(cases):
            output = [a, b, "base says hi"][s_i]
            rows.append({"system": system, "index": i, "domain": domain,
                         "prompt": [{"role": "user", "content": f"question {i} of {domain}"}],
                         "reference": ref, "output": output, "routed": None})
    return write_jsonl(path, rows)


@pytest.fixture
def judge_server():
    stub = StubJudge()
    # batch size 1: a failing generate answers 500 (the batcher retries larger batches row by row)
    app = create_app(stub, max_batch_size=1, max_queue=64, api_key="sekret")
    with serving(app) as url:
        yield f"{url}/v1", stub


def judge_args(gens, out, url, *extra):
    return ["judge", "--generations", str(gens), "--a", "moa", "--b", "mixed_lora", "--out", str(out),
            "--judge-url", url, "--judge-model", "moa", "--judge-api-key-env", "MOA_TEST_JUDGE_KEY",
            "--retry-backoff", "0.01", "--concurrency", "3", *map(str, extra)]


def test_pairwise_judge_both_orders_agreement_retries_and_cache(tmp_path, judge_server, monkeypatch, capsys):
    url, stub = judge_server
    monkeypatch.setenv("MOA_TEST_JUDGE_KEY", "sekret")
    gens = write_generations(tmp_path / "generations.jsonl")
    out = tmp_path / "judge"
    assert main(judge_args(gens, out, url)) == 0

    summary = json.loads((out / "summary.json").read_text())
    expected: dict[str, Counter] = {}
    for domain, _, _, _, outcome in CASES:
        c = expected.setdefault(domain, Counter())
        c["pairs"] += 1
        c["tie" if outcome == "invalid" else outcome] += 1
        c["invalid"] += outcome == "invalid"
    for domain, c in expected.items():
        got = summary["domains"][domain]
        assert got == {k: c[k] for k in ("win", "tie", "loss", "invalid", "pairs")}, (domain, got)
        assert got["win"] + got["tie"] + got["loss"] == got["pairs"]
    o = summary["overall"]
    assert o["pairs"] == len(CASES) == summary["pairs"] and o["win"] == sum(c["win"] for c in expected.values())
    lo, hi = o["win_rate_ci95"]
    assert 0 <= lo < o["win_rate"] == round(o["win"] / len(CASES), 4) < hi <= 1

    # every pair judged in both orders, with the answers swapped
    judgments = [json.loads(line) for line in open(out / "judgments.jsonl")]
    assert len(judgments) == 2 * len(CASES)
    for i, (_, _, a, b, _) in enumerate(CASES):
        rows = {j["order"]: j for j in judgments if j["index"] == str(i)}
        assert (rows["ab"]["A"], rows["ab"]["B"], rows["ba"]["A"], rows["ba"]["B"]) == \
            ("moa", "mixed_lora", "mixed_lora", "moa")
        for order, first, second in (("ab", a, b), ("ba", b, a)):
            assert any(section(p, "Assistant A's Answer") == first and section(p, "Assistant B's Answer") == second
                       and f"question {i} of" in p for p in stub.prompts), (i, order)
    biased = [j for j in judgments if j["index"] == "5"]
    assert {j["verdict"] for j in biased} == {"A"} and {j["winner"] for j in biased} == {"moa", "mixed_lora"}
    flaky = [j for j in judgments if j["index"] == "6"]
    assert [j["attempts"] for j in flaky] == [2, 2] and {j["winner"] for j in flaky} == {"moa"}
    garbled = [j for j in judgments if j["index"] == "7"]
    assert [(j["attempts"], j["verdict"], j["winner"]) for j in garbled] == [(2, "invalid", None)] * 2
    assert summary["invalid_judgments"] == 2
    # requests: one per distinct prompt (a pair of equal answers reads the same in both orders), one more per
    # verdict retry (FLAKY, GARBLE: 2 orders each) and per 500 (BUSY: 2 orders)
    distinct = len({(i, first, second) for i, (_, _, a, b, _) in enumerate(CASES) for first, second in ((a, b), (b, a))})
    assert distinct == 2 * len(CASES) - 1
    assert summary["new_requests"] == sum(stub.calls.values()) == distinct + 2 + 2 + 2
    assert "| math | 2 | 1 | 1 | 0 | 4 |" in capsys.readouterr().out

    # a second run sends nothing and reports the same judgments
    sent = sum(stub.calls.values())
    assert main(judge_args(gens, out, url)) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["new_requests"] == 0 and sum(stub.calls.values()) == sent
    assert {k: v for k, v in again.items() if k != "new_requests"} == \
        {k: v for k, v in summary.items() if k != "new_requests"}
    # another template is another judgment: judged again
    custom = tmp_path / "template.txt"
    custom.write_text("Judge this. " + (Path(__file__).parents[1] / "src/moa/judge_templates/pairwise.txt").read_text())
    assert main(judge_args(gens, out, url, "--template", custom)) == 0
    assert json.loads((out / "summary.json").read_text())["new_requests"] >= 2 * len(CASES)


def test_single_answer_grading(tmp_path, judge_server, monkeypatch):
    url, stub = judge_server
    monkeypatch.setenv("MOA_TEST_JUDGE_KEY", "sekret")
    gens = write_generations(tmp_path / "generations.jsonl")
    out = tmp_path / "single"
    assert main(judge_args(gens, out, url, "--mode", "single")) == 0
    summary = json.loads((out / "summary.json").read_text())
    for s_i, system in enumerate(("moa", "mixed_lora")):
        for domain in ("math", "echo", "json"):
            answers = [(c[1], c[2 + s_i]) for c in CASES if c[0] == domain]
            valid = [9.0 if ans == ref else 2.0 for ref, ans in answers if "GARBLE" not in ans]
            got = summary["domains"][domain][system]
            assert got["n"] == len(valid) and got["mean"] == pytest.approx(sum(valid) / len(valid), abs=1e-4)
            assert got["invalid"] == sum("GARBLE" in ans for _, ans in answers)
    judgments = [json.loads(line) for line in open(out / "judgments.jsonl")]
    assert len(judgments) == 2 * len(CASES) and all(j["score"] is None or 1 <= j["score"] <= 10 for j in judgments)


def test_moa_eval_judges_its_generations(tmp_path, tiny_base, judge_server, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model

    from moa.base import load_base
    from moa.model import MoAModel

    url, stub = judge_server
    monkeypatch.setenv("MOA_TEST_JUDGE_KEY", "sekret")
    dirs = []
    for seed, domain in enumerate(["math", "echo", "json"]):
        base, _ = load_base(tiny_base)
        torch.manual_seed(seed)
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False)).save_pretrained(tmp_path / domain)
        dirs.append(tmp_path / domain)
    moa = MoAModel.from_adapters(dirs, domains=["math", "echo", "json"], base=tiny_base).save_pretrained(tmp_path / "moa")
    data = write_jsonl(tmp_path / "test.jsonl", synthetic_records(2))
    out = tmp_path / "eval"
    assert main(["eval", "--moa", str(moa), "--data", str(data), "--out", str(out), "--systems", "base", "moa",
                 "--max-new-tokens", "3", "--judge-url", url, "--judge-model", "moa", "--judge-b", "base",
                 "--judge-api-key-env", "MOA_TEST_JUDGE_KEY", "--judge-retry-backoff", "0.01"]) == 0
    gens = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert {g["system"] for g in gens} == {"base", "moa"} and all(g["prompt"] and "index" in g for g in gens)
    summary = json.loads((out / "judge" / "summary.json").read_text())
    assert summary["a"] == "moa" and summary["b"] == "base" and summary["pairs"] == 6
    assert {d: c["pairs"] for d, c in summary["domains"].items()} == {"math": 2, "echo": 2, "json": 2}
    assert all(c["win"] + c["tie"] + c["loss"] == c["pairs"] for c in summary["domains"].values())
    judgments = [json.loads(line) for line in open(out / "judge" / "judgments.jsonl")]
    assert sorted((j["index"], j["order"]) for j in judgments) == sorted(
        (str(g["index"]), o) for g in gens if g["system"] == "moa" for o in ("ab", "ba"))
    # both orders of every pair went to the server, each distinct prompt once (the test set repeats records)
    by = {(g["system"], g["index"]): g for g in gens}
    prompts = {(json.dumps(g["prompt"]), g["reference"], first, second)
               for (s, i), g in by.items() if s == "moa"
               for first, second in ((g["output"], by["base", i]["output"]), (by["base", i]["output"], g["output"]))}
    assert summary["new_requests"] == len(prompts) > len(gens) / 2
    for g in gens:  # the judge saw the test set's questions and references
        assert any(f"[User Question]\n{g['prompt'][0]['content']}\n" in p and g["reference"] in p for p in stub.prompts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_user_mistakes_are_one_line_errors(tmp_path, judge_server, capsys, monkeypatch):
    url, _ = judge_server
    gens = write_generations(tmp_path / "generations.jsonl")
    bad_json = write_jsonl(tmp_path / "bad.jsonl", [json.loads(l) for l in open(gens)][:1] + ["{oops"])
    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"system": "moa", "domain": "d", "reference": "r",
                                                            "output": "o"}])
    no_placeholder = tmp_path / "t.txt"
    no_placeholder.write_text("Which is better, {answer_a} or {answer_b}?")
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    cases = [
        (judge_args(gens, tmp_path / "o1", dead), "cannot reach the judge endpoint"),
        (judge_args(gens, tmp_path / "o2", "ftp://example.com/v1"), "--judge-url 'ftp://example.com/v1' is not"),
        (judge_args(gens, tmp_path / "o3", "localhost:8000"), "is not an http(s) URL"),
        (judge_args(gens, tmp_path / "o4", url, "--b", "nope"), "system 'nope' is not in"),
        (judge_args(bad_json, tmp_path / "o5", url), f"{bad_json}:2: invalid JSON"),
        (judge_args(no_prompt, tmp_path / "o6", url), f"{no_prompt}:1: field 'prompt'"),
        (judge_args(gens, tmp_path / "o7", url, "--template", no_placeholder), "lacks the placeholder(s) {question}"),
        (judge_args(gens, tmp_path / "o8", url), "HTTP 401"),
        (judge_args(gens, tmp_path / "o9", url), "$MOA_TEST_JUDGE_KEY is not set"),
    ]
    monkeypatch.delenv("MOA_TEST_JUDGE_KEY", raising=False)
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("moa: error: ") and message in err[-1], (message, err)
