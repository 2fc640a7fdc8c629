"""The `moa` command's surface on a tiny model: --help defaults, --config FILE.yaml, the baselines,
generate --input, chat and stage 2's --lora-dropout."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_records, two_expert_moa, write_jsonl
from moa.cli import build_parser, main

FAST = ["--batch-size", "4", "--no-bf16"]


def cli(*args) -> int:
    return main([str(a) for a in args])


def two_domains(n: int, seed: int) -> list[dict]:
    return [r for r in synthetic_records(n, seed=seed) if r["domain"] != "json"]


@pytest.fixture(scope="module")
def moa0(tmp_path_factory, tiny_base):
    """An assembled (not stage-2 trained) MoA of two 1-step experts, math and echo."""
    root = tmp_path_factory.mktemp("cli")
    train = two_expert_moa(root, tiny_base)
    return {"dir": root / "moa0", "train": train, "base": tiny_base}


# --------------------------------------------------------------------------- --help


def _subparsers(parser, path=("moa",)):
    yield " ".join(path), parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _subparsers(sp, (*path, name))


def _help_entries(text: str) -> dict[str, str]:
    """{option string: its whole entry in the help text} (entries start at a 2-space indent)."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            current = [line]
            for opt in re.findall(r"(?:^  |, )(-{1,2}[\w-]+)", line):
                entries[opt] = current
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {k: " ".join(" ".join(v).split()) for k, v in entries.items()}


def test_every_option_with_a_value_shows_its_default_in_help():
    commands = dict(_subparsers(build_parser()))
    assert {"moa train-expert", "moa baseline mixed-lora", "moa baseline moe-lora", "moa baseline classifier",
            "moa data build-demo", "moa generate", "moa chat", "moa add-expert"} <= set(commands)
    missing = []
    for name, parser in commands.items():
        entries = _help_entries(parser.format_help())
        for a in parser._actions:
            if not a.option_strings or a.nargs == 0 or a.required or a.default is argparse.SUPPRESS:
                continue
            entry = entries.get(a.option_strings[-1])
            assert entry is not None, (name, a.option_strings)
            if "default" not in entry.lower():
                missing.append(f"{name} {a.option_strings[-1]}: {entry}")
    assert not missing, "\n".join(missing)


def test_moa_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train-expert" in out and "baseline" in out and "chat" in out


# --------------------------------------------------------------------------- --config FILE.yaml


def test_config_file_supplies_options_and_flags_override_it(moa0, tmp_path):
    cfg = tmp_path / "expert.yaml"
    out = tmp_path / "from_file"
    # `lr: 1e-3` is a string to PyYAML (no dot); the option converts it like the flag would.
    cfg.write_text(f"data: {moa0['train']}\ndomain: echo\nout: {out}\nbase: {moa0['base']}\n"
                   "max_steps: 3\nlr: 1e-3\nbatch_size: 4\nno_bf16: true\nrank: 4\n")
    assert cli("train-expert", "--config", cfg) == 0  # --data/--domain/--out only in the file
    run = json.loads((out / "train_config.json").read_text())
    assert run["train"]["lr"] == 0.001 and run["train"]["batch_size"] == 4 and run["train"]["bf16"] is False
    assert run["domain"] == "echo" and run["rank"] == 4
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3

    flags = tmp_path / "flags"
    assert cli("train-expert", "--config", cfg, "--max-steps", "1", "--out", flags) == 0
    assert len((flags / "train_log.jsonl").read_text().splitlines()) == 1
    assert json.loads((flags / "train_config.json").read_text())["train"]["lr"] == 0.001


