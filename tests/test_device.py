"""One device / dtype policy (moa.device) for every command, bf16 bases with float32 experts, and
`--base` as a Hugging Face hub id read from a real hub-cache layout (offline: the environment is
set by conftest and by the subprocesses here, never by `import moa`).

No GPU here: the CUDA paths are exercised as far as a CPU allows: device resolution with CUDA
faked present, and where every parameter of a model built on the meta device ends up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, ROUTED_DOMAINS, synthetic_records, write_jsonl
from moa import device as dev
from moa.cli import build_parser, main
from moa.errors import MoAError

MODEL_COMMANDS = ["train-expert", "train", "baseline mixed-lora", "baseline moe-lora", "baseline classifier",
                  "assemble", "route", "score", "eval", "generate", "chat", "serve", "add-expert",
                  "retrain-expert", "demo", "export", "gateway", "fit"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- the policy


def test_import_moa_sets_no_environment_variable():
    code = ("import os; before = dict(os.environ); import moa, moa.cli, moa.model, moa.base; "
            "moa.cli.build_parser(); print(os.environ.get('HF_HUB_OFFLINE')); "
            "print(sorted(set(os.environ) ^ set(before)))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["None", "[]"], proc.stdout


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(None) == torch.device("cpu")
    with pytest.raises(MoAError, match="no CUDA device is available here"):
        dev.resolve_device("cuda")
    with pytest.raises(MoAError, match="--device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"):
        dev.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process: its own GPU
    assert dev.resolve_device("auto") == dev.resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(MoAError, match="has 2 CUDA device"):
        dev.resolve_device("cuda:2")


def test_resolve_dtype_auto_is_native_bf16_or_the_moa_bf16_policy(monkeypatch):
    monkeypatch.delenv(dev.BF16_ENV, raising=False)
    for native in (True, False):
        monkeypatch.setattr(dev, "bf16_native", lambda device=None, native=native: native)
        assert dev.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv(dev.BF16_ENV, "0")
    assert dev.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setenv(dev.BF16_ENV, "1")
    monkeypatch.setattr(dev, "bf16_native", lambda device=None: False)
    assert dev.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert dev.resolve_dtype("float16") == torch.float16 and dev.resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(MoAError, match="--dtype must be one of auto, float32, bfloat16, float16, got 'int8'"):
        dev.resolve_dtype("int8")


def test_placement_is_what_loads_follow_and_explicit_arguments_win(tiny_base):
    from moa.base import load_base

    assert dev.current() == dev.Placement(torch.device("cpu"), torch.float32)  # Python's default: as before
    with dev.placement("cpu", "bfloat16"):
        model, _ = load_base(tiny_base)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        model, _ = load_base(tiny_base, dtype=torch.float32)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert dev.current().dtype == torch.float32


def test_bases_load_without_hub_kernels(tiny_base, routed_moa_dir):
    """With `kernels` installed, transformers kernelizes by default and, on a GPU, downloads the
    kernels (an offline GPU machine could not load the base). moa's loads opt out."""
    from moa.base import load_base, load_base_prefix
    from moa.model import MoAModel

    assert load_base(tiny_base)[0].use_kernels is False
    assert load_base_prefix(tiny_base, 1)[0].use_kernels is False
    assert MoAModel.from_pretrained(routed_moa_dir).base_model.use_kernels is False


def test_every_model_loading_command_has_device_and_dtype_with_defaults_in_help():
    parsers = {}

    def walk(p, path):
        parsers[" ".join(path)] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, (*path, name))

    walk(build_parser(), ())
    for name in MODEL_COMMANDS:
        text = " ".join(parsers[name].format_help().split())
        assert "--device DEVICE where the model runs: auto (CUDA when present, else CPU)" in text, name
        assert "(default: auto)" in text.rsplit("--device DEVICE", 1)[1].split("--", 1)[0], name
        assert "--dtype" in text, name
        if name != "export":  # export's --dtype is that of the weights it writes (it merges in float32)
            assert "--dtype {auto,float32,bfloat16,float16} dtype of the frozen base weights" in text, name
            assert "natively" in text and "(default: auto)" in text.rsplit("--dtype {", 1)[1], name


