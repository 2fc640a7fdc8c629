"""The CLI pipeline on a tiny model: stage 1 -> assemble -> stage 2 -> route / generate / score,
and the incremental commands (add / remove / retrain an expert)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_records, write_jsonl
from moa import MoAModel
from moa.cli import main

FAST = ["--batch-size", "6", "--no-bf16"]


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("pipe")
    train = write_jsonl(root / "train.jsonl", synthetic_records(24, seed=1))
    test = write_jsonl(root / "test.jsonl", synthetic_records(10, seed=2))
    experts = []
    for d in ("math", "echo", "json"):
        assert cli("train-expert", "--data", train, "--domain", d, "--out", root / "experts" / d, "--base", tiny_base,
                   "--max-steps", "6", "--lr", "5e-3", *FAST) == 0
        experts.append(root / "experts" / d)
    assert cli("assemble", "--experts", *experts, "--out", root / "moa0", "--base", tiny_base) == 0
    assert cli("train", "--moa", root / "moa0", "--data", train, "--out", root / "moa1", "--max-steps", "40",
               "--router-lr", "1e-2", "--lr", "1e-3", *FAST) == 0
    return {"root": root, "train": train, "test": test, "base": tiny_base}


def test_assembled_checkpoint_layout(pipeline):
    moa0 = pipeline["root"] / "moa0"
    cfg = json.loads((moa0 / "moa_config.json").read_text())
    assert cfg["domains"] == ["math", "echo", "json"]
    assert {"format_version", "base", "target_modules", "experts", "router", "eta", "routing_default"} <= set(cfg)
    for d in cfg["domains"]:
        assert (moa0 / "experts" / d / "adapter_config.json").is_file()
        assert (moa0 / "experts" / d / "adapter_model.safetensors").is_file()
    assert (moa0 / "router.safetensors").is_file()


def test_eval_of_the_stage2_checkpoint_finds_its_stage1_experts(pipeline, capsys):
    """single_lora needs no --single-lora: stage 2 keeps the assembled checkpoint's provenance."""
    root = pipeline["root"]
    assert cli("eval", "--moa", root / "moa1", "--data", pipeline["test"], "--out", root / "eval",
               "--systems", "single_lora", "moa", "--limit", "2", "--no-generate") == 0
    assert "skipping single_lora" not in capsys.readouterr().err
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(m["systems"]) == {"single_lora", "moa"}
    assert m["records_per_domain"] == {"math": 2, "echo": 2, "json": 2}
    for d in ("math", "echo", "json"):
        assert m["systems"]["single_lora"][d]["ppl"] > 1.0


def test_stage2_routes_a_separable_set_and_logs(pipeline, capsys):
    root = pipeline["root"]
    log = [json.loads(l) for l in open(root / "moa1" / "train_log.jsonl")]
    assert {"lm_loss", "router_loss", "router_acc", "router_acc_l0", "router_acc_l1"} <= set(log[-1])
    assert log[-1]["router_loss"] < log[0]["router_loss"]
    assert (root / "moa1" / "loss.png").is_file()
    capsys.readouterr()
    assert cli("route", "--moa", root / "moa1", "--data", pipeline["test"], "--out", root / "route.json") == 0
    report = json.loads((root / "route.json").read_text())
    assert report["accuracy"] >= 0.95, report
    assert set(report["per_domain"]) == {"math", "echo", "json"}
    assert sum(sum(r.values()) for r in report["confusion"].values()) == 30
    assert (root / "route.png").is_file()


def test_generate_and_score_with_routing(pipeline, capsys):
    root = pipeline["root"]
    capsys.readouterr()
    assert cli("generate", "--moa", root / "moa1", "--json", "--max-new-tokens", "5", "REPEAT: stone stone") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["domain"] == "echo" and set(out["router_probs"]) == {"math", "echo", "json"}
    assert cli("score", "--moa", root / "moa1", "--data", pipeline["test"], "--out", root / "s.jsonl") == 0
    rows = [json.loads(l) for l in open(root / "s.jsonl")]
    assert all("domain_routed" in r and r["router_probs"] for r in rows)
    assert sum(r["domain_routed"] == r["domain"] for r in rows) >= 0.95 * len(rows)


