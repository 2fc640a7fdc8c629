"""`moa fit` on a tiny model: the whole method and its baseline under one budget, the report,
re-runs that continue, and the converge policy."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_records, write_jsonl
from moa.cli import main
from moa.data import read_records
from moa.errors import MoAError
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
            "--base", str(tiny_base), "--epochs", "1", "--budget", "equal", "--expert-init", "fresh", "--stage2",
            "joint", *COMMON]
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
    assert main(["fit", "--data", str(train), "--out", str(out.parent / "c2"), "--budget", "converge",
                 "--lr", "0"]) == 2  # a bad value is refused before any work
    assert "lr must be positive" in capsys.readouterr().err and not (out.parent / "c2").exists()
    assert main(["fit", "--data", str(train), "--out", str(out.parent / "c3"), "--baselines", "nope"]) == 2
    assert "unknown baseline(s) nope" in capsys.readouterr().err
    assert not (out.parent / "c3").exists()


def test_fit_converge_stops_each_training_at_its_best(files, tiny_base, tmp_path):
    train, _ = files
    out = tmp_path / "conv"
    assert main(["fit", "--data", str(train), "--valid-fraction", "0.34", "--out", str(out), "--base", str(tiny_base),
                 "--budget", "converge", "--expert-init", "fresh", "--stage2", "joint", "--max-epochs", "2",
                 "--patience", "1", *COMMON]) == 0
    fit = json.loads((out / "fit.json").read_text())
    caps = fit["plan"]["steps"]
    for name in ("expert:math", "stage2", "mixed_lora"):
        s = fit["stages"][name]
        cap = caps["experts"]["math"] if name == "expert:math" else caps["stage2" if name == "stage2" else "mixed_lora"]
        assert s["steps"] <= cap and s["best"]["step"] <= s["steps"], name
    assert (out / "moa" / "val_best.json").is_file()
    assert "Budget policy: **converge**" in (out / "report.md").read_text()


def test_fit_seed_recipe_starts_experts_from_the_mixed_lora_and_stage2_trains_routers_only(files, tiny_base,
                                                                                          tmp_path):
    from safetensors.torch import load_file

    train, _ = files
    out = tmp_path / "seeded"
    # the defaults: --budget converge --expert-init seed --stage2 routers, 0.2 held out for validation
    assert main(["fit", "--data", str(train), "--out", str(out), "--base", str(tiny_base), "--max-epochs", "2",
                 "--patience", "1", *COMMON]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["plan"]["steps"]["seed"] == "mixed_lora" and fit["plan"]["valid_fraction"] == 0.2
    assert len(read_records(out / "data" / "valid.jsonl")[0]) == 3  # one of six per domain
    order = list(fit["stages"])
    assert order.index("mixed_lora") < order.index("expert:math")  # the seed is trained first, once
    for d in ("math", "echo", "json"):
        # an expert's validation starts at step 0 (the mixed LoRA) and it keeps its best weights
        assert fit["stages"][f"expert:{d}"]["best"]["step"] >= 0
        # stage 2 trained the routers only: the experts are stage 1's, bit for bit
        a = load_file(out / "moa_assembled" / "experts" / d / "adapter_model.safetensors")
        b = load_file(out / "moa" / "experts" / d / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # every expert starts from the mixed LoRA itself, at a quarter of its lr (--seed-lr-scale 0.25)
    for d in ("math", "echo", "json"):
        run = json.loads((out / "experts" / d / "train_config.json").read_text())
        assert run["init_adapter"] == str((out / "baselines" / "mixed_lora").resolve())
        assert run["train"]["lr"] == pytest.approx(FitConfig().lr * 0.25)
        assert run["train"]["early_stopping_patience"] == 4  # --seed-patience; the mixed LoRA's: --patience 1
        # and is written halfway back to it (--seed-interpolate 0.5); the trained weights stay beside
        assert run["interpolate"] == 0.5 == fit["stages"][f"expert:{d}"]["interpolate"]
        seed = load_file(out / "baselines" / "mixed_lora" / "adapter_model.safetensors")
        trained = load_file(out / "experts" / d / "trained" / "adapter_model.safetensors")
        expert = load_file(out / "experts" / d / "adapter_model.safetensors")
        assert all(torch.allclose(expert[k], (seed[k] + trained[k]) / 2) for k in seed)
    assert "best_by_domain" not in fit["stages"]["mixed_lora"]
    mixed = json.loads((out / "baselines" / "mixed_lora" / "train_config.json").read_text())
    assert mixed["train"]["early_stopping_patience"] == 1
    routers = [load_file(out / x / "router.safetensors") for x in ("moa_assembled", "moa")]
    assert any(not routers[0][k].equal(routers[1][k]) for k in routers[0])
    report = (out / "report.md").read_text()
    assert "MoA starts every expert from it" in report and "| stage2 (routers only) |" in report
    assert "the mixed LoRA + 0.5 x (its trained weights - the mixed LoRA)" in report
    # the out-of-domain fallback is calibrated on the validation prompts, after stage 2
    assert order.index("fallback") > order.index("stage2")
    assert json.loads((out / "moa" / "moa_config.json").read_text())["fallback"]["acceptance"] == 1.0
    assert "Out-of-domain fallback: distance" in report
    with pytest.raises(SystemExit) as e:  # argparse's choices: one line, exit 2
        main(["fit", "--data", str(train), "--out", str(tmp_path / "bad"), "--expert-init", "mixed"])
    assert e.value.code == 2


def test_fit_seed_select_domain_starts_each_expert_from_its_domains_best_mixed_weights(files, tiny_base, tmp_path):
    train, _ = files
    out = tmp_path / "per_domain"
    assert main(["fit", "--data", str(train), "--out", str(out), "--base", str(tiny_base), "--max-epochs", "1",
                 "--patience", "1", "--seed-select", "domain", "--seed-lr-scale", "1", "--fallback-acceptance", "0",
                 "--seed-warmup", "0.5",
                 *COMMON]) == 0
    fit = json.loads((out / "fit.json").read_text())
    best = fit["stages"]["mixed_lora"]["best_by_domain"]
    assert sorted(best) == ["echo", "json", "math"]
    for d in best:
        run = json.loads((out / "experts" / d / "train_config.json").read_text())
        assert run["init_adapter"] == str((out / "baselines" / "mixed_lora" / "best_by_domain" / d).resolve())
        assert run["train"]["lr"] == pytest.approx(FitConfig().lr)
        # --seed-warmup 0.5: half an epoch of the domain's 5 training records (batch 3) = 1 step of its 2
        assert run["train"]["warmup_ratio"] == pytest.approx(0.5)


def test_keep_best_counts_the_starting_weights(tiny_base, tmp_path):
    """A run from trained weights that only gets worse keeps the weights it started from."""
    from safetensors.torch import load_file

    from moa.stages import train_expert
    from moa.trainer import TrainConfig

    train = write_jsonl(tmp_path / "t.jsonl", synthetic_records(4, seed=5))
    first = train_expert(data=train, domain="math", out=tmp_path / "a", base=str(tiny_base), rank=4,
                         cfg=TrainConfig(max_steps=4, batch_size=2, lr=1e-2, max_length=64))
    assert first["steps"] == 4
    summary = train_expert(data=train, domain="math", out=tmp_path / "b", base=str(tiny_base), rank=4,
                           init_adapter=tmp_path / "a", cfg=TrainConfig(
                               max_steps=3, batch_size=2, lr=50.0, max_length=64, eval_data=str(train),
                               eval_every=1, keep_best=True))
    assert summary["best"]["step"] == 0
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)


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


def test_keep_best_per_domain_keeps_each_domains_own_best_weights(tiny_base, tmp_path):
    """A mixed run validated per domain: each domain's loss is its own records' (their token-weighted
    mean is the total), and OUT/best_by_domain/<d> holds weights whose loss on d is d's best."""
    from moa.stages import BEST_BY_DOMAIN, train_expert
    from moa.trainer import TrainConfig

    train = write_jsonl(tmp_path / "t.jsonl", synthetic_records(6, seed=5))
    valid = write_jsonl(tmp_path / "v.jsonl", synthetic_records(3, seed=6))
    out = tmp_path / "mixed"
    summary = train_expert(data=train, domain=None, out=out, base=str(tiny_base), rank=4, cfg=TrainConfig(
        max_steps=6, batch_size=4, lr=2e-2, max_length=64, eval_data=str(valid), eval_every=1, keep_best=True,
        keep_best_per_domain=True))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert len(vals) == 6 and all(sorted(r["val_loss_by_domain"]) == ["echo", "json", "math"] for r in vals)
    best = summary["best_by_domain"]
    for d in ("echo", "json", "math"):
        losses = [r["val_loss_by_domain"][d] for r in vals]
        assert best[d]["val_loss"] == min(losses) and best[d]["step"] == vals[losses.index(min(losses))]["step"]
        # the saved weights give that loss on d's records (validated at step 0 of a run from them)
        again = train_expert(data=train, domain=d, out=tmp_path / f"check_{d}", base=str(tiny_base), rank=4,
                             init_adapter=out / BEST_BY_DOMAIN / d, cfg=TrainConfig(
                                 max_steps=1, batch_size=4, lr=1e-9, max_length=64, eval_data=str(valid),
                                 eval_every=1, keep_best=True))
        assert again["best"]["val_loss"] == pytest.approx(best[d]["val_loss"], abs=2e-3)
    # the domains' losses weighted by their label tokens are the total validation loss
    from moa.data import encode_records, read_records
    from moa.base import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    examples, _ = encode_records(tok, read_records(valid)[0], 64)
    n = {d: sum(sum(l != -100 for l in e.labels[1:]) for e in examples if e.domain == d) for d in best}
    for r in vals:
        mean = sum(r["val_loss_by_domain"][d] * n[d] for d in n) / sum(n.values())
        assert mean == pytest.approx(r["val_loss"], rel=1e-3)
    with pytest.raises(MoAError, match="need --eval-data"):
        TrainConfig(max_steps=1, keep_best_per_domain=True)


