"""`moa fit` on a tiny model: the whole method and its baseline under one budget, the report,
re-runs that continue, and the converge policy."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_records, write_jsonl
from moa.cli import main
from moa.data import read_records
from moa.fit import FitConfig, split_valid

COMMON = ["--batch-size", "3", "--max-length", "64", "--generate-per-domain", "1", "--max-new-tokens", "3",
          "--rank", "4", "--validations", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    train = write_jsonl(root / "train.jsonl", synthetic_records(6, seed=1))
    test = write_jsonl(root / "test.jsonl", synthetic_records(2, seed=3))
    return train, test


@pytest.fixture(scope="module")
def fitted(files, tiny_base, tmp_path_factory):
    train, test = files
    out = tmp_path_factory.mktemp("fit_run") / "run"
    args = ["fit", "--data", str(train), "--valid-fraction", "0.34", "--test", str(test), "--out", str(out),
            "--base", str(tiny_base), "--epochs", "1", *COMMON]
    assert main(args) == 0
    return out, args


def test_fit_writes_the_checkpoint_baselines_metrics_and_report(fitted):
    out, _ = fitted
    assert (out / "moa" / "moa_config.json").is_file()
    assert (out / "baselines" / "mixed_lora" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"moa", "mixed_lora", "single_lora"} <= set(metrics["systems"])
    for d in ("math", "echo", "json"):
        assert metrics["systems"]["moa"][d]["ppl"] > 1.0
    fit = json.loads((out / "fit.json").read_text())
    steps = fit["plan"]["steps"]
    # equal compute: the mixed LoRA gets exactly MoA's stage 1 + stage 2
    assert steps["mixed_lora"] == sum(steps["experts"].values()) + steps["stage2"]
    assert fit["stages"]["mixed_lora"]["steps"] == steps["mixed_lora"]
    assert fit["stages"]["expert:math"]["steps"] == steps["experts"]["math"]
    # validation held out per domain, and used while training
    valid = read_records(out / "data" / "valid.jsonl")[0]
    assert {r.domain for r in valid} == {"math", "echo", "json"}
    log = [json.loads(l) for l in (out / "moa" / "train_log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in log)
    report = (out / "report.md").read_text()
    assert "Budget policy: **equal**" in report and "| expert:math |" in report
    assert "Deploy the **" in report and "Routing accuracy (vote)" in report
    assert (out / "loss_curves.png").is_file() and (out / "routing_confusion.png").is_file()


def test_fit_rerun_continues_where_it_stopped(fitted, capsys):
    out, args = fitted
    state = json.loads((out / "fit.json").read_text())
    before = (out / "experts" / "math" / "adapter_model.safetensors").stat().st_mtime_ns
    del state["stages"]["mixed_lora"]  # as if the run had stopped before the baseline
    (out / "fit.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "expert:math: done in an earlier run, skipped" in err and "stage2: done in an earlier run" in err
    assert "mixed_lora: done in an earlier run" not in err
    assert (out / "experts" / "math" / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert "mixed_lora" in json.loads((out / "fit.json").read_text())["stages"]


def test_fit_refuses_other_settings_in_the_same_run_and_bad_options(fitted, files, capsys):
    out, args = fitted
    assert main([*args, "--eta", "0.5"]) == 2
    assert "holds a fit with other settings" in capsys.readouterr().err
    train, _ = files
    assert main(["fit", "--data", str(train), "--out", str(out.parent / "c2"), "--budget", "converge"]) == 2
    assert "give --valid FILE or --valid-fraction F" in capsys.readouterr().err
    assert main(["fit", "--data", str(train), "--out", str(out.parent / "c3"), "--baselines", "nope"]) == 2
    assert "unknown baseline(s) nope" in capsys.readouterr().err
    assert not (out.parent / "c3").exists()


def test_fit_converge_stops_each_training_at_its_best(files, tiny_base, tmp_path):
    train, _ = files
    out = tmp_path / "conv"
    assert main(["fit", "--data", str(train), "--valid-fraction", "0.34", "--out", str(out), "--base", str(tiny_base),
                 "--budget", "converge", "--max-epochs", "2", "--patience", "1", *COMMON]) == 0
    fit = json.loads((out / "fit.json").read_text())
    caps = fit["plan"]["steps"]
    for name in ("expert:math", "stage2", "mixed_lora"):
        s = fit["stages"][name]
        cap = caps["experts"]["math"] if name == "expert:math" else caps["stage2" if name == "stage2" else "mixed_lora"]
        assert s["steps"] <= cap and s["best"]["step"] <= s["steps"], name
    assert (out / "moa" / "val_best.json").is_file()
    assert "Budget policy: **converge**" in (out / "report.md").read_text()


def test_split_valid_is_per_domain_and_deterministic():
    recs = [r for r in read_records_of(synthetic_records(5, seed=2))]
    a_train, a_valid = split_valid(recs, 0.2, seed=0)
    b_train, b_valid = split_valid(recs, 0.2, seed=0)
    assert [r.messages for r in a_valid] == [r.messages for r in b_valid]
    assert len(a_train) + len(a_valid) == len(recs)
    assert sorted(r.domain for r in a_valid) == ["echo", "json", "math"]  # one of five per domain
    with pytest.raises(Exception, match="between 0 and 1"):
        split_valid(recs, 1.5)
    with pytest.raises(Exception, match="budget must be one of"):
        FitConfig(budget="forever")


def read_records_of(rows):
    from moa.data import parse_record

    return [parse_record(r, f"row {i}", i) for i, r in enumerate(rows)]