def test_router_only_keeps_experts_bitwise(pipeline):
    root = pipeline["root"]
    assert cli("train", "--moa", root / "moa0", "--data", pipeline["train"], "--out", root / "ro", "--router-only",
               "--max-steps", "3", *FAST) == 0
    a, b = MoAModel.from_pretrained(root / "moa0"), MoAModel.from_pretrained(root / "ro")
    for d in a.domains:
        ea, eb = a.expert_state_dict(d), b.expert_state_dict(d)
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert any(not torch.equal(x, y) for x, y in zip(a.router_state_dict().values(), b.router_state_dict().values()))


def test_add_remove_retrain_expert(pipeline, tmp_path):
    root = pipeline["root"]
    # a 4th domain, trained elsewhere as a plain PEFT adapter on its own records
    new = [{"domain": "shout", "prompt": f"shout {w}", "response": w.upper() + "!"}
           for w in ["cat", "dog", "sun", "moon", "tree", "lake", "bird", "fish"] * 3]
    new_data = write_jsonl(tmp_path / "shout.jsonl", new)
    replay = write_jsonl(tmp_path / "replay.jsonl", synthetic_records(12, seed=5) + new)
    assert cli("train-expert", "--data", new_data, "--domain", "shout", "--out", tmp_path / "shout", "--base",
               pipeline["base"], "--max-steps", "4", "--rank", "4", "--alpha", "4", "--targets", "q_proj,v_proj",
               *FAST) == 0
    assert cli("add-expert", "--moa", root / "moa1", "--domain", "shout", "--adapter", tmp_path / "shout",
               "--data", replay, "--out", tmp_path / "moa2", "--max-steps", "40", "--batch-size", "8",
               "--router-lr", "1e-2") == 0
    old, added = MoAModel.from_pretrained(root / "moa1"), MoAModel.from_pretrained(tmp_path / "moa2")
    assert added.domains == ["math", "echo", "json", "shout"]
    for d in old.domains:
        ea, eb = old.expert_state_dict(d), added.expert_state_dict(d)
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    test = write_jsonl(tmp_path / "test4.jsonl", synthetic_records(6, seed=9) + new[:6])
    assert cli("route", "--moa", tmp_path / "moa2", "--data", test, "--out", tmp_path / "r4.json") == 0
    assert json.loads((tmp_path / "r4.json").read_text())["accuracy"] >= 0.95

    assert cli("remove-expert", "--moa", tmp_path / "moa2", "--domain", "echo", "--out", tmp_path / "moa3") == 0
    removed = MoAModel.from_pretrained(tmp_path / "moa3")
    assert removed.domains == ["math", "json", "shout"]
    test3 = write_jsonl(tmp_path / "test3.jsonl", [r for r in synthetic_records(6, seed=9) if r["domain"] != "echo"] + new[:6])
    assert cli("route", "--moa", tmp_path / "moa3", "--data", test3, "--out", tmp_path / "r3.json") == 0
    assert json.loads((tmp_path / "r3.json").read_text())["accuracy"] >= 0.95

    assert cli("retrain-expert", "--moa", root / "moa1", "--domain", "math", "--data", pipeline["train"],
               "--out", tmp_path / "moa4", "--max-steps", "3", "--router-steps", "3", "--batch-size", "6") == 0
    re = MoAModel.from_pretrained(tmp_path / "moa4")
    for d in ("echo", "json"):
        ea, eb = old.expert_state_dict(d), re.expert_state_dict(d)
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    em_old, em_new = old.expert_state_dict("math"), re.expert_state_dict("math")
    assert any(not torch.equal(em_old[k], em_new[k]) for k in em_old)


