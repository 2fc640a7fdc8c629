"""Bad input never shows a traceback; interruption and failed writes lose nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, write_jsonl
from moa.cli import main

GOOD = {"domain": "math", "prompt": "Add 1 and 2.", "response": "3"}


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Kinds of bad training file -> (path, expected message part)."""
    def w(name, lines):
        p = tmp / name
        p.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
        return p

    g = json.dumps(GOOD)
    return {
        "malformed JSON": (w("a.jsonl", [g, '{"domain": "math", "prompt": ']), "a.jsonl:2: invalid JSON"),
        "empty file": (w("b.jsonl", []), "empty file"),
        "invalid UTF-8": (w("c.jsonl", [g, b'{"domain": "math", "prompt": "\xc3\x28", "response": "x"}']), "c.jsonl:2: invalid UTF-8"),
        "missing field": (w("d.jsonl", [json.dumps({"prompt": "q", "response": "a"})]), "d.jsonl:1: missing field 'domain'"),
        "wrongly typed field": (w("e.jsonl", [json.dumps({"domain": "math", "messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]})]), "e.jsonl:1: messages[0] is missing string field 'content'"),
        "empty assistant content": (w("f.jsonl", [json.dumps({"domain": "math", "prompt": "q", "response": ""})]), "f.jsonl:1: empty assistant content"),
        "no assistant turn": (w("g.jsonl", [json.dumps({"domain": "math", "messages": [{"role": "user", "content": "q"}]})]), "g.jsonl:1: no assistant turn"),
        "not an object": (w("h.jsonl", ['"just a string"']), "h.jsonl:1: expected a JSON object"),
        "missing file": (tmp / "nope.jsonl", "no such file"),
    }


def test_bad_training_files_and_unknown_domain_exit_2_without_traceback(tiny_base, tmp_path):
    cases = {k: (p, m, "math") for k, (p, m) in bad_files(tmp_path).items()}
    cases["unknown domain"] = (write_jsonl(tmp_path / "ok.jsonl", [GOOD]), "no record of domain 'finance'", "finance")
    assert len(cases) >= 10
    # One subprocess for the whole table keeps the test fast; each case is a separate CLI call.
    script = (
        "import json, sys, io, contextlib\n"
        "from moa.cli import main\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(args)\n"
        "    out.append([rc, err.getvalue()])\n"
        "print(json.dumps(out))\n"
    )
    argv = [["train-expert", "--data", str(p), "--domain", dom, "--out", str(tmp_path / "run"), "--base",
             str(tiny_base), "--max-steps", "1"] for p, _, dom in cases.values()]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (kind, (_, msg, _)), (rc, err) in zip(cases.items(), results):
        assert rc == 2, (kind, err)
        assert msg in err, (kind, msg, err)
        assert err.startswith("moa: error: ") and len(err.strip().splitlines()) == 1, (kind, err)
        assert "Traceback" not in err and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was created for a run that could not start


def test_skip_invalid_skips_and_reports(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, "{bad", GOOD, json.dumps({"domain": "math"})])
    rc = main(["train-expert", "--data", str(data), "--domain", "math", "--out", str(tmp_path / "o"), "--base",
               str(tiny_base), "--max-steps", "1", "--batch-size", "2", "--skip-invalid", "--no-bf16"])
    assert rc == 0
    assert "skipped 2 invalid line(s)" in capsys.readouterr().err


def test_other_commands_refuse_bad_input(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(2))
    cases = [
        (["score", "--data", str(data), "--out", str(tmp_path / "s.jsonl"), "--base", str(tiny_base), "--adapter",
          str(tmp_path)], "not a PEFT adapter"),
        (["assemble", "--experts", str(tmp_path / "missing"), "--out", str(tmp_path / "m")], "not a PEFT adapter"),
        (["route", "--moa", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "r.json")], "moa_config.json"),
        (["score", "--data", str(data), "--out", str(tmp_path / "s.jsonl"), "--base", str(tmp_path / "no_base")], "unknown base model"),
        (["generate", "--moa", str(tmp_path / "nothing"), "hello"], "moa_config.json"),
        (["eval", "--moa", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "e"),
          "--generate-limit", "0"], "generate_limit_per_domain must be a positive number"),
    ]
    for args, msg in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert msg in err and err.startswith("moa: error: ") and "Traceback" not in err, (args, err)


def _train_cmd(tiny_base, data, out, steps=160):
    return [sys.executable, "-m", "moa.cli", "train-expert", "--data", str(data), "--domain", "math", "--out", str(out),
            "--base", str(tiny_base), "--max-steps", str(steps), "--save-every", "8", "--batch-size", "4",
            "--lr", "5e-3", "--dropout", "0.1", "--no-bf16"]


def _wait_for_checkpoint(out: Path, at_least: int, proc, timeout=120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        ck = out / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in ck.iterdir() if p.name.startswith("step-")] if ck.is_dir() else []
        if steps and max(steps) >= at_least:
            return
        time.sleep(0.05)


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(12))
    full = tmp_path / "full"
    subprocess.run(_train_cmd(tiny_base, data, full), check=True, capture_output=True)
    out = tmp_path / "killed"
    kills = 0
    for target in (8, 40, 96):
        cmd = _train_cmd(tiny_base, data, out) + (["--resume"] if kills else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_checkpoint(out, target, proc)
        time.sleep(0.03 * kills)  # kill at varying moments: right after, or during, a checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    subprocess.run(_train_cmd(tiny_base, data, out) + ["--resume"], check=True, capture_output=True)
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    # no half-written temporary checkpoint survives as a "complete" one
    for p in (out / "checkpoints").iterdir():
        if p.name.startswith("step-"):
            assert (p / "state.json").is_file()


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_base, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(4))
    out = tmp_path / "run"
    args = ["train-expert", "--data", str(data), "--domain", "math", "--out", str(out), "--base", str(tiny_base),
            "--max-steps", "24", "--save-every", "8", "--batch-size", "4", "--no-bf16"]
    import moa.trainer as trainer

    real = trainer.save_tensors
    calls = {"n": 0}

    def failing(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 3:  # the second checkpoint's weights (calls: weights, rng of step 8, then step 16)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(trainer, "save_tensors", failing)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-0000008 is intact" in err
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000008"]
    assert load_file(ck / "step-0000008" / "trainable.safetensors")
    # and the run resumes from it
    monkeypatch.setattr(trainer, "save_tensors", real)
    assert main(args + ["--resume"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_failed_moa_write_keeps_the_existing_checkpoint(tiny_base, tmp_path, monkeypatch):
    from moa import MoAModel
    from moa.stages import publish_checkpoint
    import moa.io

    model = _tiny_moa(tiny_base, tmp_path)
    out = tmp_path / "published"
    publish_checkpoint(model, out, {"n": 1})
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with torch.no_grad():
        for r in model.routers:
            r.weight.add_(1.0)
    monkeypatch.setattr(moa.io, "fsync_tree", lambda root: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(OSError):
        publish_checkpoint(model, out, {"n": 2})
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    MoAModel.from_pretrained(out)  # still loadable


def test_loading_refuses_pickled_optimizer_state(tiny_base, tmp_path):
    import pickle

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(4))
    out = tmp_path / "run"
    args = ["train-expert", "--data", str(data), "--domain", "math", "--out", str(out), "--base", str(tiny_base),
            "--max-steps", "16", "--save-every", "8", "--batch-size", "4", "--no-bf16"]
    assert main(args) == 0
    ck = out / "checkpoints" / "step-0000008"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (ck / "optimizer.pt").write_bytes(pickle.dumps({"state": Evil()}))
    capsys_err = _run_capture(args + ["--resume"])
    assert capsys_err[0] == 2 and "refusing to load it" in capsys_err[1]
    assert not (tmp_path / "pwned").exists()


def _run_capture(args):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, err.getvalue()


def _tiny_moa(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    from moa import MoAModel
    from moa.base import load_base

    dirs = []
    for i, d in enumerate(("a", "b")):
        m, _ = load_base(tiny_base)
        torch.manual_seed(i)
        get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(tmp_path / d)
        dirs.append(tmp_path / d)
    return MoAModel.from_adapters(dirs)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(12))
    out = tmp_path / "run"
    cmd = _train_cmd(tiny_base, data, out, steps=20000)  # far more than it runs before the signal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out, 8, proc)
    assert proc.poll() is None, "the run ended before the signal: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "checkpoint saved to" in stdout and "--resume" in stdout
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert max(steps) >= 8
