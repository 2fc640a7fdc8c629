"""Length-grouped stage-2 batches (moa.data.LengthGroupedSampler, `moa train --length-window W`):
the same rows per window of steps (so the domain balance holds per window), less padding,
deterministic and step-indexed, and a stage-2 run that reaches the same validation loss."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from conftest import synthetic_records, two_expert_moa, write_jsonl
from moa.cli import main
from moa.data import DomainBalancedSampler, LengthGroupedSampler, ShuffledSampler


def _padding(sampler, lengths, steps):
    real = run = 0
    for s in range(steps):
        rows = sampler.batch(s)
        real += sum(lengths[i] for i in rows)
        run += len(rows) * max(lengths[i] for i in rows)
    return (run - real) / run


def _stream():
    rng = random.Random(0)
    domains = [k % 4 for k in range(200)]
    # domain 0 short answers, domain 3 paragraphs: the stage-2 mix that pads
    lengths = [rng.randint(10, 20) + 60 * d + rng.randint(0, 30) for d in domains]
    return domains, lengths


def test_each_window_serves_the_inner_samplers_rows_grouped_by_length():
    domains, lengths = _stream()
    inner = DomainBalancedSampler(domains, 8, seed=3)
    grouped = LengthGroupedSampler(DomainBalancedSampler(domains, 8, seed=3), lengths, window=4, seed=3,
                                   domain_of=domains)
    pooled = LengthGroupedSampler(DomainBalancedSampler(domains, 8, seed=3), lengths, window=4, seed=3)
    for w in range(6):
        steps = range(4 * w, 4 * w + 4)
        served = [i for s in steps for i in grouped.batch(s)]
        expected = [i for s in steps for i in inner.batch(s)]
        assert sorted(served) == sorted(expected)  # the same rows (repeats included) in the same 4 steps
        assert sorted(i for s in steps for i in pooled.batch(s)) == sorted(expected)
        # with domain_of every batch keeps the balance: two rows of each of the 4 domains
        assert all(Counter(domains[i] for i in grouped.batch(s)) == Counter({0: 2, 1: 2, 2: 2, 3: 2}) for s in steps)
        assert all(len(pooled.batch(s)) == 8 for s in steps)
    # less padding: within each domain's share (balanced), and more when the batches may mix freely
    plain = _padding(inner, lengths, 40)
    assert _padding(pooled, lengths, 40) < _padding(grouped, lengths, 40) < plain
    # deterministic and step-indexed: a fresh sampler (a resumed run) serves the same batches, in any order
    again = LengthGroupedSampler(DomainBalancedSampler(domains, 8, seed=3), lengths, window=4, seed=3,
                                 domain_of=domains)
    assert [again.batch(s) for s in (13, 2, 7)] == [grouped.batch(s) for s in (13, 2, 7)]
    # data parallel: the ranks split each batch
    assert sorted(grouped.batch(5, 0, 2) + grouped.batch(5, 1, 2)) == sorted(grouped.batch(5))
    # window 1: the inner batches
    one = LengthGroupedSampler(ShuffledSampler(200, 8, seed=1), lengths, window=1)
    assert [one.batch(s) for s in range(5)] == [ShuffledSampler(200, 8, seed=1).batch(s) for s in range(5)]
    with pytest.raises(ValueError, match="window must be >= 1"):
        LengthGroupedSampler(inner, lengths, window=0)


def test_a_length_grouped_stage2_reaches_the_same_validation_loss(tmp_path, tiny_base):
    train = two_expert_moa(tmp_path, tiny_base)
    valid = write_jsonl(tmp_path / "valid.jsonl",
                        [r for r in synthetic_records(4, seed=9) if r["domain"] != "json"])
    losses = {}
    for name, extra in (("plain", []), ("plain_seed1", ["--seed", "1"]), ("grouped", ["--length-window", "4"])):
        out = tmp_path / name
        assert main(["train", "--moa", str(tmp_path / "moa0"), "--data", str(train), "--out", str(out),
                     "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3", "--no-bf16", "--eval-data", str(valid),
                     *extra]) == 0
        rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        losses[name] = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    cfg = json.loads((tmp_path / "grouped" / "train_config.json").read_text())
    assert cfg["length_window"] == 4 and "length_window" not in json.loads(
        (tmp_path / "plain" / "train_config.json").read_text())
    noise = abs(losses["plain"] - losses["plain_seed1"])
    assert abs(losses["grouped"] - losses["plain"]) <= max(3 * noise, 0.05 * losses["plain"]), losses
    assert main(["train", "--moa", str(tmp_path / "moa0"), "--data", str(train), "--out", str(tmp_path / "bad"),
                 "--length-window", "0"]) == 2


def test_length_split_cuts_sorted_rows_where_they_pad_the_fewest_tokens():
    import itertools
    from types import SimpleNamespace

    from moa.trainer import length_split

    def tokens(runs):
        return sum(len(r) * max(len(e.input_ids) for e in r) for r in runs)

    rng = random.Random(0)
    for trial in range(30):
        rows = [SimpleNamespace(input_ids=[0] * rng.choice([2, 3, 40, 41, 90, 200]), k=k)
                for k in range(rng.randint(1, 9))]
        lengths = sorted(len(e.input_ids) for e in rows)
        for passes, pass_cost in ((1, 0), (2, 0), (3, 0), (4, 0), (4, 50), (9, 500)):
            runs = length_split(rows, passes, pass_cost)
            assert sorted(e.k for r in runs for e in r) == list(range(len(rows)))  # every row once
            assert 1 <= len(runs) <= passes and all(runs)
            if len(runs) == 1:  # uncut: the rows as given, so a batch not worth cutting runs as before
                assert runs == [rows]
            else:
                assert [len(e.input_ids) for r in runs for e in r] == lengths  # runs of consecutive lengths
            brute = min(sum((b - a) * lengths[b - 1] for a, b in zip((0, *cuts), (*cuts, len(rows))))
                        + pass_cost * (k + 1)
                        for k in range(min(passes, len(rows)))
                        for cuts in itertools.combinations(range(1, len(rows)), k))
            assert tokens(runs) + pass_cost * len(runs) == brute
    same = [SimpleNamespace(input_ids=[0] * 5) for _ in range(6)]
    assert len(length_split(same, 4, 0)) == 1  # no cut that saves nothing
    pair = [SimpleNamespace(input_ids=[0] * n) for n in (10, 100)]
    assert len(length_split(pair, 2, 89)) == 2 and len(length_split(pair, 2, 90)) == 1  # saves 90 tokens
    assert length_split([], 3) == []


def test_a_length_split_stage2_step_has_the_same_gradient(tmp_path, tiny_base, monkeypatch):
    """Passes padded to their own longest row give the losses and weights of whole micro-batches
    (without dropout, to float tolerance): the losses are normalised by the global batch."""
    import torch
    from safetensors.torch import load_file

    import moa.trainer

    passes = []
    collate = moa.trainer.collate
    monkeypatch.setattr(moa.trainer, "collate", lambda exs, *a, **k: passes.append(len(exs)) or collate(exs, *a, **k))
    monkeypatch.setattr(moa.trainer, "PASS_COST_TOKENS", 0)  # the toy records are short: cut them anyway
    train = two_expert_moa(tmp_path, tiny_base)
    logs, weights, runs = {}, {}, {}
    for split in (1, 3):
        passes.clear()
        out = tmp_path / f"split{split}"
        assert main(["train", "--moa", str(tmp_path / "moa0"), "--data", str(train), "--out", str(out),
                     "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3", "--no-bf16", "--lora-dropout", "0",
                     "--length-split", str(split)]) == 0
        logs[split] = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        runs[split] = list(passes)
        weights[split] = {k: v for f in sorted(out.rglob("*.safetensors")) if "checkpoints" not in f.parts
                          for k, v in load_file(f).items()}
    assert runs[1] == [4] * 6 and len(runs[3]) > 6 and sum(runs[3]) == 24  # the split ran, every row once
    for a, b in zip(logs[1], logs[3]):
        for key in ("loss", "lm_loss", "router_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])
    assert weights[1].keys() == weights[3].keys() and weights[1]
    for k in weights[1]:
        torch.testing.assert_close(weights[1][k], weights[3][k], rtol=1e-3, atol=1e-5)
    assert main(["train", "--moa", str(tmp_path / "moa0"), "--data", str(train), "--out", str(tmp_path / "bad"),
                 "--length-split", "0"]) == 2


def test_validation_batches_run_shortest_first(tmp_path, tiny_base, monkeypatch):
    """Validation pads little: its batches come shortest first (the loss sums do not depend on the order)."""
    import moa.trainer

    calls, seen = [], []
    validate, collate = moa.trainer.Trainer.validate, moa.trainer.collate

    def spy_validate(self):
        calls.append([])
        return validate(self)

    def spy_collate(exs, *a, **k):
        if calls:
            calls[-1].append([len(e.input_ids) for e in exs])
        return collate(exs, *a, **k)

    monkeypatch.setattr(moa.trainer.Trainer, "validate", spy_validate)
    monkeypatch.setattr(moa.trainer, "collate", spy_collate)
    train = two_expert_moa(tmp_path, tiny_base)
    valid = write_jsonl(tmp_path / "valid.jsonl", [r for r in synthetic_records(6, seed=4) if r["domain"] != "json"])
    assert main(["train", "--moa", str(tmp_path / "moa0"), "--data", str(train), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "4", "--no-bf16", "--eval-data", str(valid)]) == 0
    assert len(calls) == 1 and len(calls[0]) == 3  # 12 records in batches of 4
    lengths = [n for batch in calls[0] for n in batch]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