def test_add_expert_shape_mismatch_is_a_clear_error(pipeline, tmp_path, capsys):
    from moa.testing import make_tiny_base

    other = make_tiny_base(tmp_path / "wide", hidden_size=96, intermediate_size=160, num_heads=4, num_kv_heads=2)
    data = write_jsonl(tmp_path / "d.jsonl", [{"domain": "x", "prompt": "p", "response": "r"}] * 4)
    assert cli("train-expert", "--data", data, "--domain", "x", "--out", tmp_path / "x", "--base", other,
               "--max-steps", "1", "--batch-size", "4", "--no-bf16") == 0
    capsys.readouterr()
    rc = cli("add-expert", "--moa", pipeline["root"] / "moa1", "--domain", "x", "--adapter", tmp_path / "x",
             "--data", pipeline["train"], "--out", tmp_path / "bad")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("moa: error: ") and "Traceback" not in err
    assert not (tmp_path / "bad" / "moa_config.json").exists()


def test_expert_lr_scaling_scales_each_experts_update(pipeline, tmp_path, capsys):
    """One stage-2 step with --expert-lr-scaling tokens moves each expert by exactly its
    square-root-rule multiple of the unscaled step (same batch, same Adam state)."""
    from moa.base import load_tokenizer
    from moa.data import encode_records, read_records

    root = pipeline["root"]
    runs = {}
    for mode in ("none", "tokens"):
        out = tmp_path / mode
        assert cli("train", "--moa", root / "moa0", "--data", pipeline["train"], "--out", out, "--max-steps", "1",
                   "--lr", "1e-3", "--expert-lr-scaling", mode, *FAST) == 0
        runs[mode] = MoAModel.from_pretrained(out)
    assert "--expert-lr-scaling tokens: expert lr = 0.001 x" in capsys.readouterr().err
    start = MoAModel.from_pretrained(root / "moa0")
    # Expected multipliers, counted here from the tokenized records: sqrt(share * tokens_d / tokens_all).
    records, _ = read_records(pipeline["train"])
    examples, _ = encode_records(load_tokenizer(pipeline["base"]), records, 512)
    count = {d: [sum(l != -100 for l in e.labels[1:]) for e in examples if e.domain == d] for d in start.domains}
    mean_all = sum(map(sum, count.values())) / len(examples)
    moved = 0
    for d in start.domains:
        scale = (sum(count[d]) / len(count[d]) / len(start.domains) / mean_all) ** 0.5
        s0, s1, s2 = (m.expert_state_dict(d) for m in (start, runs["none"], runs["tokens"]))
        for k in s0:
            torch.testing.assert_close(s2[k] - s0[k], scale * (s1[k] - s0[k]), atol=1e-7, rtol=1e-4, msg=f"{d} {k}")
            moved += int(not torch.equal(s1[k], s0[k]))
    assert moved > 0


def test_token_lr_scales_follow_the_square_root_rule_and_are_clipped():
    from moa.stages import LR_SCALE_RANGE, token_lr_scales

    tpr = {"letter": 2.0, "essay": 200.0, "mid": 18.0, "*": 18.0}
    s = token_lr_scales(tpr, {"letter": 1.0, "essay": 1.0, "mid": 1.0})
    assert s["mid"] == pytest.approx(1.0) and s["letter"] == pytest.approx((2 / 18) ** 0.5)
    assert s["essay"] == pytest.approx((200 / 18) ** 0.5)
    assert token_lr_scales(tpr, {"mid": 0.25})["mid"] == pytest.approx(0.5)  # a quarter of the rows: half the lr
    assert token_lr_scales({"x": 1e-6, "y": 1e6, "*": 1.0}, {"x": 1.0, "y": 1.0}) == {
        "x": LR_SCALE_RANGE[0], "y": LR_SCALE_RANGE[1]}
