"""MoAModel on a tiny random Llama: equivalence with PEFT, routing, generation, persistence."""

from __future__ import annotations

import json

import pytest
import torch

from moa import MoAModel
from moa.base import load_base
from moa.errors import MoAError
from moa.testing import make_tiny_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Add 3 and 4.", "REPEAT: apple apple", "json key=k7", "What is an ETF?", "hi", "Tell me a story."]


def make_adapter(base_dir, out_dir, r, alpha, targets=TARGETS, seed=0):
    """Save a PEFT LoRA with non-trivial random A and B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel

    model, _ = load_base(base_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "fin": make_adapter(tiny_base, root / "fin", r=4, alpha=8, seed=1),
        "med": make_adapter(tiny_base, root / "med", r=8, alpha=16, seed=2),
        "law": make_adapter(tiny_base, root / "law", r=2, alpha=4, targets=["q_proj", "v_proj"], seed=3),
    }


@pytest.fixture(scope="module")
def moa_dir(tmp_path_factory, adapters):
    model = MoAModel.from_adapters([adapters["fin"], adapters["med"]])
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "moa", provenance={"stage": "test"})


@pytest.fixture(scope="module")
def moa(moa_dir):
    """Read-only shared model; tests that change a model load their own."""
    return MoAModel.from_pretrained(moa_dir)


def batch(tokenizer, texts, side="right"):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        s = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, s], mask[i, s] = torch.tensor(r), 1
    return ids, mask


def scramble_routers(model, std=2.0, seed=0):
    """Large random router weights, so that different prompts pick different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers:
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * std)


# --------------------------------------------------------------------------- equivalence


def test_explicit_routing_equals_peft_on_the_saved_experts(moa, moa_dir, tiny_base):
    ids, _ = batch(moa.tokenizer, ["Add 3 and 4, please."])
    labels = ids.clone()
    labels[:, :3] = -100
    for d in moa.domains:
        ref = peft_model(tiny_base, moa_dir / "experts" / d)(input_ids=ids, labels=labels)
        out = moa(input_ids=ids, domains=[d], labels=labels)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
        assert out.domains == [d] and out.router_probs is None and out.router_logits is None


def test_mixed_domain_batch_equals_single_domain_batches_row_by_row(moa):
    ids, mask = batch(moa.tokenizer, PROMPTS[:4])
    ids = torch.cat([ids, ids[:1]])
    mask = torch.cat([mask, mask[:1]])
    domain_ids = torch.tensor([0, 1, 1, 0, -1])  # the last row: base only
    mixed = moa(input_ids=ids, attention_mask=mask, domain_ids=domain_ids)
    assert mixed.domains == ["fin", "med", "med", "fin", None]
    for e in (0, 1):
        single = moa(input_ids=ids, attention_mask=mask, domain_ids=torch.full((5,), e))
        for i in (domain_ids == e).nonzero().flatten().tolist():
            real = mask[i].bool()
            torch.testing.assert_close(mixed.logits[i, real], single.logits[i, real], rtol=1e-5, atol=1e-5)
    base = moa.base_model
    with torch.no_grad():
        ref = base(input_ids=ids[4:], attention_mask=mask[4:]).logits  # no hooks: base only
    real = mask[4].bool()
    torch.testing.assert_close(mixed.logits[4, real], ref[0, real], rtol=1e-5, atol=1e-5)


def test_vote_and_last_equal_explicit_with_the_chosen_expert(moa_dir):
    model = MoAModel.from_pretrained(moa_dir)
    scramble_routers(model)
    ids, mask = batch(model.tokenizer, PROMPTS)
    for routing in ("vote", "last"):
        routed = model(input_ids=ids, attention_mask=mask, routing=routing)
        assert len(routed.router_logits) == model.num_layers
        assert routed.router_probs.shape == (len(PROMPTS), 2)
        explicit = model(input_ids=ids, attention_mask=mask, domains=routed.domains)
        assert torch.equal(routed.logits, explicit.logits)
    layer = model(input_ids=ids, attention_mask=mask, routing="layer")
    assert layer.expert_ids.tolist() == layer.router_logits[-1].argmax(-1).tolist()
    assert len(set(model(input_ids=ids, attention_mask=mask).domains)) == 2  # default: vote, mixed