def test_device_that_is_not_here_is_one_line_exit_2(routed_moa_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["generate", "hi", "--moa", str(routed_moa_dir), "--device", "cuda", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("moa: error: --device cuda: no CUDA device is available here"), err


def test_meta_device_places_experts_and_routers_with_the_base_in_float32():
    """What CUDA would do, checked where a CPU can: every tensor of the MoA goes where the base is;
    the base keeps its dtype, experts and routers are float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moa.checkpoint import Adapter
    from moa.model import MoAModel

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    moa = MoAModel(base, None, base="meta", target_modules=["q_proj", "v_proj"])
    weights = {f"model.layers.{i}.self_attn.{m}": (torch.randn(4, 32), torch.randn(out, 4))
               for i in range(2) for m, out in (("q_proj", 32), ("v_proj", 16))}
    moa.add_expert("a", Adapter("mem", 4, 8, False, None, weights))
    assert moa.device == torch.device("meta")
    assert {(p.device.type, p.dtype) for p in moa.base_model.parameters() if not _is_moa(moa, p)} \
        == {("meta", torch.bfloat16)}
    ours = [*moa.routers.parameters(), *(t for m in moa.lora_modules.values() for t in (m.lora_A, m.lora_B, m.scaling))]
    assert ours and {(t.device.type, t.dtype) for t in ours} == {("meta", torch.float32)}


def _is_moa(moa, p) -> bool:
    return any(p is m.lora_A or p is m.lora_B for m in moa.lora_modules.values())


# --------------------------------------------------------------------------- bf16 base, float32 experts


def _mean_nll(summary: dict) -> float:
    import math

    return sum(math.log(v["ppl"]) * v["tokens"] for v in summary.values()) / sum(v["tokens"] for v in summary.values())


def test_score_with_a_bf16_base_is_within_1_percent_of_float32(routed_moa_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(4))
    nll = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["score", "--moa", str(routed_moa_dir), "--data", str(data), "--out", str(tmp_path / dtype),
                     "--routing", "explicit", "--dtype", dtype]) == 0
        nll[dtype] = _mean_nll(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert abs(nll["bfloat16"] - nll["float32"]) <= 0.01 * nll["float32"], nll
    assert nll["bfloat16"] != nll["float32"]  # the base really ran in bf16


def test_bf16_base_keeps_experts_and_routers_float32_and_checkpoints_are_portable(routed_moa_dir, tmp_path):
    from moa.model import MoAModel

    m16 = MoAModel.from_pretrained(routed_moa_dir, dtype="bfloat16")
    base16 = [p for n, p in m16.base_model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base16} == {torch.bfloat16}
    assert {p.dtype for p in m16.routers.parameters()} == {torch.float32}
    assert {m.lora_A.dtype for m in m16.lora_modules.values()} == {torch.float32}
    saved = m16.save_pretrained(tmp_path / "from_bf16")
    m32 = MoAModel.from_pretrained(saved, dtype="float32")
    assert {p.dtype for p in m32.base_model.parameters()} == {torch.float32}
    ref = MoAModel.from_pretrained(routed_moa_dir, dtype="float32")
    for d in ROUTED_DOMAINS:  # the experts went through a bf16-base model unrounded
        a, b = m32.expert_state_dict(d), ref.expert_state_dict(d)
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)
    assert all(torch.equal(x, y) for x, y in zip(m32.router_state_dict().values(), ref.router_state_dict().values()))


def test_training_on_a_bf16_base_autocasts_and_saves_float32_that_loads_on_float32(routed_moa_dir, tmp_path,
                                                                                     capsys):
    from safetensors.torch import load_file

    from moa.model import MoAModel

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(2))
    out = tmp_path / "run"
    assert main(["train", "--moa", str(routed_moa_dir), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "3", "--dtype", "bfloat16"]) == 0
    assert "bf16=True" in capsys.readouterr().out  # autocast follows the bf16 weights
    tensors = load_file(out / "experts" / ROUTED_DOMAINS[0] / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    model = MoAModel.from_pretrained(out, dtype="float32")
    assert {p.dtype for p in model.base_model.parameters()} == {torch.float32}


# --------------------------------------------------------------------------- --base as a hub id


def _hub_cache(root: Path, repo_id: str, model_dir: Path, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "blobs").mkdir()
    return snap


@pytest.fixture
def hub_cache(tiny_base, tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    snap = _hub_cache(root, "tiny-org/tiny-llama", tiny_base)
    # huggingface_hub reads these once at import; a user sets HF_HUB_CACHE / HF_HUB_OFFLINE instead
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root, snap


def test_hub_id_loads_from_the_local_cache_offline_and_is_recorded_as_given(hub_cache, routed_moa_dir, tmp_path):
    from moa.base import load_base, resolve_base
    from moa.checkpoint import MoAConfig
    from moa.model import MoAModel

    root, snap = hub_cache
    assert resolve_base("tiny-org/tiny-llama") == snap
    model, tok = load_base("tiny-org/tiny-llama", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and tok.pad_token_id is not None
    experts = [routed_moa_dir / "experts" / d for d in ROUTED_DOMAINS]
    moa = MoAModel.from_adapters(experts, base="tiny-org/tiny-llama")
    saved = moa.save_pretrained(tmp_path / "moa")
    assert MoAConfig.read(saved).base == "tiny-org/tiny-llama"
    assert MoAModel.from_pretrained(saved).domains == ROUTED_DOMAINS


def test_hub_id_not_cached_while_offline_is_the_one_line_error(hub_cache):
    from moa.base import resolve_base

    with pytest.raises(MoAError) as e:
        resolve_base("tiny-org/not-there")
    assert str(e.value) == ("base 'tiny-org/not-there' is not in the local Hugging Face cache and the hub is "
                            "offline (HF_HUB_OFFLINE=1)")


def test_hub_id_on_the_command_line_with_hf_hub_cache(tiny_base, tmp_path):
    """The whole path a user takes: HF_HUB_CACHE / HF_HUB_OFFLINE in the environment, `--base org/name`."""
    _hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_base)
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(1))
    env = _env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", MOA_CACHE=str(tmp_path / "moa_cache"))
    cmd = [sys.executable, "-m", "moa.cli", "score", "--data", str(data), "--out", str(tmp_path / "s.jsonl")]
    ok = subprocess.run([*cmd, "--base", "tiny-org/tiny-llama"], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert set(json.loads(ok.stdout.strip().splitlines()[-1])) == {"math", "echo", "json"}
    bad = subprocess.run([*cmd, "--base", "tiny-org/missing"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr == ("moa: error: base 'tiny-org/missing' is not in the local Hugging Face cache and the hub "
                          "is offline (HF_HUB_OFFLINE=1)\n"), bad.stderr
