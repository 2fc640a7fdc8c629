"""Stage 1 end to end on a tiny model: learning, PEFT compatibility, resume, CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, write_jsonl
from moa.cli import main

FAST = ["--batch-size", "4", "--lr", "1e-2", "--rank", "16", "--no-bf16"]


def run_cli(args, capsys=None):
    rc = main([str(a) for a in args])
    return rc


def test_train_expert_overfits_and_writes_a_peft_adapter(tiny_base, tmp_path):
    # 4 records: 2 math + 2 echo; the expert trains on the 2 echo ones.
    data = write_jsonl(tmp_path / "four.jsonl", [r for r in synthetic_records(2) if r["domain"] != "json"])
    out = tmp_path / "exp"
    assert run_cli(["train-expert", "--data", data, "--domain", "echo", "--out", out, "--base", tiny_base,
                    "--max-steps", "40", *FAST]) == 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "train_config.json", "loss.png"):
        assert (out / f).is_file(), f
    log = [json.loads(l) for l in open(out / "train_log.jsonl")]
    assert len(log) == 40 and {"step", "loss", "lr", "tokens_per_s"} <= set(log[0])
    assert log[-1]["loss"] < 0.4 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])

    # PEFT itself loads the adapter and gives the logits of the trained model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moa.base import load_base
    from moa.data import collate, encode_records, read_records
    from moa.scoring import causal_lm_forward, score_examples

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any(k.startswith("base_model.model.") and k.endswith("lora_A.weight") for k in keys)

    model, tok = load_base(tiny_base)
    records, _ = read_records(data)
    examples, _ = encode_records(tok, [r for r in records if r.domain == "echo"])
    ours = score_examples(causal_lm_forward(load_adapter(model, out)), examples, tok.pad_token_id, progress=False)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from moa.scoring import token_logprobs

    lp, n = token_logprobs(logits, batch["labels"])
    assert [r["logprob"] for r in ours] == pytest.approx(lp.tolist(), abs=1e-4)
    # and the adapter beats the base a lot on its own training data
    base_rows = score_examples(causal_lm_forward(load_base(tiny_base)[0]), examples, tok.pad_token_id, progress=False)
    assert sum(r["logprob"] for r in ours) > 0.5 * sum(r["logprob"] for r in base_rows)


def load_adapter(model, path):
    from moa.scoring import load_peft_adapter

    return load_peft_adapter(model, path)


def test_resume_from_a_checkpoint_equals_uninterrupted_run(tiny_base, tmp_path, toy_data):
    common = ["train-expert", "--data", toy_data, "--domain", "math", "--base", tiny_base, "--max-steps", "24",
              "--save-every", "8", "--dropout", "0.1", *FAST]
    full = tmp_path / "full"
    assert run_cli([*common, "--out", full]) == 0
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["step-0000008", "step-0000016"]
    # A run that stopped right after its step-8 checkpoint, then resumed.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000008", part / "checkpoints" / "step-0000008")
    shutil.copy(full / "train_config.json", part / "train_config.json")
    assert run_cli([*common, "--out", part, "--resume"]) == 0
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = [json.loads(l)["loss"] for l in open(full / "train_log.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(part / "train_log.jsonl")]
    assert la == pytest.approx(lb, abs=1e-6)


def test_same_seed_same_weights_and_out_dir_guard(tiny_base, tmp_path, toy_data, capsys):
    args = ["train-expert", "--data", toy_data, "--domain", "json", "--base", tiny_base, "--max-steps", "5", *FAST]
    assert run_cli([*args, "--out", tmp_path / "a"]) == 0
    assert run_cli([*args, "--out", tmp_path / "b"]) == 0
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert run_cli([*args, "--out", tmp_path / "a"]) == 2
    assert "already holds files; pass --resume" in capsys.readouterr().err
    assert run_cli([*args, "--out", tmp_path / "a", "--overwrite"]) == 0


def test_cli_errors_are_one_line_exit_2(tiny_base, tmp_path, toy_data):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"domain": "math", "prompt": "q", "response": "a"}', "{oops"])
    cases = [
        (["--data", toy_data, "--domain", "nope"], "no record of domain 'nope'"),
        (["--data", bad, "--domain", "math"], f"{bad}:2: invalid JSON"),
        (["--data", tmp_path / "missing.jsonl", "--domain", "math"], "no such file"),
        (["--data", toy_data, "--domain", "math", "--targets", "nonexistent_proj"], "not found in the base model"),
        (["--data", toy_data, "--domain", "math", "--rank", "0"], "--rank must be positive"),
    ]
    for extra, msg in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "moa.cli", "train-expert", "--base", str(tiny_base), "--out",
             str(tmp_path / "o"), "--max-steps", "1", *map(str, extra)],
            capture_output=True, text=True,
        )
        assert proc.returncode == 2, (extra, proc.stderr)
        assert msg in proc.stderr, (msg, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("moa: error: ")
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_score_cli_writes_lines_and_summary(tiny_base, tmp_path, toy_data, capsys):
    out = tmp_path / "scores.jsonl"
    assert run_cli(["score", "--data", toy_data, "--out", out, "--base", tiny_base, "--domain", "echo"]) == 0
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 8 and all(r["domain"] == "echo" and r["tokens"] > 0 and r["logprob"] < 0 for r in rows)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"echo"} and summary["echo"]["tokens"] == sum(r["tokens"] for r in rows)


def test_init_adapter_starts_from_the_seed_and_rejects_a_mismatch(tiny_base, tmp_path, toy_data, capsys):
    common = ["train-expert", "--data", toy_data, "--base", tiny_base, *FAST]
    seed = tmp_path / "seed"
    assert run_cli([*common, "--domain", "math", "--out", seed, "--max-steps", "6"]) == 0
    # One step at a negligible lr from the seed: the expert is the seed (and not the fresh init, B = 0).
    assert run_cli([*common, "--domain", "json", "--out", tmp_path / "from_seed", "--max-steps", "1",
                    "--lr", "1e-12", "--init-adapter", seed]) == 0
    s = load_file(seed / "adapter_model.safetensors")
    e = load_file(tmp_path / "from_seed" / "adapter_model.safetensors")
    assert s.keys() == e.keys()
    for k in s:
        torch.testing.assert_close(e[k], s[k], atol=1e-9, rtol=0)
    assert any(k.endswith("lora_B.weight") and s[k].abs().sum() > 0 for k in s)
    cfg = json.loads((tmp_path / "from_seed" / "train_config.json").read_text())
    assert cfg["init_adapter"] == str(seed.resolve())
    # A seed of another rank or other modules is refused before anything is written.
    capsys.readouterr()
    assert run_cli([*common, "--domain", "json", "--out", tmp_path / "r", "--max-steps", "1",
                    "--init-adapter", seed, "--rank", "4"]) == 2
    assert "has rank 16" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert run_cli([*common, "--domain", "json", "--out", tmp_path / "t", "--max-steps", "1",
                    "--init-adapter", seed, "--targets", "q_proj"]) == 2
    assert "does not adapt the same modules" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert run_cli([*common, "--domain", "json", "--out", tmp_path / "m", "--max-steps", "1",
                    "--init-adapter", tmp_path / "nothing"]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_interpolate_writes_the_weight_space_average_of_seed_and_trained(tiny_base, tmp_path, toy_data, capsys):
    """--interpolate T: the adapter is seed + T x (trained - seed) in every LoRA matrix, the trained
    weights are kept in OUT/trained, and the result loads as a standard PEFT adapter; T = 1 writes
    the trained weights; T outside [0, 1] or without --init-adapter is refused before any training."""
    from peft import PeftModel

    from moa.base import load_base

    common = ["train-expert", "--data", toy_data, "--base", tiny_base, *FAST]
    seed = tmp_path / "seed"
    assert run_cli([*common, "--domain", "math", "--out", seed, "--max-steps", "4"]) == 0
    on = [*common, "--domain", "json", "--max-steps", "4", "--init-adapter", seed]
    assert run_cli([*on, "--out", tmp_path / "half", "--interpolate", "0.5", "--eval-data", toy_data,
                    "--eval-every", "2", "--keep-best-per-domain"]) == 0
    assert run_cli([*on, "--out", tmp_path / "full"]) == 0
    s = load_file(seed / "adapter_model.safetensors")
    trained = load_file(tmp_path / "half" / "trained" / "adapter_model.safetensors")
    half = load_file(tmp_path / "half" / "adapter_model.safetensors")
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    assert s.keys() == trained.keys() == half.keys() == full.keys()
    moved = 0
    for k in s:
        torch.testing.assert_close(trained[k], full[k])  # same seed, same steps: the same training
        torch.testing.assert_close(half[k], (s[k] + trained[k]) / 2)
        moved += int(not torch.equal(trained[k], s[k]))
    assert moved > len(s) // 2  # the training moved the weights: the average is not trivially the seed
    info = json.loads((tmp_path / "half" / "moa_adapter.json").read_text())
    assert info["interpolated"] == {"t": 0.5, "init": str(seed.resolve()), "trained": "trained"}
    assert "interpolated" not in json.loads((tmp_path / "full" / "moa_adapter.json").read_text())
    best = tmp_path / "half" / "best_by_domain"  # trained weights of a step: not labelled interpolated
    assert sorted(p.name for p in best.iterdir()) and all(
        "interpolated" not in json.loads((p / "moa_adapter.json").read_text()) for p in best.iterdir())
    assert not (tmp_path / "full" / "trained").exists()
    assert run_cli([*on, "--out", tmp_path / "half", "--overwrite"]) == 0  # T = 1 again in the same --out
    assert not (tmp_path / "half" / "trained").exists()
    assert all(torch.equal(v, full[k]) for k, v in load_file(tmp_path / "half" / "adapter_model.safetensors").items())
    model, _ = load_base(tiny_base)
    PeftModel.from_pretrained(model, str(tmp_path / "half"))  # a standard adapter
    capsys.readouterr()
    assert run_cli([*on, "--out", tmp_path / "bad", "--interpolate", "1.5"]) == 2
    assert "--interpolate must be in [0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert run_cli([*common, "--domain", "json", "--max-steps", "1", "--out", tmp_path / "bad",
                    "--interpolate", "0.5"]) == 2
    assert "--interpolate needs --init-adapter" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_lr_scaling_tokens_gives_short_answers_a_smaller_lr(tiny_base, tmp_path, toy_data, capsys):
    lrs = {}
    for d in ("math", "json"):
        out = tmp_path / d
        assert run_cli(["train-expert", "--data", toy_data, "--domain", d, "--base", tiny_base, "--out", out,
                        "--max-steps", "2", "--lr-scaling", "tokens", *FAST]) == 0
        lrs[d] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["lr"]
        assert f"label tokens per '{d}' row" in capsys.readouterr().err
    # math answers are 1-2 digits, json answers a dict of ~10 tokens: below and above the mean
    assert lrs["math"] < 1e-2 < lrs["json"]
    cfg = json.loads((tmp_path / "math" / "train_config.json").read_text())
    assert cfg["lr_scaling"] == "tokens" and cfg["train"]["lr"] == 1e-2