def test_the_report_names_experts_that_kept_the_mixed_loras_weights():
    from moa.fit import kept_seed, render_report

    def stage(step):
        return {"steps": 4, "best": {"step": step, "val_loss": 1.0}, "wall_s": 1}

    summary = {"domains": ["a", "b"], "records": {"a": 8, "b": 8}, "budget": "converge", "seconds": 60,
               "steps": {"experts": {"a": 4, "b": 4}, "stage2": 2, "mixed_lora": 8, "seed": "mixed_lora"},
               "stages": {"mixed_lora": stage(4), "expert:a": stage(0), "expert:b": stage(3)}}
    assert kept_seed(summary, ["a", "b"]) == ["a"]
    assert kept_seed({**summary, "steps": {**summary["steps"], "seed": 0}}, ["a", "b"]) == []
    metrics = {"systems": {s: {d: {"ppl": p, "tokens": 5} for d, p in zip("ab", ppl)}
                           for s, ppl in (("mixed_lora", (2.0, 2.0)), ("moa", (1.98, 1.5)))},
               "domains": ["a", "b"], "routing_full_test": {"accuracy": 1.0, "n": 10}}
    report = render_report(summary, metrics, "fit")
    assert "The expert of a kept the mixed-data LoRA's weights" in report
    assert "below the mixed-data LoRA on 2/2 domains" in report
