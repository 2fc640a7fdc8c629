"""Validation while training (--eval-data, --eval-every, --keep-best, --early-stopping-patience) and
the TensorBoard tracker (--report-to), on the tiny base through the real `moa` commands."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, write_jsonl
from moa.cli import main

FAST = ["--batch-size", "4", "--rank", "8", "--no-bf16", "--dropout", "0.1"]


def run(args) -> int:
    return main([str(a) for a in args])


def read_log(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl")]


def adapter_val_loss(tiny_base, adapter, eval_file, domain) -> float:
    """Mean NLL per label token of `adapter` on `domain`'s records of `eval_file`, computed by `moa score`'s code."""
    from moa.base import load_base
    from moa.data import encode_records, read_records
    from moa.scoring import causal_lm_forward, load_peft_adapter, score_examples

    model, tok = load_base(tiny_base)
    records, _ = read_records(eval_file)
    examples, _ = encode_records(tok, [r for r in records if r.domain == domain], 512)
    rows = score_examples(causal_lm_forward(load_peft_adapter(model, adapter).eval()), examples, tok.pad_token_id,
                          progress=False)
    return -sum(r["logprob"] for r in rows) / sum(r["tokens"] for r in rows)


@pytest.fixture
def split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_records(4, seed=0))
    valid = write_jsonl(tmp_path / "valid.jsonl", synthetic_records(3, seed=1))
    return train, valid


def test_validation_and_tensorboard_in_a_four_step_run(tiny_base, tmp_path, split):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, valid = split
    out = tmp_path / "exp"
    assert run(["train-expert", "--data", train, "--domain", "echo", "--out", out, "--base", tiny_base,
                "--max-steps", "4", "--lr", "1e-2", "--eval-data", valid, "--eval-every", "2",
                "--report-to", "tensorboard", *FAST]) == 0
    log = read_log(out)
    assert [("val_loss" in r) for r in log] == [False, True, False, True]
    # the logged value is the final adapter's mean NLL per label token on the echo validation records
    assert log[-1]["val_loss"] == pytest.approx(adapter_val_loss(tiny_base, out, valid, "echo"), rel=1e-4)
    assert "val_router_acc" not in log[-1]  # stage 1 has no router

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss"} <= set(tags), tags
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")] == \
        [(r["step"], round(r["loss"], 5)) for r in log]
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("val/loss")] == \
        [(r["step"], round(r["val_loss"], 5)) for r in log if "val_loss" in r]


def test_validation_does_not_change_the_training_trajectory(tiny_base, tmp_path, split):
    train, valid = split
    common = ["train-expert", "--data", train, "--domain", "json", "--base", tiny_base, "--max-steps", "4",
              "--lr", "1e-2", *FAST]
    assert run([*common, "--out", tmp_path / "plain"]) == 0
    assert run([*common, "--out", tmp_path / "valid", "--eval-data", valid, "--eval-every", "1"]) == 0
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "valid" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dropout 0.1: the RNG matters
    assert [r["loss"] for r in read_log(tmp_path / "plain")] == [r["loss"] for r in read_log(tmp_path / "valid")]
    assert all("val_loss" in r for r in read_log(tmp_path / "valid"))


def test_keep_best_writes_the_lowest_validation_loss_and_survives_a_resume(tiny_base, tmp_path, split):
    import shutil

    train, valid = split
    # lr 0.05 on one domain's four records: the validation loss overshoots after the first step
    common = ["train-expert", "--data", train, "--domain", "math", "--base", tiny_base, "--max-steps", "3",
              "--lr", "0.05", "--eval-data", valid, "--eval-every", "1", "--keep-best", "--save-every", "2", *FAST]
    full = tmp_path / "full"
    assert run([*common, "--out", full]) == 0
    vals = {r["step"]: r["val_loss"] for r in read_log(full)}
    best = json.loads((full / "val_best.json").read_text())
    assert best["step"] == min(vals, key=vals.get) and best["val_loss"] == min(vals.values())
    assert best["step"] < 3 and best["kept"] and best["last_step"] == 3
    assert adapter_val_loss(tiny_base, full, valid, "math") == pytest.approx(best["val_loss"], rel=1e-4)

    # A run that stopped right after its step-2 checkpoint, resumed: the best of steps 1-2 is remembered.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    shutil.copy(full / "train_config.json", part / "train_config.json")
    assert run([*common, "--out", part, "--resume"]) == 0
    assert json.loads((part / "val_best.json").read_text()) == best
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(part / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_early_stopping_stops_after_k_validations_without_improvement(tiny_base, tmp_path, split):
    train, valid = split
    out = tmp_path / "es"
    assert run(["train-expert", "--data", train, "--domain", "math", "--base", tiny_base, "--max-steps", "30",
                "--lr", "0.05", "--eval-data", valid, "--eval-every", "1", "--early-stopping-patience", "2",
                "--out", out, *FAST]) == 0
    vals = [r["val_loss"] for r in read_log(out)]
    assert len(vals) < 30
    # the run stopped at the first point where the last 2 validations were no better than an earlier one
    stop = next(i for i in range(len(vals)) if i >= 2 and min(vals[: i - 1]) <= min(vals[i - 1 : i + 1]))
    assert len(vals) == stop + 1
    assert json.loads((out / "val_best.json").read_text())["stopped_early"] is True
    assert (out / "adapter_model.safetensors").is_file()


def test_stage2_logs_validation_router_accuracy(tiny_base, tmp_path, split):
    train, valid = split
    experts = []
    for d in ("math", "echo", "json"):
        assert run(["train-expert", "--data", train, "--domain", d, "--out", tmp_path / d, "--base", tiny_base,
                    "--max-steps", "1", *FAST]) == 0
        experts.append(tmp_path / d)
    assert run(["assemble", "--experts", *experts, "--out", tmp_path / "moa"]) == 0
    out = tmp_path / "stage2"
    assert run(["train", "--moa", tmp_path / "moa", "--data", train, "--out", out, "--max-steps", "2",
                "--batch-size", "6", "--no-bf16", "--eval-data", valid, "--eval-every", "2",
                "--report-to", "tensorboard"]) == 0
    row = read_log(out)[-1]
    assert 0.0 <= row["val_router_acc"] <= 1.0 and row["val_loss"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/lm_loss", "train/router_loss", "train/router_acc", "val/router_acc"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("val/router_acc")] == pytest.approx([row["val_router_acc"]])


def test_validation_options_need_eval_data(tiny_base, tmp_path, split, capsys):
    train, _ = split
    common = ["train-expert", "--data", train, "--domain", "math", "--base", tiny_base, "--out", tmp_path / "x",
              "--max-steps", "1", *FAST]
    assert run([*common, "--keep-best"]) == 2
    assert "need --eval-data" in capsys.readouterr().err
    assert run([*common, "--eval-data", tmp_path / "missing.jsonl"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