@pytest.mark.parametrize("command, yaml_text, names", [
    (["train-expert"], "max_stepz: 3\n", "max_stepz"),
    (["train-expert"], "max_steps: many\n", "max_steps"),
    (["train-expert"], "no_bf16: maybe\n", "no_bf16"),
    (["train"], "etaa: 0.5\n", "etaa"),
    (["train"], "lora_dropout: high\n", "lora_dropout"),
    (["baseline", "mixed-lora"], "rnak: 4\n", "rnak"),
    (["baseline", "moe-lora"], "top_k: two\n", "top_k"),
    (["retrain-expert"], "router_steps: [1, 2]\n", "router_steps"),
])
def test_config_file_mistakes_are_one_line_exit_2(tmp_path, capsys, command, yaml_text, names):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli(*command, "--config", cfg, *_required_for(command, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moa: error: --config ") and names in lines[0], err
    assert "Traceback" not in err and not out.exists()


def _required_for(command, tmp_path) -> list:
    out = ["--data", tmp_path / "none.jsonl", "--out", tmp_path / "out"]
    if command[0] in ("train", "retrain-expert") or command[-1] == "moe-lora":
        out += ["--moa", tmp_path]
    if command[0] in ("train-expert", "retrain-expert"):
        out += ["--domain", "x"]
    return out


def test_config_file_may_give_add_experts_required_source(tmp_path, capsys):
    cfg = tmp_path / "add.yaml"
    cfg.write_text(f"moa: {tmp_path / 'no_moa'}\ndomain: new\nadapter: {tmp_path / 'no_adapter'}\n"
                   f"out: {tmp_path / 'out'}\n")
    capsys.readouterr()
    assert cli("add-expert", "--config", cfg) == 2
    err = capsys.readouterr().err
    # Parsing accepted the file's --moa/--domain/--adapter/--out: the error is about the missing checkpoint.
    assert "required" not in err and "no_moa" in err, err
    # What neither the file nor the command line gives is still required.
    cfg.write_text("domain: new\n")
    with pytest.raises(SystemExit) as e:
        cli("add-expert", "--config", cfg, "--out", tmp_path / "out")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "required" in err and "--moa" in err and "--domain" not in err, err


# --------------------------------------------------------------------------- baselines


def test_mixed_lora_baseline_is_a_peft_adapter_that_eval_takes(moa0, tmp_path):
    out = tmp_path / "mixed"
    assert cli("baseline", "mixed-lora", "--data", moa0["train"], "--out", out, "--base", moa0["base"],
               "--max-steps", "2", "--rank", "4", *FAST) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any(k.startswith("base_model.model.") and k.endswith("lora_A.weight") for k in keys)
    assert json.loads((out / "train_config.json").read_text())["domain"] is None  # every record, mixed

    test = write_jsonl(tmp_path / "test.jsonl", two_domains(1, seed=3))
    assert cli("eval", "--moa", moa0["dir"], "--data", test, "--out", tmp_path / "eval", "--systems", "mixed_lora",
               "--mixed-lora", out, "--no-generate", "--limit", "1") == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert all(m["systems"]["mixed_lora"][d]["ppl"] > 1.0 for d in ("math", "echo"))


def test_moe_lora_and_classifier_baselines_are_eval_systems(moa0, tmp_path):
    moe, clf = tmp_path / "moe", tmp_path / "clf"
    assert cli("baseline", "moe-lora", "--moa", moa0["dir"], "--data", moa0["train"], "--out", moe,
               "--max-steps", "1", *FAST) == 0
    assert (moe / "moe_gates.safetensors").is_file() and (moe / "moa_config.json").is_file()
    assert load_file(moe / "moe_gates.safetensors")["weight"].shape[:2] == (2, 2)  # (layers, experts, hidden)
    assert cli("baseline", "classifier", "--moa", moa0["dir"], "--data", moa0["train"], "--out", clf,
               "--per-domain", "2", "--steps", "3") == 0
    assert (clf / "classifier.safetensors").is_file()
    assert json.loads((clf / "classifier.json").read_text())["domains"] == ["math", "echo"]

    test = write_jsonl(tmp_path / "test.jsonl", two_domains(1, seed=3))
    assert cli("eval", "--moa", moa0["dir"], "--data", test, "--out", tmp_path / "eval", "--systems",
               f"moe_lora={moe}", f"classifier_loras={clf}", "--no-generate", "--limit", "1") == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(m["systems"]) == {"moe_lora", "classifier_loras"}
    for name in ("moe_lora", "classifier_loras"):
        assert all(m["systems"][name][d]["ppl"] > 1.0 for d in ("math", "echo")), m["systems"][name]


# --------------------------------------------------------------------------- generate --input, chat


PROMPTS = [
    {"prompt": "Add 3 and 4."},
    {"prompt": "anything", "domain": "echo"},
    {"messages": [{"role": "user", "content": "REPEAT: cloud cloud"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "json key=k1"}], "domain": "math"},
]


def _jsonl_out(text: str) -> list[dict]:
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def test_generate_input_file_writes_one_object_per_prompt_in_order(moa0, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    capsys.readouterr()
    assert cli("generate", "--moa", moa0["dir"], "--input", data, "--max-new-tokens", "3", "--batch-size", "2") == 0
    rows = _jsonl_out(capsys.readouterr().out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all({"index", "text", "domain", "routing"} <= set(r) for r in rows)
    # Forced lines are generated in groups of their own; each result is back in its input position.
    assert [r["routing"] for r in rows] == ["vote", "explicit", "vote", "explicit"]
    assert rows[1]["domain"] == "echo" and rows[3]["domain"] == "math"
    assert rows[0]["domain"] in ("math", "echo") and rows[0]["router_probs"]


def test_generate_input_reads_stdin(moa0, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps(p) + "\n\n" for p in PROMPTS[:2])))
    capsys.readouterr()
    assert cli("generate", "--moa", moa0["dir"], "--input", "-", "--max-new-tokens", "3") == 0
    rows = _jsonl_out(capsys.readouterr().out)
    assert [(r["index"], r["routing"]) for r in rows] == [(0, "vote"), (1, "explicit")]


def test_generate_input_mistakes_are_exit_2(moa0, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], "{not json"])
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "hi", "domain": "poetry"}])
    good = write_jsonl(tmp_path / "good.jsonl", [PROMPTS[0]])
    cases = [
        (["--input", bad], f"{bad}:2"),
        (["--input", unknown], "poetry"),
        (["--input", good, "a prompt too"], "not both"),
        (["--input", tmp_path / "missing.jsonl"], "no such file"),
    ]
    for extra, msg in cases:
        capsys.readouterr()
        assert cli("generate", "--moa", moa0["dir"], "--max-new-tokens", "3", *extra) == 2, extra
        captured = capsys.readouterr()
        assert msg in captured.err and "Traceback" not in captured.err, (extra, captured.err)
        assert not _jsonl_out(captured.out), extra  # nothing generated


