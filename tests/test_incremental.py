"""`moa add-expert` and `moa retrain-expert` on a tiny two-expert MoA: a fresh OUT, checks before
any training, the learning rates they record and the eta they keep."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, two_expert_moa, write_jsonl
from moa.cli import main

FAST = ["--batch-size", "4", "--no-bf16"]
ETA = 0.25  # not the default (0.1) nor add-expert's fallback (1.0)


def cli(*args) -> int:
    return main([str(a) for a in args])


def two_domains(n: int, seed: int) -> list[dict]:
    return [r for r in synthetic_records(n, seed=seed) if r["domain"] != "json"]


def shout_records(n: int = 4) -> list[dict]:
    words = ["cat", "dog", "sun", "moon", "tree", "lake", "bird", "fish"]
    return [{"domain": "shout", "prompt": f"shout {w}", "response": w.upper() + "!"} for w in words[:n]]


@pytest.fixture(scope="module")
def moa(tmp_path_factory, tiny_base):
    """A stage-2 checkpoint (math, echo) trained with --eta 0.25."""
    root = tmp_path_factory.mktemp("incr")
    train = two_expert_moa(root, tiny_base)
    assert cli("train", "--moa", root / "moa0", "--data", train, "--out", root / "moa1", "--eta", ETA,
               "--max-steps", "2", *FAST) == 0
    assert json.loads((root / "moa1" / "moa_config.json").read_text())["eta"] == ETA
    return {"dir": root / "moa1", "train": train}


def expert_tensors(ckpt, domain: str) -> dict:
    return load_file(ckpt / "experts" / domain / "adapter_model.safetensors")


def test_add_expert_trains_into_a_fresh_out_and_records_both_lrs(moa, tmp_path):
    new = write_jsonl(tmp_path / "shout.jsonl", shout_records())
    replay = write_jsonl(tmp_path / "replay.jsonl", two_domains(2, seed=5) + shout_records())
    out = tmp_path / "not" / "yet" / "there"
    assert cli("add-expert", "--moa", moa["dir"], "--domain", "shout", "--train-data", new, "--data", replay,
               "--out", out, "--expert-steps", "2", "--expert-lr", "3e-3", "--max-steps", "2", "--lr", "1e-4",
               *FAST) == 0
    cfg = json.loads((out / "moa_config.json").read_text())
    assert cfg["domains"] == ["math", "echo", "shout"]
    assert cfg["eta"] == ETA  # the checkpoint's eta survives the re-fit
    assert (out / "stage1" / "shout" / "adapter_model.safetensors").is_file()
    assert (out / "experts" / "shout" / "adapter_model.safetensors").is_file()
    for d in ("math", "echo"):
        a, b = expert_tensors(moa["dir"], d), expert_tensors(out, d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    # --lr is the re-fit's lr as given (it used to be rewritten when it equalled 1e-4);
    # --expert-lr is the lr of the new expert's own training.
    assert json.loads((out / "train_config.json").read_text())["train"]["lr"] == 1e-4
    stage1 = json.loads((out / "stage1" / "shout" / "train_config.json").read_text())
    assert stage1["train"]["lr"] == 3e-3 and stage1["train"]["max_steps"] == 2
    assert len((out / "stage1" / "shout" / "train_log.jsonl").read_text().splitlines()) == 2


def test_add_expert_checks_the_replay_and_out_before_training(moa, tmp_path, capsys):
    new = write_jsonl(tmp_path / "shout.jsonl", shout_records())
    no_echo = write_jsonl(tmp_path / "no_echo.jsonl",
                          [r for r in two_domains(2, seed=5) if r["domain"] != "echo"] + shout_records())
    common = ["add-expert", "--moa", moa["dir"], "--domain", "shout", "--train-data", new, "--expert-steps", "2",
              "--max-steps", "2", *FAST]
    capsys.readouterr()
    out = tmp_path / "fresh"
    assert cli(*common, "--data", no_echo, "--out", out) == 2
    err = capsys.readouterr().err
    assert "echo" in err and err.startswith("moa: error: ") and "Traceback" not in err
    assert not out.exists()  # nothing trained, nothing written

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    replay = write_jsonl(tmp_path / "replay.jsonl", two_domains(2, seed=5) + shout_records())
    assert cli(*common, "--data", replay, "--out", busy) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("which", ["every_domain", "own_domain_only"])
def test_retrain_expert_keeps_the_checkpoints_eta(moa, tmp_path, capsys, which):
    rows = two_domains(2, seed=7)
    if which == "own_domain_only":
        rows = [r for r in rows if r["domain"] == "math"]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    capsys.readouterr()
    assert cli("retrain-expert", "--moa", moa["dir"], "--domain", "math", "--data", data, "--out", tmp_path / "o",
               "--max-steps", "1", "--router-steps", "1", "--lr", "1e-2", *FAST) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["router_refit"] is not None) == (which == "every_domain")
    assert json.loads((tmp_path / "o" / "moa_config.json").read_text())["eta"] == ETA
    before, after = expert_tensors(moa["dir"], "echo"), expert_tensors(tmp_path / "o", "echo")
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = expert_tensors(moa["dir"], "math"), expert_tensors(tmp_path / "o", "math")
    assert any(not torch.equal(before[k], after[k]) for k in before)
