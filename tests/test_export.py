"""`moa export` on a tiny MoA checkpoint: merged == explicit routing, PEFT round trip, vLLM files, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from moa import MoAModel
from moa.base import load_base
from moa.cli import main

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UMASK = os.umask(0o022)
os.umask(UMASK)
TEXTS = ["Add 3 and 4.", "REPEAT: apple apple", "json key=k7 and a longer tail"]


def make_adapter(base_dir, out_dir, r, alpha, targets=TARGETS, seed=0, use_rslora=False):
    """A PEFT LoRA with non-trivial A and B (init_lora_weights=False), so experts differ."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        use_rslora=use_rslora, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def moa_dir(tmp_path_factory, tiny_base):
    # Different ranks, an rsLoRA scaling, and an expert on a subset of the modules.
    root = tmp_path_factory.mktemp("export_src")
    model = MoAModel.from_adapters([
        make_adapter(tiny_base, root / "fin", r=4, alpha=8, seed=1),
        make_adapter(tiny_base, root / "med", r=8, alpha=4, seed=2, use_rslora=True),
    ])
    model.add_expert("law", make_adapter(tiny_base, root / "law", r=2, alpha=4, targets=["q_proj", "v_proj"], seed=3))
    return model.save_pretrained(root / "moa")


@pytest.fixture(scope="module")
def moa(moa_dir):
    return MoAModel.from_pretrained(moa_dir)


