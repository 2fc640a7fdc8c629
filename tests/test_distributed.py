"""Data-parallel training on CPU: `torchrun --nproc_per_node 2` (gloo) gives the weights of one
process with the same global batch and seed, and only rank 0 writes files.

Each rank runs the real `moa` entry point under a small wrapper that records, through a Python
audit hook, every file it creates, writes, renames or deletes under the test's directory.
The test is skipped (with the launcher's output as the reason) only when torchrun itself
cannot start two processes here, e.g. no free port; any failure inside moa fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, write_jsonl
from moa import MoAModel
from moa.base import load_base
from moa.cli import main

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun")] if (BIN / "torchrun").exists() else [sys.executable, "-m", "torch.distributed.run"]
MOA = BIN / "moa"
COMMON = ["--max-steps", "4", "--no-bf16", "--lr", "1e-3", "--seed", "3"]
# Errors of the launcher / rendezvous / gloo sockets: the machine cannot run the test.
LAUNCH_FAILURE = re.compile(
    r"EADDRINUSE|Address already in use|Cannot assign requested address|DistNetworkError|"
    r"Rendezvous\w*Error|Connection refused|\[Errno (98|99|111)\]", re.I)

AUDIT = r'''
"""Run a console script (argv[1]) and report, at exit, the files this rank touched under $MOA_AUDIT_DIR."""
import atexit, json, os, runpy, sys

ROOT = os.path.realpath(os.environ["MOA_AUDIT_DIR"])
RANK = os.environ.get("RANK", "?")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.truncate",
           "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chmod"}
touched, busy = [], [False]

def mine(p):
    try:
        p = os.path.realpath(os.fsdecode(p))
    except TypeError:  # a file descriptor
        return None
    return p if p == ROOT or p.startswith(ROOT + os.sep) else None

def hook(event, args):
    if busy[0] or not (event == "open" or event in CHANGES):
        return
    busy[0] = True
    try:
        if event == "open":
            path, mode, flags = args
            writes = bool((flags or 0) & WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            paths = [path] if writes else []
        else:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        for p in paths:
            p = mine(p)
            if p:
                touched.append(f"{event} {p}")
    finally:
        busy[0] = False

def report():
    # One file per rank: the ranks share stdout, where two long lines can interleave.
    busy[0] = True
    with open(os.path.join(os.environ["MOA_AUDIT_REPORTS"], f"rank-{RANK}.json"), "w") as f:
        json.dump({"rank": RANK, "touched": touched}, f)

atexit.register(report)
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def torchrun(tmp_path: Path, args: list) -> tuple[str, dict[str, list[str]]]:
    """Run `torchrun --nproc_per_node 2 moa ARGS`; returns (output, {rank: files touched})."""
    wrapper = tmp_path / "audit_rank.py"
    wrapper.write_text(AUDIT)
    reports = Path(tempfile.mkdtemp(prefix="moa-audit-"))  # outside the audited tree
    env = {**os.environ, "MOA_AUDIT_DIR": str(tmp_path), "MOA_AUDIT_REPORTS": str(reports), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), str(MOA), "--debug", *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 300 s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "world_size=" not in out and LAUNCH_FAILURE.search(out):
        pytest.skip(f"torchrun cannot start 2 gloo processes on this machine (exit {proc.returncode}): "
                    f"{out.strip()[-600:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{out[-6000:]}"
    audits = {}
    for f in sorted(reports.glob("rank-*.json")):
        a = json.loads(f.read_text())
        audits[a["rank"]] = a["touched"]
    shutil.rmtree(reports, ignore_errors=True)
    assert set(audits) == {"0", "1"}, out[-3000:]
    return out, audits


def check_run(out: str, audits: dict, out_dir: Path) -> None:
    """The trainer saw 2 processes, printed once, and only rank 0 wrote."""
    lines = [l for l in out.splitlines() if "world_size=" in l]
    assert len(lines) == 1 and "world_size=2 " in lines[0], lines
    assert audits["1"] == [], f"rank 1 wrote files: {audits['1'][:10]}"
    # The audit sees writes (rank 0's), so rank 1's empty list means something.
    assert any(str(out_dir) in t for t in audits["0"]), audits["0"][:10]


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-5) -> float:
    """Tensors of two safetensors files agree within atol; returns the largest difference."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst <= atol, (a.name, worst)
    return worst