def test_chat_prints_one_routed_line_per_turn_and_obeys_domain(moa0, monkeypatch, capsys):
    turns = "hello\n/domain math\nsecond turn\n/domain poetry\n/domain echo\nthird turn\n/reset\n\n/quit\nnever\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
    capsys.readouterr()
    assert cli("chat", "--moa", moa0["dir"], "--max-new-tokens", "3") == 0
    captured = capsys.readouterr()
    replies = re.findall(r"^\[(\w+)\] ", captured.out, re.M)
    assert len(replies) == 3, captured.out  # hello, second turn, third turn; nothing after /quit
    assert replies[0] in ("math", "echo") and replies[1:] == ["math", "echo"]
    assert "unknown domain 'poetry'" in captured.err and "conversation cleared" in captured.err


# --------------------------------------------------------------------------- stage 2 --lora-dropout


def test_stage2_lora_dropout_is_recorded_and_changes_training(moa0, tmp_path, capsys):
    weights = {}
    for p in ("0", "0.1"):
        out = tmp_path / f"drop{p}"
        assert cli("train", "--moa", moa0["dir"], "--data", moa0["train"], "--out", out, "--lora-dropout", p,
                   "--max-steps", "2", "--lr", "1e-2", *FAST) == 0
        assert json.loads((out / "train_config.json").read_text())["lora_dropout"] == float(p)
        weights[p] = load_file(out / "experts" / "math" / "adapter_model.safetensors")
    assert any(not torch.equal(weights["0"][k], weights["0.1"][k]) for k in weights["0"])
    capsys.readouterr()
    assert cli("train", "--moa", moa0["dir"], "--data", moa0["train"], "--out", tmp_path / "bad",
               "--lora-dropout", "1.5", "--max-steps", "1", *FAST) == 2
    assert "--lora-dropout" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_one_output_directory_policy(moa0, tmp_path, capsys):
    """assemble, remove-expert and training runs share one rule: a non-empty OUT needs --overwrite
    (or --resume for a run), and OUT may never swallow an input it reads."""
    root = moa0["dir"].parent
    experts = [str(root / "experts" / d) for d in ("math", "echo")]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert cli("assemble", "--experts", *experts, "--out", busy) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "keep me"
    assert cli("remove-expert", "--moa", moa0["dir"], "--domain", "echo", "--out", busy) == 2
    assert (busy / "notes.txt").read_text() == "keep me"
    capsys.readouterr()
    assert cli("assemble", "--experts", *experts, "--out", root / "experts") == 2  # would delete its inputs
    assert "would replace" in capsys.readouterr().err
    assert (root / "experts" / "math" / "adapter_model.safetensors").is_file()
    assert cli("assemble", "--experts", *experts, "--out", busy, "--overwrite") == 0
    assert (busy / "moa_config.json").is_file() and not (busy / "notes.txt").exists()
    (tmp_path / "a_file").write_text("x")
    assert cli("assemble", "--experts", *experts, "--out", tmp_path / "a_file") == 2
    assert "is a file" in capsys.readouterr().err


def test_serve_route_layers_outside_the_model_is_a_one_line_error(moa0, capsys):
    # K is checked against the checkpoint's layers before any server starts
    assert cli("serve", "--moa", moa0["dir"], "--route-layers", "99", "--port", "0") == 2
    err = capsys.readouterr().err
    assert "route_layers" in err and "Traceback" not in err
