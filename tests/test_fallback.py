"""The out-of-domain fallback (moa.fallback): calibration round trip, routed prompts far from every
domain go to the base model (exactly its output), forced routing never falls back, the server and
the gateway report it, `--fallback` parsing, and checkpoints without calibration are unchanged."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from conftest import ROUTED_DOMAINS, ROUTED_PROMPTS, serving, synthetic_records, write_jsonl
from moa.checkpoint import CONFIG_FILE, load_routing_part
from moa.cli import main
from moa.data import read_records
from moa.errors import MoAError
from moa.fallback import FILE, calibrate_checkpoint, parse_fallback, set_fallback
from moa.generation import encode_prompts
from moa.model import MoAModel

FAR = "~~~ {{{ ]]] ||| ^^^ ``` ~~~ {{{ ]]] ||| ^^^ ``` ~~~ {{{ ]]] ||| ^^^ ```"
"""Nothing like the three synthetic prompt kinds (their characters do not even occur in them)."""
IN_DOMAIN = [p for d in ROUTED_DOMAINS for p in ROUTED_PROMPTS[d]]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback_data")
    train = read_records(write_jsonl(root / "train.jsonl", synthetic_records(16, seed=0)))[0]
    valid = read_records(write_jsonl(root / "valid.jsonl", synthetic_records(12, seed=5)))[0]
    return train, valid, root


@pytest.fixture(scope="module")
def calibrated_dir(routed_moa_dir, records, tmp_path_factory):
    """The routed tiny MoA with a distance fallback calibrated on the synthetic domains."""
    train, valid, _ = records
    out = tmp_path_factory.mktemp("calibrated") / "moa"
    summary = calibrate_checkpoint(routed_moa_dir, train, valid, out, progress=False)
    assert summary["method"] == "distance" and summary["valid_acceptance"] >= 0.99, summary
    return out


@pytest.fixture(scope="module")
def calibrated(calibrated_dir):
    return MoAModel.from_pretrained(calibrated_dir)


def test_calibration_round_trips_through_save_and_load(calibrated_dir, routed_moa_dir, calibrated, tmp_path):
    cfg = json.loads((calibrated_dir / CONFIG_FILE).read_text())
    block = cfg["fallback"]
    assert block["method"] == "distance" and block["file"] == FILE and block["domains"] == ROUTED_DOMAINS
    # every other file is the input checkpoint's, byte for byte
    for name in ("router.safetensors", "experts/math/adapter_model.safetensors"):
        assert (calibrated_dir / name).read_bytes() == (routed_moa_dir / name).read_bytes()
    fb = calibrated.fallback_calibration
    assert calibrated.fallback is fb and fb.threshold == block["threshold"]
    calibrated.save_pretrained(tmp_path / "again")
    again = MoAModel.from_pretrained(tmp_path / "again").fallback_calibration
    assert again.to_block() == fb.to_block()
    for k, t in fb.tensors().items():
        assert torch.equal(again.tensors()[k], t), k
    # the routing part (gateway) reads the same calibration
    part = load_routing_part(MoAModel, calibrated_dir)
    assert part.fallback is not None and part.fallback.threshold == fb.threshold


def test_a_far_prompt_falls_back_to_exactly_the_base_model(calibrated):
    res = calibrated.generate([FAR, *IN_DOMAIN], max_new_tokens=6)
    assert res[0].domain is None and res[0].router_probs is not None
    assert [r.domain for r in res[1:]] == [d for d in ROUTED_DOMAINS for _ in ROUTED_PROMPTS[d]]
    base = calibrated.generate([FAR], domains=[None], max_new_tokens=6)[0]
    assert res[0].text == base.text
    for how in ("vote", "last"):
        ids, mask = encode_prompts(calibrated, [FAR, IN_DOMAIN[0]])
        out = calibrated(input_ids=ids, attention_mask=mask, routing=how)
        want = calibrated(input_ids=ids, attention_mask=mask, domain_ids=torch.tensor([-1, 0]))
        assert out.domains == [None, "math"]
        assert torch.equal(out.logits, want.logits)
        assert calibrated.route(ids, mask, routing=how)[0].tolist() == [-1, 0]


def test_forced_and_layer_routing_never_fall_back(calibrated):
    for d in ROUTED_DOMAINS:
        assert calibrated.generate([FAR], domains=[d], max_new_tokens=2)[0].domain == d
    ids, mask = encode_prompts(calibrated, [FAR])
    assert calibrated.route(ids, mask, routing="layer")[0].tolist() != [-1]


def test_fallback_off_and_a_checkpoint_without_calibration_route_as_before(calibrated, routed_moa_dir):
    plain = MoAModel.from_pretrained(routed_moa_dir)
    assert plain.fallback is None and plain.fallback_calibration is None
    assert "fallback" not in json.loads((routed_moa_dir / CONFIG_FILE).read_text())
    ids, mask = encode_prompts(plain, [FAR, *IN_DOMAIN])
    before = plain.route(ids, mask)[0]
    assert before.min() >= 0
    try:
        set_fallback(calibrated, "off")
        assert torch.equal(calibrated.route(ids, mask)[0], before)
        set_fallback(calibrated, 1.0)  # the largest in-domain validation score: the far prompt is still out
        assert calibrated.fallback.threshold == float(calibrated.fallback_calibration.valid_scores.max())
        assert calibrated.route(ids, mask)[0][0] == -1
    finally:
        set_fallback(calibrated, "auto")
    with pytest.raises(MoAError, match="no fallback calibration"):
        set_fallback(plain, 0.9)
    set_fallback(plain, "auto")  # auto without a calibration: off
    assert plain.fallback is None


@pytest.mark.parametrize("bad", ["on", "0", "1.5", "-0.1", "nan", ""])
def test_bad_fallback_values_are_one_line_errors(bad, routed_moa_dir, tmp_path, capsys):
    with pytest.raises(MoAError, match="--fallback must be off, auto or a number"):
        parse_fallback(bad)
    assert main(["generate", "hi", "--moa", str(routed_moa_dir), f"--fallback={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moa: error: --fallback must be") and err.count("\n") == 1


def test_a_threshold_on_a_checkpoint_without_calibration_exits_2(routed_moa_dir, capsys):
    assert main(["generate", "Add 1 and 2.", "--moa", str(routed_moa_dir), "--fallback", "0.9",
                 "--max-new-tokens", "2"]) == 2
    assert "no fallback calibration" in capsys.readouterr().err


def test_cli_calibrates_in_place_and_generate_reports_the_fallback(routed_moa_dir, records, tmp_path, capsys):
    _, _, root = records
    moa = tmp_path / "moa"
    shutil.copytree(routed_moa_dir, moa)
    assert main(["calibrate", "--moa", str(moa), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--acceptance", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["valid_acceptance"] == 1.0 and summary["out"] == str(moa)
    assert (moa / FILE).is_file()
    assert main(["generate", FAR, "--moa", str(moa), "--json", "--max-new-tokens", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["domain"] is None and out["fallback"] is True and out["routing"] == "vote"
    assert main(["generate", FAR, "--moa", str(moa), "--json", "--max-new-tokens", "2", "--fallback", "off"]) == 0
    assert json.loads(capsys.readouterr().out)["fallback"] is False
    # route: in-domain prompts keep their expert; the report counts fallbacks
    assert main(["route", "--moa", str(moa), "--data", str(root / "valid.jsonl"), "--out",
                 str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"] >= 0.99 and report["fallback"] == 0.0
    # remove-expert drops the stale calibration and says so
    assert main(["remove-expert", "--moa", str(moa), "--domain", "json", "--out", str(tmp_path / "less")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fallback_dropped"] is True
    assert "fallback calibration is dropped" in captured.err
    assert "fallback" not in json.loads((tmp_path / "less" / CONFIG_FILE).read_text())
    assert MoAModel.from_pretrained(tmp_path / "less").fallback is None


def test_calibration_errors_name_the_problem(routed_moa_dir, records):
    train, valid, _ = records
    with pytest.raises(MoAError, match="unknown fallback method"):
        calibrate_checkpoint(routed_moa_dir, train, valid, method="magic", progress=False, out="/nonexistent/x")
    other = [r for r in train if r.domain != "json"]
    model = MoAModel.from_pretrained(routed_moa_dir)
    from moa.fallback import calibrate

    with pytest.raises(MoAError, match="no prompt of domain"):
        calibrate(model, other, valid, progress=False)
    with pytest.raises(MoAError, match="layers must be integers from 0 to 1"):
        calibrate(model, train, valid, layers=[5], progress=False)


# --------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def served(calibrated):
    from moa.serve import create_app

    app = create_app(calibrated, max_batch_size=8, max_new_tokens_limit=16)
    with serving(app) as url:
        yield url


def _chat(client, content, model="moa", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=6, **kw)


def test_the_server_reports_domain_null_and_the_fallback_flag(served, calibrated):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)
    r = _chat(client, FAR)
    moa = r.model_extra["moa"]
    assert moa["domain"] is None and moa["fallback"] is True and moa["routing"] == "vote"
    assert r.choices[0].message.content == _chat(client, FAR, model="base").choices[0].message.content
    chunks = list(_chat(client, FAR, stream=True))
    assert all(c.model_extra["moa"]["fallback"] is True and c.model_extra["moa"]["domain"] is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    inside = _chat(client, ROUTED_PROMPTS["echo"][0]).model_extra["moa"]
    assert inside["domain"] == "echo" and inside["fallback"] is False
    forced = _chat(client, FAR, model="moa:json").model_extra["moa"]
    assert forced["domain"] == "json" and forced["fallback"] is False
    base = _chat(client, FAR, model="base").model_extra["moa"]
    assert base["domain"] is None and base["fallback"] is False


def test_the_gateway_sends_fallbacks_to_the_upstream_base_model(calibrated_dir, served):
    from moa.gateway import create_gateway_app, default_base_model

    assert default_base_model("moa:{domain}") == "base" and default_base_model("llama-{domain}") == "llama"
    part = load_routing_part(MoAModel, calibrated_dir)
    with pytest.raises(MoAError, match="--upstream-base-model"):
        create_gateway_app(part, [served], template="{domain}")
    with serving(create_gateway_app(part, [served], template="moa:{domain}")) as gw:
        client = openai.OpenAI(base_url=f"{gw}/v1", api_key="unused", max_retries=0, timeout=60)
        r = _chat(client, FAR)
        assert r.model_extra["moa"]["domain"] is None and r.model_extra["moa"]["fallback"] is True
        upstream = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)
        assert r.choices[0].message.content == _chat(upstream, FAR, model="base").choices[0].message.content
        assert _chat(client, ROUTED_PROMPTS["math"][1]).model_extra["moa"] == {
            **_chat(client, ROUTED_PROMPTS["math"][1]).model_extra["moa"], "domain": "math", "fallback": False}


@pytest.mark.parametrize("method", ["msp", "energy"])
def test_router_confidence_methods_calibrate_and_need_the_same_routers(routed_moa_dir, records, method):
    from moa.fallback import calibrate

    train, valid, _ = records
    model = MoAModel.from_pretrained(routed_moa_dir)
    fb = calibrate(model, train, valid, method=method, progress=False)
    assert fb.method == method and fb.layer is None and fb.centroids is None
    assert fb.calibration["valid_acceptance"] >= 0.99 and fb.calibration["route_layers"] == model.num_layers
    model.fallback_calibration = fb
    set_fallback(model, "auto")
    ids, mask = encode_prompts(model, IN_DOMAIN)
    assert (model.route(ids, mask)[0] >= 0).all()
    model.route_layers = 1
    with pytest.raises(MoAError, match="calibrated on the routers of 2 layers"):
        set_fallback(model, "auto")


# --------------------------------------------------------------------------- reference prompts (the margin)


def test_the_reference_margin_lies_in_the_gap_and_never_below_the_in_domain_threshold():
    from moa.fallback import REFERENCE_QUANTILE, reference_margin

    far = torch.linspace(8.0, 20.0, 100)
    threshold, info = reference_margin(2.0, far)
    near = float(far.quantile(REFERENCE_QUANTILE))
    assert threshold == pytest.approx((2.0 * near) ** 0.5) and 2.0 < threshold < near
    assert info["reference_rejection"] == 1.0 and info["margin"] > 0 and info["n_references"] == 100
    # references that overlap the domains: no margin, the in-domain threshold stands
    overlap = torch.linspace(1.0, 5.0, 100)
    threshold, info = reference_margin(2.0, overlap)
    assert threshold == 2.0 and info["margin"] == 0 and 0 < info["reference_rejection"] < 1
    # scores of any sign (energy): the arithmetic middle
    assert reference_margin(-4.0, torch.full((10,), -2.0))[0] == pytest.approx(-3.0)


def test_references_break_the_layer_tie_and_keep_a_new_in_domain_prompt():
    from moa.fallback import fit_fallback

    g = torch.Generator().manual_seed(0)
    E, H = 2, 8
    centres = torch.tensor([[0.0] * H, [4.0] * H])

    def domain_points(n):
        y = torch.arange(n) % E
        return centres[y] + torch.randn(n, H, generator=g), y

    xtr, ytr = domain_points(200)
    xva, yva = domain_points(40)
    refs_far = torch.randn(50, H, generator=g) + 30.0  # layer 0: the references are far from both domains
    refs_near = centres[torch.arange(50) % E] + torch.randn(50, H, generator=g)  # layer 1: they are not
    ftr, fva, fref = {0: xtr, 1: xtr}, {0: xva, 1: xva}, {0: refs_far, 1: refs_near}
    lva = torch.zeros(len(yva), 1, E)
    plain = fit_fallback(["a", "b"], "distance", 1.0, ftr, ytr, lva, fva, yva)
    fb = fit_fallback(["a", "b"], "distance", 1.0, ftr, ytr, lva, fva, yva, fref=fref)
    # the layers tie on held-out domains (same in-domain features): without references the deepest is kept
    assert plain.layer == 1 and plain.threshold == pytest.approx(float(plain.valid_scores.max()))
    assert fb.layer == 0 and fb.calibration["reference_rejection_by_layer"] == {"0": 1.0,
                                                                                "1": pytest.approx(0.0, abs=0.1)}
    start = fb.calibration["in_domain_threshold"]
    assert start == pytest.approx(plain.threshold) and fb.threshold > start
    # a new in-domain prompt a little beyond every validation prompt keeps its expert with the margin only
    new = (centres[0] + float(start) ** 0.5 * 1.15 * torch.ones(H))[None]  # standardized distance ~1.3x start
    score = float(fb.score([torch.zeros(1, E)], {0: new}, "vote"))
    assert plain.threshold < score <= fb.threshold
    assert fb.calibration["valid_acceptance"] == 1.0 and fb.calibration["reference_rejection"] == 1.0


def test_calibrate_cli_takes_references_default_none_or_a_file(routed_moa_dir, records, tmp_path, capsys):
    _, _, root = records
    base = ["calibrate", "--moa", str(routed_moa_dir), "--train", str(root / "train.jsonl"), "--valid",
            str(root / "valid.jsonl")]
    runs = {}
    for name, refs in (("default", []), ("none", ["--references", "none"]),
                       ("file", ["--references", str(write_jsonl(tmp_path / "far.jsonl", [{"prompt": FAR}] * 4))])):
        assert main(base + ["--out", str(tmp_path / name)] + refs) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert runs["default"]["n_references"] == 100 and "n_references" not in runs["none"]
    assert runs["file"]["n_references"] == 4 and runs["file"]["reference_rejection"] == 1.0
    assert runs["file"]["threshold"] >= runs["file"]["in_domain_threshold"] == pytest.approx(runs["none"]["threshold"])
    assert main(base + ["--out", str(tmp_path / "bad"), "--references", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "reference prompts" in err and "missing.jsonl" in err and not (tmp_path / "bad").exists()


def test_the_bundled_references_are_not_the_prompts_that_measure_the_fallback():
    from pathlib import Path

    from moa.fallback import reference_prompts

    refs = reference_prompts()
    assert len(refs) == 100 and all(m[-1]["role"] == "user" and m[-1]["content"].strip() for m in refs)
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "generic_prompts.jsonl"
    measured = {json.loads(line)["prompt"] for line in bench.read_text().splitlines() if line.strip()}
    assert not measured & {m[-1]["content"] for m in refs}


@pytest.mark.parametrize("fallback", ["off", "auto"])
def test_eval_hands_back_the_routing_of_its_scoring(calibrated_dir, tmp_path, fallback):
    """`run_eval(routed=...)` gives the domain the moa system's scoring routed each record to (None:
    the fallback's base model): the decisions of a routing pass over the prompts (`route_records`),
    so `moa fit` needs no such pass."""
    from moa.data import encode_records
    from moa.evaluate import route_records, run_eval

    rows = synthetic_records(4, seed=7) + [{"prompt": FAR, "response": "none", "domain": "math"}]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    routed = {}
    run_eval(calibrated_dir, path, tmp_path / "eval", ["moa"], generate=False, progress=False, routed=routed,
             fallback=fallback)
    records, _ = read_records(path)
    model = MoAModel.from_pretrained(calibrated_dir)
    set_fallback(model, fallback)
    examples, _ = encode_records(model.tokenizer, records, 1024)
    preds, _ = route_records(model, examples, "vote", progress=False)
    assert list(routed) == ["moa"] and len(preds) == len(records)
    assert routed["moa"] == preds
    assert (preds[-1] is None) == (fallback == "auto")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "_routed" not in metrics["systems"]["moa"]
