"""`moa demo` end to end on a tiny model with every baseline and ablation, and `moa eval`."""

from __future__ import annotations

import json
import re

import pytest

from conftest import synthetic_records, write_jsonl
from moa.demo import Profile, run_demo
from moa.fit import allocate_steps
from moa.errors import MoAError
from moa.evaluate import normalize, text_metrics

SYSTEMS = {"base", "single_lora", "mixed_lora", "moa", "moa_last", "moa_layer", "moa_no_router_loss",
           "moa_random_init", "mixed_lora_wide", "moe_lora", "classifier_loras"}


def tiny_splits(root, n_train: int, n_test: int):
    """train / valid / test.jsonl of the three toy domains under root/data."""
    data = root / "data"
    for name, n, seed in (("train", n_train, 1), ("valid", 2, 2), ("test", n_test, 3)):
        write_jsonl(data / f"{name}.jsonl", synthetic_records(n, seed=seed))
    return data


def tiny_profile(**kw) -> Profile:
    return Profile(**{"expert_steps": 2, "stage2_steps": 2, "batch_size": 3, "lr": 1e-3, "stage2_lr": 1e-3,
                      "router_lr": 1e-2, "eta": 1.0, "max_length": 64, "budget": "equal", "expert_init": "fresh",
                      "stage2": "joint", **kw})  # the demo profiles' recipe (moa.demo.PROFILES)


def test_full_pipeline_with_baselines_writes_report_metrics_and_plots(tiny_base, tmp_path, capsys):
    data = tiny_splits(tmp_path, 8, 3)
    prof = tiny_profile(eval_per_domain=3, generate_per_domain=2, max_new_tokens=3, ablations=True,
                        eta_sweep=(1.0, 5.0))
    out = tmp_path / "run"
    metrics = run_demo(prof, out, data, base=str(tiny_base))
    # The last line gives the whole demo's time and the trainings' share of it (not one as the other).
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"time: ([0-9.]+) min in all, ([0-9.]+) min of it training; report: .*report\.md", last)
    assert m and float(m[1]) >= float(m[2]), last
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["domains"] == ["math", "echo", "json"]
    assert set(saved["systems"]) == SYSTEMS
    for name, m in saved["systems"].items():
        for d in saved["domains"]:
            assert set(m[d]) == {"ppl", "bleu", "rouge_l", "exact_match"}, name
            assert m[d]["ppl"] > 1.0
        assert "routing_accuracy" in m
    routed = {"moa", "moa_last", "moa_layer", "moa_no_router_loss", "moa_random_init", "classifier_loras"}
    for name in SYSTEMS:
        ra = saved["systems"][name]["routing_accuracy"]
        assert (ra is not None) == (name in routed), name
    assert set(saved["eta_sweep"]["runs"]) == {"0", "1", "5"}
    for f in ("report.md", "routing.json", "routing_confusion.png", "loss_curves.png", "metric_ppl.png"):
        assert (out / f).is_file(), f
    assert "| moa |" in (out / "report.md").read_text()
    assert metrics["systems"].keys() == saved["systems"].keys()
    # PPL on 3 records per domain, generation on the first 2 of them only
    assert saved["records_per_domain"] == {"math": 3, "echo": 3, "json": 3}
    assert saved["n_generated"] == 6
    gens = [json.loads(l) for l in (out / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 6 * len(SYSTEMS)
    assert sorted(g["domain"] for g in gens if g["system"] == "moa") == ["echo"] * 2 + ["json"] * 2 + ["math"] * 2
    assert sum(metrics["fit"]["steps"]["experts"].values()) == 2 * 3
    fit = json.loads((out / "fit.json").read_text())
    assert {"expert:math", "assemble", "stage2", "mixed_lora", "moe_lora", "eta_sweep"} <= set(fit["stages"])


def test_seed_lora_and_lr_rule_in_the_demo(tiny_base, tmp_path):
    data = tiny_splits(tmp_path, 6, 2)
    prof = tiny_profile(eta=0.1, eval_per_domain=2, generate_per_domain=1, max_new_tokens=2, seed_steps=3,
                        lr_scaling="tokens")
    out = tmp_path / "run"
    saved = run_demo(prof, out, data, base=str(tiny_base))
    seed = out / "seed"
    assert (seed / "adapter_model.safetensors").is_file()
    for d in saved["domains"]:
        cfg = json.loads((out / "experts" / d / "train_config.json").read_text())
        assert cfg["init_adapter"] == str(seed.resolve()) and cfg["lr_scaling"] == "tokens", d
    assert json.loads((out / "moa" / "train_config.json").read_text())["expert_lr_scaling"] == "tokens"
    assert saved["fit"]["steps"]["mixed_lora"] == 3 + 2 * 3 + 2
    mixed_log = (out / "baselines" / "mixed_lora" / "train_log.jsonl").read_text().splitlines()
    assert len(mixed_log) == 3 + 2 * 3 + 2
    assert "seed LoRA 3 + stage 1 6 + stage 2 2 = 11; mixed-data LoRA 11" in (out / "report.md").read_text()
    assert saved["fit"]["stages"]["seed"]["steps"] == 3


def test_allocate_steps_splits_the_budget_by_size_to_the_power_alpha():
    sizes = {"big": 1000, "mid": 250, "small": 10}
    assert allocate_steps(sizes, 30, 0.0) == {"big": 10, "mid": 10, "small": 10}
    prop = allocate_steps(sizes, 126, 1.0)
    assert prop["big"] > prop["mid"] > prop["small"] >= 1 and sum(prop.values()) == 126
    sqrt = allocate_steps(sizes, 126, 0.5)
    assert sum(sqrt.values()) == 126
    assert prop["big"] > sqrt["big"] and prop["small"] < sqrt["small"]  # 0.5 sits between
    assert allocate_steps(sizes, 3, 1.0) == {"big": 1, "mid": 1, "small": 1}  # one step each at least
    with pytest.raises(MoAError, match="cannot give each"):
        allocate_steps(sizes, 2, 0.5)
    with pytest.raises(MoAError, match=">= 0"):
        allocate_steps(sizes, 30, -1)


def test_text_metrics_and_normalization():
    assert normalize("  The Answer.  ") == "the answer"
    assert normalize('{"a": 1}') == '{"a": 1}'
    m = text_metrics(["42", "hello world", '{"k": 1}'], ["42.", "hello there", '{"k": 1}'])
    assert m["exact_match"] == pytest.approx(2 / 3, abs=1e-4)
    assert 0 < m["rouge_l"] < 1 and 0 <= m["bleu"] <= 100
    perfect = text_metrics(["a b c d"], ["a b c d"])
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
