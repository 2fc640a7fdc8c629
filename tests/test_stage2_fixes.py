"""Stage 2 as the routers see it at inference: truncated prompts, gradient checkpointing, and which
parameters are routers (fixes of issue #15, each checked where it used to go wrong)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import synthetic_records, write_jsonl
from moa import MoAModel
from moa.cli import main
from moa.data import Record, collate, encode_record
from moa.testing import make_tokenizer

FAST = ["--batch-size", "6", "--no-bf16", "--seed", "1"]


@pytest.fixture(scope="module")
def assembled(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_fixes")
    data = write_jsonl(root / "train.jsonl", synthetic_records(6))
    for d in ("math", "echo", "json"):
        assert main(["train-expert", "--data", str(data), "--domain", d, "--out", str(root / "experts" / d),
                     "--base", str(tiny_base), "--max-steps", "2", *FAST]) == 0
    assert main(["assemble", "--experts", *(str(root / "experts" / d) for d in ("math", "echo", "json")),
                 "--out", str(root / "moa0")]) == 0
    return root, data


def test_encode_record_marks_a_cut_prompt():
    tok = make_tokenizer()
    long_prompt = Record("a", [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}])
    short = Record("a", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok " * 80}])
    cut = encode_record(tok, long_prompt, max_length=64)
    assert cut.truncated and cut.prompt_cut
    tail = encode_record(tok, short, max_length=64)  # only the response's end is dropped
    assert tail.truncated and not tail.prompt_cut
    whole = encode_record(tok, long_prompt)
    assert not whole.truncated and not whole.prompt_cut
    b = collate([cut, tail, whole], tok.pad_token_id, ["a"])
    assert b["domain_ids"].tolist() == [0, 0, 0]
    assert b["router_ids"].tolist() == [-1, 0, 0]


def test_router_loss_skips_rows_whose_prompt_was_cut(assembled):
    """The routers read whole prompts at inference; a row whose prompt start was dropped to fit
    --max-length must not train them on a view they never get."""
    from moa.router import router_loss
    from moa.stages import stage2_loss

    root, _ = assembled
    model = MoAModel.from_pretrained(root / "moa0")
    model.set_trainable(experts=True, routers=True)
    tok = model.tokenizer
    recs = [Record("math", [{"role": "user", "content": "Add 1 and 2. " * 30}, {"role": "assistant", "content": "3"}]),
            Record("echo", [{"role": "user", "content": "REPEAT: a a"}, {"role": "assistant", "content": "a a a"}]),
            Record("json", [{"role": "user", "content": "json key=k1"}, {"role": "assistant", "content": "{}"}])]
    examples = [encode_record(tok, r, max_length=48) for r in recs]
    assert [e.prompt_cut for e in examples] == [True, False, False]
    b = collate(examples, tok.pad_token_id, model.domains)
    b["global_tokens"] = int((b["labels"][:, 1:] != -100).sum())
    b["global_rows"], b["global_router_rows"] = 3, 2
    _, metrics = stage2_loss(model, b, eta=1.0)
    with torch.no_grad():
        o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], domain_ids=b["domain_ids"],
                  prompt_mask=b["prompt_mask"], return_router_logits=True)
    want = router_loss([lg[1:] for lg in o.router_logits], b["domain_ids"][1:])  # the two whole prompts
    assert float(metrics["router_loss"]) == pytest.approx(float(want), rel=1e-5)
    every_row = router_loss(o.router_logits, b["domain_ids"])
    assert float(every_row) != pytest.approx(float(want), rel=1e-3)  # the cut row would have counted


def test_stage2_with_gradient_checkpointing_equals_without(assembled, tmp_path):
    root, data = assembled
    outs = {}
    for gc in (False, True):
        out = tmp_path / f"gc{int(gc)}"
        args = ["train", "--moa", str(root / "moa0"), "--data", str(data), "--out", str(out), "--max-steps", "2",
                "--lr", "1e-2", *FAST] + (["--gradient-checkpointing"] if gc else [])
        assert main(args) == 0
        outs[gc] = {**load_file(out / "router.safetensors"),
                    **load_file(out / "experts" / "math" / "adapter_model.safetensors")}
    for k, v in outs[False].items():
        torch.testing.assert_close(outs[True][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_routers_and_experts_are_told_apart_by_their_module(tiny_base):
    """A base whose own modules are called 'router' (e.g. MoE bases) must not give LoRA weights on
    them the routers' learning rate."""
    from moa.base import load_base

    base, tok = load_base(tiny_base)
    for layer in base.model.layers:
        layer.mlp.router = nn.Linear(base.config.hidden_size, 4, bias=False)  # named like a router
    model = MoAModel(base, tok, base=str(tiny_base), target_modules=["q_proj", "router"])
    model.set_trainable(experts=True, routers=True)
    routers, experts = model.split_trainable()
    router_ids = {id(p) for p in model.routers.parameters()}
    named_router = [n for n, p in model.named_parameters() if "mlp.router" in n and p.requires_grad]
    assert named_router  # the LoRA weights on the base's 'router' modules train
    assert {id(p) for p in routers} == router_ids
    assert all(id(p) not in router_ids for p in experts)
    by_name = dict(model.named_parameters())
    assert all(id(by_name[n]) in {id(p) for p in experts} for n in named_router)
    assert len(routers) + len(experts) == len(model.trainable_parameters())
