"""Trainings of different precisions in one process, and the $MOA_BF16 policy.

accelerate keeps one process-wide precision that cannot change once set; the Trainer keeps
accelerate at "no" and runs its own autocast, so a bf16 training and a float32 one can follow
each other in any order (a notebook, `moa demo`). bf16 autocast on a tiny model works on every
CPU (emulated where not native), so these tests run everywhere.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, write_jsonl
from moa.cli import main
from moa.errors import MoAError
from moa.device import BF16_ENV, resolve_bf16
from moa.trainer import bf16_supported

STEPS = ["--max-steps", "6", "--batch-size", "4", "--lr", "1e-2", "--seed", "5"]


def _train(tiny_base, data, out, precision):
    assert main(["train-expert", "--data", str(data), "--domain", "echo", "--base", str(tiny_base),
                 "--out", str(out), *STEPS, precision]) == 0
    return load_file(out / "adapter_model.safetensors")


def test_bf16_and_float32_trainings_in_one_process_in_either_order(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(4))
    # The float32 reference comes from a process of its own, which has never seen bf16.
    ref_dir = tmp_path / "ref"
    proc = subprocess.run([sys.executable, "-m", "moa.cli", "train-expert", "--data", str(data), "--domain", "echo",
                           "--base", str(tiny_base), "--out", str(ref_dir), *STEPS, "--no-bf16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = load_file(ref_dir / "adapter_model.safetensors")

    # float32 -> bf16 -> float32 -> bf16 in this one process: every order of the two.
    fp32_a = _train(tiny_base, data, tmp_path / "fp32_a", "--no-bf16")
    bf16_a = _train(tiny_base, data, tmp_path / "bf16_a", "--bf16")
    fp32_b = _train(tiny_base, data, tmp_path / "fp32_b", "--no-bf16")
    bf16_b = _train(tiny_base, data, tmp_path / "bf16_b", "--bf16")
    out = capsys.readouterr().out
    assert out.count("bf16=True") == 2 and out.count("bf16=False") == 2, out

    assert set(ref) == set(fp32_a) == set(bf16_a)
    for k in ref:
        # float32 after a bf16 run is the float32-only run, to the bit.
        assert torch.equal(fp32_a[k], ref[k]), k
        assert torch.equal(fp32_b[k], ref[k]), k
        # bf16 runs are reproducible too, and trained (finite, not the float32 weights).
        assert torch.equal(bf16_a[k], bf16_b[k]), k
        assert torch.isfinite(bf16_a[k]).all(), k
    assert any(not torch.equal(bf16_a[k], ref[k]) for k in ref), "the bf16 run computed in float32"
    # Same training, different rounding: the weights stay close.
    diff = max(float((bf16_a[k] - ref[k]).abs().max()) for k in ref)
    scale = max(float(ref[k].abs().max()) for k in ref)
    assert diff < 0.5 * scale, (diff, scale)


def test_moa_bf16_policy(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "1")
    assert resolve_bf16(None) is True
    monkeypatch.setenv(BF16_ENV, "0")
    assert resolve_bf16(None) is False
    assert resolve_bf16(True) is True  # an explicit flag wins over the policy
    monkeypatch.setenv(BF16_ENV, "auto")
    assert resolve_bf16(None) is bf16_supported()
    assert resolve_bf16(False) is False
    monkeypatch.delenv(BF16_ENV)
    assert resolve_bf16(None) is bf16_supported()
    monkeypatch.setenv(BF16_ENV, "maybe")
    with pytest.raises(MoAError, match="MOA_BF16 must be auto, 1 or 0, got 'maybe'"):
        resolve_bf16(None)


def test_a_bad_moa_bf16_is_a_one_line_error(tiny_base, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(2))
    monkeypatch.setenv(BF16_ENV, "sometimes")
    rc = main(["train-expert", "--data", str(data), "--domain", "echo", "--base", str(tiny_base),
               "--out", str(tmp_path / "x"), "--max-steps", "1", "--batch-size", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "MOA_BF16 must be auto, 1 or 0" in err and "Traceback" not in err