def largest_change(a: Path, b: Path) -> float:
    ta, tb = load_file(a), load_file(b)
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def test_stage1_two_processes_equal_one(tiny_base, tmp_path, toy_data):
    args = ["train-expert", "--data", toy_data, "--domain", "math", "--base", tiny_base, "--batch-size", "4",
            "--dropout", "0", *COMMON]  # dropout 0: each rank would draw its own masks
    two, one = tmp_path / "two", tmp_path / "one"
    out, audits = torchrun(tmp_path, [*args, "--out", two])
    check_run(out, audits, two)
    assert "global_batch=4 micro_batch=2" in out
    assert main([*map(str, args), "--out", str(one)]) == 0

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert_same_tensors(two / "adapter_model.safetensors", one / "adapter_model.safetensors")
    # lora_B starts at zero: the runs did move the weights, far beyond the tolerance.
    assert max(float(t.abs().max()) for k, t in load_file(one / "adapter_model.safetensors").items()
               if "lora_B" in k) > 1e-3
    l2 = [json.loads(l) for l in open(two / "train_log.jsonl")]
    l1 = [json.loads(l) for l in open(one / "train_log.jsonl")]
    assert [r["loss"] for r in l2] == pytest.approx([r["loss"] for r in l1], abs=1e-5)
    assert json.loads((two / "train_config.json").read_text()) == json.loads((one / "train_config.json").read_text())


def test_stage2_two_processes_with_grad_accum_equal_one(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapters = []
    for seed, (name, r) in enumerate([("math", 8), ("echo", 4)]):
        model, _ = load_base(tiny_base)
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        get_peft_model(model, cfg).save_pretrained(tmp_path / name)
        adapters.append(tmp_path / name)
    moa = MoAModel.from_adapters(adapters).save_pretrained(tmp_path / "moa")
    data = write_jsonl(tmp_path / "two_domains.jsonl", [r for r in synthetic_records() if r["domain"] != "json"])

    # 5 validation records: the ranks validate 3 and 2 of them, in different numbers of batches.
    valid = write_jsonl(tmp_path / "valid.jsonl", [r for r in synthetic_records(4, seed=1) if r["domain"] != "json"][:5])
    # 2 processes x 2 micro-batches of 2 rows == 1 process x 1 batch of 8 rows.
    args = ["train", "--moa", moa, "--data", data, "--batch-size", "8", *COMMON, "--eval-data", valid,
            "--eval-every", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    out, audits = torchrun(tmp_path, [*args, "--grad-accum", "2", "--out", two])
    check_run(out, audits, two)
    assert "global_batch=8 micro_batch=2 grad_accum=2" in out
    assert main([*map(str, args), "--out", str(one)]) == 0

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for f in ["router.safetensors", "experts/math/adapter_model.safetensors", "experts/echo/adapter_model.safetensors"]:
        assert_same_tensors(two / f, one / f)
        assert largest_change(one / f, moa / f) > 1e-3, f  # they trained
    assert MoAModel.from_pretrained(two).domains == ["math", "echo"]
    l2 = [json.loads(l) for l in open(two / "train_log.jsonl")]
    l1 = [json.loads(l) for l in open(one / "train_log.jsonl")]
    for key in ("lm_loss", "router_loss", "router_acc"):
        assert [r[key] for r in l2] == pytest.approx([r[key] for r in l1], abs=1e-5), key
    for key in ("val_loss", "val_router_acc"):  # summed over both ranks' shares of the validation set
        assert [r.get(key) for r in l2] == pytest.approx([r.get(key) for r in l1], abs=1e-5), key
        assert [key in r for r in l1] == [False, True, False, True]