def encode(tok):
    """Right-padded batch: (input_ids (B, T), attention_mask (B, T))."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def explicit_logits(moa, domain):
    ids, mask = encode(moa.tokenizer)
    return moa(input_ids=ids, attention_mask=mask, domains=[domain] * len(TEXTS)).logits, mask


@torch.no_grad()
def hf_logits(model, tok):
    ids, mask = encode(tok)
    return model(input_ids=ids, attention_mask=mask).logits


def assert_logits_close(a, b, mask, atol=1e-4):
    keep = mask.bool()  # padding positions are not compared
    torch.testing.assert_close(a[keep], b[keep], atol=atol, rtol=0)


def test_merged_checkpoint_equals_explicit_routing(moa, moa_dir, tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model, base_tok = load_base(tiny_base)
    base_out = hf_logits(base_model, base_tok)
    for domain in moa.domains:
        out = tmp_path / f"merged-{domain}"
        assert main(["export", "--moa", str(moa_dir), "--format", "merged", "--domain", domain,
                     "--out", str(out)]) == 0
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(out)
        assert tok.chat_template and tok.pad_token_id == moa.tokenizer.pad_token_id
        ours, mask = explicit_logits(moa, domain)
        merged = hf_logits(model, tok)
        assert_logits_close(merged, ours, mask)
        # The expert really moved the base (else the equality above would prove nothing).
        assert (merged - base_out)[mask.bool()].abs().max() > 1e-2
        info = json.loads((out / "moa_export.json").read_text())
        assert info["domain"] == domain and info["format"] == "merged"
        # The usual file modes (safetensors alone writes 0600 files).
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~UMASK

    # bfloat16: the same merge, stored rounded.
    out = tmp_path / "merged-bf16"
    assert main(["export", "--moa", str(moa_dir), "--format", "merged", "--domain", "fin", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    w16 = load_file(out / "model.safetensors")
    w32 = load_file(tmp_path / "merged-fin" / "model.safetensors")
    assert w16.keys() == w32.keys()
    for k in w32:
        assert w16[k].dtype == torch.bfloat16
        torch.testing.assert_close(w16[k], w32[k].to(torch.bfloat16), atol=0, rtol=0)


def test_peft_export_loads_in_peft_and_matches(moa, moa_dir, tmp_path, tiny_base):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "peft"
    assert main(["export", "--moa", str(moa_dir), "--format", "peft", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(moa.domains)
    for domain in moa.domains:
        cfg = json.loads((out / domain / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny_base.resolve())
        base, tok = load_base(tiny_base)
        peft_model = PeftModel.from_pretrained(base, str(out / domain)).eval()
        ours, mask = explicit_logits(moa, domain)
        assert_logits_close(hf_logits(peft_model, tok), ours, mask)
    # The recorded base path is enough to load it all offline.
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out / "law")).eval()
    ours, mask = explicit_logits(moa, "law")
    assert_logits_close(hf_logits(auto, moa.tokenizer), ours, mask)

    # One domain only; the PEFT export is a valid moa import too.
    one = tmp_path / "peft-one"
    assert main(["export", "--moa", str(moa_dir), "--format", "peft", "--domain", "med", "--out", str(one)]) == 0
    assert [p.name for p in one.iterdir()] == ["med"]
    back = MoAModel.from_adapters([one / "med"])
    for k, v in moa.expert_state_dict("med").items():
        torch.testing.assert_close(back.expert_state_dict("med")[k], v, atol=0, rtol=0)


def test_vllm_export_script_lists_every_domain(moa, moa_dir, tmp_path, tiny_base):
    out = tmp_path / "vllm"
    assert main(["export", "--moa", str(moa_dir), "--format", "vllm", "--out", str(out)]) == 0
    script = out / "serve_vllm.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    for domain in moa.domains:
        assert f'"{domain}=$HERE/{domain}"' in text
        src, dst = moa_dir / "experts" / domain, out / domain
        a, b = load_file(src / "adapter_model.safetensors"), load_file(dst / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # Run it against a stand-in `vllm` that prints its arguments: the exact launch command.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "vllm").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (fake / "vllm").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MOA_BASE", None)
    args = subprocess.run([str(script), "--port", "8001"], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    # ranks 4, 8, 2 -> the smallest rank vLLM accepts that covers them all is 8
    assert args == ["serve", str(tiny_base.resolve()), "--enable-lora", "--max-lora-rank", "8", "--max-loras", "3",
                    "--lora-modules", *[f"{d}={out}/{d}" for d in moa.domains], "--port", "8001"]
    env["MOA_BASE"] = "/models/elsewhere"
    args = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert args[:2] == ["serve", "/models/elsewhere"]

    readme = (out / "README.md").read_text()
    assert '"model": "fin"' in readme and "moa serve" in readme and "moa base-path" in readme
    assert str(tiny_base.resolve()) in readme and "no router" in readme.lower()

    # --domain: only that expert is served.
    one = tmp_path / "vllm-one"
    assert main(["export", "--moa", str(moa_dir), "--format", "vllm", "--domain", "law", "--out", str(one)]) == 0
    assert sorted(p.name for p in one.iterdir()) == ["README.md", "law", "serve_vllm.sh"]
    assert '"fin=' not in (one / "serve_vllm.sh").read_text()


def test_export_errors_are_one_line_exit_2(moa_dir, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (["--format", "peft", "--domain", "nope", "--out", tmp_path / "o"],
         "unknown domain 'nope' (known domains: fin, med, law)"),
        (["--format", "merged", "--out", tmp_path / "o"], "pass --domain (one of: fin, med, law)"),
        (["--format", "vllm", "--domain", "nope", "--out", tmp_path / "o"], "unknown domain 'nope'"),
        (["--format", "peft", "--out", busy], "already holds files; pass --overwrite"),
        (["--format", "peft", "--out", moa_dir], "would replace"),
        (["--format", "peft", "--out", moa_dir.parent], "would replace"),
    ]
    for extra, msg in cases:
        capsys.readouterr()
        assert main(["export", "--moa", str(moa_dir), *map(str, extra)]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (msg, err)
        assert err.count("\n") == 1 and err.startswith("moa: error: ")
    assert not (tmp_path / "o").exists()
    assert (busy / "keep.txt").read_text() == "mine"
    assert (moa_dir / "moa_config.json").is_file()

    capsys.readouterr()
    assert main(["export", "--moa", str(tmp_path), "--format", "peft", "--out", str(tmp_path / "o")]) == 2
    assert "is not a MoA checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", "--moa", str(moa_dir), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err

    # --overwrite replaces the directory as a whole.
    assert main(["export", "--moa", str(moa_dir), "--format", "peft", "--domain", "fin", "--out", str(busy),
                 "--overwrite"]) == 0
    assert sorted(p.name for p in busy.iterdir()) == ["fin"]

