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
