"""`moa demo` end to end on a tiny model with every baseline and ablation, and `moa eval`."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_records, write_jsonl
from moa.demo import Profile, run_demo
from moa.evaluate import normalize, text_metrics

SYSTEMS = {"base", "single_lora", "mixed_lora", "moa", "moa_last", "moa_layer", "moa_no_router_loss",
           "moa_random_init", "mixed_lora_wide", "moe_lora", "classifier_loras"}


def test_full_pipeline_with_baselines_writes_report_metrics_and_plots(tiny_base, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", synthetic_records(8, seed=1))
    write_jsonl(data / "valid.jsonl", synthetic_records(2, seed=2))
    write_jsonl(data / "test.jsonl", synthetic_records(3, seed=3))
    prof = Profile(expert_steps=2, stage2_steps=2, batch_size=3, lr=1e-3, stage2_lr=1e-3, router_lr=1e-2, eta=1.0,
                   max_length=64, eval_per_domain=2, max_new_tokens=3, ablations=True, eta_sweep=(1.0, 5.0))
    out = tmp_path / "run"
    metrics = run_demo(prof, out, data, base=str(tiny_base))
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


def test_text_metrics_and_normalization():
    assert normalize("  The Answer.  ") == "the answer"
    assert normalize('{"a": 1}') == '{"a": 1}'
    m = text_metrics(["42", "hello world", '{"k": 1}'], ["42.", "hello there", '{"k": 1}'])
    assert m["exact_match"] == pytest.approx(2 / 3, abs=1e-4)
    assert 0 < m["rouge_l"] < 1 and 0 <= m["bleu"] <= 100
    perfect = text_metrics(["a b c d"], ["a b c d"])
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