def test_router_logits_do_not_depend_on_padding_side(moa):
    texts = PROMPTS[:3]
    right = moa(*batch(moa.tokenizer, texts, "right"), domains=["fin", "med", "fin"], return_router_logits=True)
    left = moa(*batch(moa.tokenizer, texts, "left"), domains=["fin", "med", "fin"], return_router_logits=True)
    for a, b in zip(right.router_logits, left.router_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert right.router_loss is not None


# --------------------------------------------------------------------------- generation


def test_vote_generation_equals_explicit_generation_token_for_token(moa_dir):
    model = MoAModel.from_pretrained(moa_dir)
    scramble_routers(model)
    voted = model.generate(PROMPTS, routing="vote", max_new_tokens=12)
    chosen = [r.domain for r in voted]
    assert len(set(chosen)) == 2, "the test needs a batch that mixes experts"
    explicit = model.generate(PROMPTS, routing="explicit", domains=chosen, max_new_tokens=12)
    for v, x in zip(voted, explicit):
        assert v.text == x.text and v.completion_tokens == x.completion_tokens
        assert set(v.router_probs) == {"fin", "med"} and x.router_probs is None
        assert abs(sum(v.router_probs.values()) - 1) < 1e-5
        assert v.finish_reason in ("stop", "length") and v.prompt_tokens > 0
    # One prompt alone (no padding) generates what it generated inside the mixed batch.
    alone = model.generate(PROMPTS[:1], domains=chosen[:1], max_new_tokens=12)
    assert alone[0].text == explicit[0].text


def test_layer_probs_and_base_rows_in_generation(moa_dir, tiny_base):
    model = MoAModel.from_pretrained(moa_dir)
    scramble_routers(model)
    voted = model.generate(PROMPTS, routing="vote", max_new_tokens=4)
    probs = torch.tensor([r.layer_probs for r in voted])  # (B, L, E)
    assert probs.shape == (len(PROMPTS), model.num_layers, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(len(PROMPTS), model.num_layers), atol=1e-5)
    for r, p in zip(voted, probs):  # the vote's probabilities are the layers' mean
        assert torch.allclose(p.mean(0), torch.tensor([r.router_probs["fin"], r.router_probs["med"]]), atol=1e-5)
    # Forced rows (None: the base model) report the routers' view of the prompt only when asked,
    # and asking does not change the completion.
    domains = ["med", None, "fin", None, "med", "fin"]
    plain = model.generate(PROMPTS, domains=domains, max_new_tokens=4)
    asked = model.generate(PROMPTS, domains=domains, max_new_tokens=4, return_layer_probs=True)
    assert all(r.layer_probs is None for r in plain)
    assert [r.text for r in asked] == [r.text for r in plain]
    assert torch.allclose(torch.tensor([r.layer_probs for r in asked]), probs, atol=1e-5)
    assert [r.domain for r in plain] == domains
    # A None row is exactly the base model's greedy continuation.
    base, tok = load_base(tiny_base)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = base.generate(ids, max_new_tokens=plain[1].completion_tokens, do_sample=False,
                        pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert plain[1].text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generation_with_the_kv_cache_equals_full_recomputation(moa):
    result = moa.generate(["Add 3 and 4."], domains=["med"], max_new_tokens=6)[0]
    ids, _ = batch(moa.tokenizer, [moa.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add 3 and 4."}], tokenize=False, add_generation_prompt=True)])
    with torch.no_grad():
        for _ in range(result.completion_tokens):
            nxt = moa(input_ids=ids, domains=["med"]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    want = moa.tokenizer.decode(ids[0, -result.completion_tokens:], skip_special_tokens=True)
    assert result.text == want


def test_sampling_is_seeded_and_stop_strings_cut_the_text(moa):
    a = moa.generate(["hi"], domains="fin", do_sample=True, temperature=0.8, top_p=0.9, seed=7, max_new_tokens=8)
    b = moa.generate(["hi"], domains="fin", do_sample=True, temperature=0.8, top_p=0.9, seed=7, max_new_tokens=8)
    assert a[0].text == b[0].text
    full = moa.generate(["hi"], domains="fin", max_new_tokens=8)[0]
    stop = full.text[2:4]
    cut = moa.generate(["hi"], domains="fin", max_new_tokens=8, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]


def test_a_tiny_sampling_temperature_is_greedy_not_nan(moa):
    greedy = moa.generate(["hi"], domains="fin", max_new_tokens=6)[0]
    tiny = moa.generate(["hi"], domains="fin", do_sample=True, temperature=1e-105, seed=1, max_new_tokens=6)[0]
    assert tiny.text == greedy.text


def test_unknown_domain_and_empty_prompt_are_user_errors(moa):
    with pytest.raises(MoAError, match=r"unknown domain 'poetry'.*fin, med"):
        moa.generate(["hi"], domains=["poetry"])
    ids, mask = batch(moa.tokenizer, ["hi"])
    with pytest.raises(MoAError, match="poetry"):
        moa(input_ids=ids, domains=["poetry"])
    with pytest.raises(MoAError, match="empty"):
        moa.generate([""])
    with pytest.raises(MoAError, match="explicit"):
        moa(input_ids=ids, routing="vote", domains=["fin"])


# --------------------------------------------------------------------------- hooks and training


def test_hooks_are_removed_even_when_the_forward_raises(moa):
    bad = torch.tensor([[1, 2, 10_000]])  # out of the vocabulary: the embedding raises
    for kwargs in ({"domains": ["fin"]}, {"routing": "vote"}, {"routing": "layer"}):
        with pytest.raises(IndexError):
            moa(input_ids=bad, **kwargs)
        assert all(len(layer._forward_pre_hooks) == 0 for layer in moa.base_model.model.layers)
        assert all(slot.choice is None and slot.weights is None for slot in moa.slots)
    moa(input_ids=bad[:, :2], routing="vote")  # a routing pass ends early; still nothing left behind
    assert all(len(layer._forward_pre_hooks) == 0 for layer in moa.base_model.model.layers)


def test_stage2_loss_trains_experts_and_routers_but_not_the_base(moa_dir):
    model = MoAModel.from_pretrained(moa_dir)
    model.train()
    ids, mask = batch(model.tokenizer, PROMPTS[:4])
    prompt_mask = mask.bool() & (torch.arange(ids.shape[1]) < 4)
    domain_ids = torch.tensor([0, 1, 0, 1])
    out = model(input_ids=ids, attention_mask=mask, domain_ids=domain_ids, prompt_mask=prompt_mask,
                labels=ids.masked_fill(mask == 0, -100), return_router_logits=True)
    (out.loss + model.eta * out.router_loss).backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if "lora_" not in n)
    assert any(".lora_A" in n for n in names) and any(".lora_B" in n for n in names)
    assert {f"routers.{i}.weight" for i in range(model.num_layers)} <= names


def test_router_loss_reaches_the_experts_only_when_asked(moa_dir):
    """router_loss_to_experts=False: the routers read detached hidden states, so the router
    loss trains the routers and leaves every expert's gradient at exactly zero."""
    grads = {}
    for to_experts in (True, False):
        model = MoAModel.from_pretrained(moa_dir)
        model.train()
        ids, mask = batch(model.tokenizer, PROMPTS[:4])
        out = model(input_ids=ids, attention_mask=mask, domain_ids=torch.tensor([0, 1, 0, 1]),
                    return_router_logits=True, router_loss_to_experts=to_experts)
        out.router_loss.backward()
        grads[to_experts] = {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
                             for n, p in model.named_parameters() if p.requires_grad}
    experts = [n for n in grads[True] if "lora_" in n]
    routers = [n for n in grads[True] if n.startswith("routers.")]
    assert experts and routers
    assert sum(grads[True][n] for n in experts) > 0
    assert all(grads[False][n] == 0.0 for n in experts)
    # the routers of layers after the first read states the experts changed: same gradient either way
    for n in routers:
        assert grads[False][n] == pytest.approx(grads[True][n], rel=1e-5), n
        assert grads[False][n] > 0, n


def test_gradient_checkpointing_replays_the_routing(moa_dir):
    """The backward recomputation of a checkpointed layer must use the forward's experts."""
    ids = None
    grads = []
    for checkpointing in (False, True):
        model = MoAModel.from_pretrained(moa_dir)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        if ids is None:
            ids, mask = batch(model.tokenizer, PROMPTS[:3])
        out = model(input_ids=ids, attention_mask=mask, domain_ids=torch.tensor([0, 1, -1]), labels=ids,
                    return_router_logits=True)
        (out.loss + out.router_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_enabled_on_the_base_directly_is_refused(moa_dir):
    """Without the routing replay the backward recomputation would use no expert: a clear error."""
    model = MoAModel.from_pretrained(moa_dir)
    model.train()
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = batch(model.tokenizer, PROMPTS[:2])
    with pytest.raises(MoAError, match="MoAModel.gradient_checkpointing_enable"):
        model(input_ids=ids, attention_mask=mask, domain_ids=torch.tensor([0, 1]))


def test_route_and_reset_experts(moa_dir):
    model = MoAModel.from_pretrained(moa_dir)
    scramble_routers(model)
    ids, mask = batch(model.tokenizer, PROMPTS, "left")
    for routing in ("vote", "last", "layer"):
        expert_ids, probs = model.route(ids, mask, routing=routing)
        out = model(input_ids=ids, attention_mask=mask, routing=routing)
        assert expert_ids.tolist() == out.expert_ids.tolist()
        torch.testing.assert_close(probs, out.router_probs)
    model.reset_experts(seed=0)
    with torch.no_grad():
        base = model.base_model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask, domain_ids=torch.tensor([0, 1] * 3))
    torch.testing.assert_close(out.logits, base)  # fresh LoRA init: B = 0, delta = 0
    assert all(mod.lora_A[0, :mod.ranks[0]].abs().sum() > 0 for mod in model.lora_modules.values())


def test_set_trainable_named_experts_and_frozen_routers(moa_dir):
    model = MoAModel.from_pretrained(moa_dir)
    model.set_trainable(experts=["med"], routers=False)
    ids, mask = batch(model.tokenizer, PROMPTS[:2])
    model(input_ids=ids, attention_mask=mask, domain_ids=torch.tensor([0, 1])).logits.sum().backward()
    for mod in model.lora_modules.values():
        assert mod.lora_A.grad[0].abs().sum() == 0 and mod.lora_A.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in model.routers.parameters())
    with pytest.raises(MoAError, match="unknown domain"):
        model.set_trainable(experts=["nope"])


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip_is_bitwise(moa, moa_dir, tmp_path):
    cfg = json.loads((moa_dir / "moa_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["domains"] == ["fin", "med"]
    assert cfg["experts"]["med"] == {"r": 8, "alpha": 16, "target_modules": sorted(TARGETS)}
    assert cfg["router"] == {"pooling": "masked_mean", "input": "layer_input", "num_layers": 2}
    assert cfg["routing_default"] == "vote" and cfg["eta"] == 1.0 and cfg["provenance"] == {"stage": "test"}
    assert cfg["base_signature"]["num_hidden_layers"] == 2
    files = sorted(str(p.relative_to(moa_dir)) for p in moa_dir.rglob("*") if p.is_file())
    assert files == ["experts/fin/adapter_config.json", "experts/fin/adapter_model.safetensors",
                     "experts/med/adapter_config.json", "experts/med/adapter_model.safetensors",
                     "moa_config.json", "router.safetensors"]
    again = MoAModel.from_pretrained(moa.save_pretrained(tmp_path / "again"))
    for d in moa.domains:
        a, b = moa.expert_state_dict(d), again.expert_state_dict(d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = moa.router_state_dict(), again.router_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = batch(moa.tokenizer, PROMPTS[:3])
    assert torch.equal(moa(input_ids=ids, attention_mask=mask).logits,
                       again(input_ids=ids, attention_mask=mask).logits)


def test_from_adapters_refuses_different_target_modules(adapters):
    with pytest.raises(MoAError, match="different modules"):
        MoAModel.from_adapters([adapters["fin"], adapters["law"]])


def test_add_and_remove_expert_keep_the_others_bitwise(moa_dir, adapters, tiny_base):
    model = MoAModel.from_pretrained(moa_dir)
    before = {d: model.expert_state_dict(d) for d in model.domains}
    routers = model.router_state_dict()
    model.add_expert("law", adapters["law"])  # rank 2, only q_proj and v_proj
    assert model.domains == ["fin", "med", "law"]
    for d, tensors in before.items():
        now = model.expert_state_dict(d)
        assert all(torch.equal(now[k], v) for k, v in tensors.items())
    for k, v in model.router_state_dict().items():
        assert v.shape[0] == 3 and torch.equal(v[:2], routers[k])
    ids, _ = batch(model.tokenizer, ["Add 3 and 4."])
    ref = peft_model(tiny_base, adapters["law"])(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids, domains=["law"]).logits, ref, rtol=0, atol=1e-4)

    model.remove_expert("fin")
    assert model.domains == ["med", "law"]
    for k, v in model.router_state_dict().items():
        assert torch.equal(v[0], routers[k][1])
    now = model.expert_state_dict("med")
    assert all(torch.equal(now[k], v) for k, v in before["med"].items())
    torch.testing.assert_close(model(input_ids=ids, domains=["law"]).logits, ref, rtol=0, atol=1e-4)
    with pytest.raises(MoAError, match="already"):
        model.add_expert("law", adapters["law"])


def test_add_expert_refuses_another_base(moa_dir, tmp_path):
    model = MoAModel.from_pretrained(moa_dir)
    other = make_tiny_base(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(MoAError, match="trained on base"):
        model.add_expert("x", make_adapter(other, tmp_path / "x", r=2, alpha=2))
    wider = make_tiny_base(tmp_path / "wider", hidden_size=32, intermediate_size=64)
    with pytest.raises(MoAError, match="another base"):
        model.add_expert("y", make_adapter(wider, tmp_path / "y", r=2, alpha=2), check_base=False)
    assert model.domains == ["fin", "med"]
