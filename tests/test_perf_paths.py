"""Every fast path of the MoA forward equals the simple reference computation.

The reference is the plain per-row LoRA, y_i = base(x_i) + scaling_e * B_e A_e x_i with e the
row's expert, computed one row at a time. The fast paths: the single-expert matmuls and the
gathered per-row batched matmuls, both accumulating into the base output in place; the
per-choice weight cache used without autograd (generation); the A projections of modules that
read the same input (q/k/v, gate/up) fused into one matmul; the prefill that routes and fills
the KV cache at once; the stage-2 loss that projects only the label positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moa import MoAModel
from moa.errors import MoAError
from moa.generation import encode_prompts
from moa.layers import ExpertChoice, MoLoRALinear, RoutingSlot, cpu_gemm, share_input

IN, OUT, E, R = 24, 20, 3, 4


def make_layer(ranks=(R, R, 2), seed: int = 0) -> tuple[MoLoRALinear, RoutingSlot]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT)
    base.requires_grad_(False)
    slot = RoutingSlot()
    layer = MoLoRALinear(base, slot)
    for e, r in enumerate(ranks):
        layer.add_expert(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), alpha=2.0 * (e + 1))
    return layer, slot


def reference(layer: MoLoRALinear, x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """x (B, T, in) -> (B, T, out), one row at a time with each expert's own unpadded weights."""
    rows = []
    for i, e in enumerate(index):
        y = layer.base_layer(x[i])  # (T, out)
        if e >= 0 and layer.ranks[e]:
            A, B = layer.expert_weights(e)
            y = y + (x[i] @ A.T @ B.T) * layer.scaling[e]
        rows.append(y)
    return torch.stack(rows)


INDEXES = {
    "mixed": [2, 0, 1, 0, 2],  # gathered per-row batched matmuls
    "many_rows": [2, 0, 1, 0, 2, -1, 1, 1],  # more than 2E rows: one token per row runs dense
    "blocks": [2, 2, 0, 0, 1, 1],  # equal blocks of one expert: batched matmuls per block
    "many_blocks": [0, 0, 0, 0, 1, 1, 2, 2],  # blocks of 2 (gcd of the runs), rather than dense
    "single": [1, 1, 1, 1, 1],  # plain matmuls
    "base_rows": [0, -1, 2, -1, 0],  # some rows base only
    "none": [-1, -1],  # base only
}


@pytest.mark.parametrize("name", list(INDEXES))
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("grad", [False, True])
def test_hard_paths_equal_the_reference(name, T, grad):
    layer, slot = make_layer()
    index = INDEXES[name]
    x = torch.randn(len(index), T, IN)
    choice = ExpertChoice.of(torch.tensor(index))
    slot.set_choice(choice)
    with torch.set_grad_enabled(grad):
        y = layer(x)
        y_again = layer(x)  # without autograd: served from the choice's cache
    with torch.no_grad():
        want = reference(layer, x, index)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, y_again)
    assert bool(choice.cache) is (not grad and name != "none")
    if not grad and name != "none":  # the cache is keyed by the path taken
        want_mode = {"blocks": "grouped", "many_blocks": "grouped", "single": "plain",
                     "many_rows": "plain" if T == 1 else "gathered"}.get(name, "gathered")
        assert {key[1] for key in choice.cache} == {want_mode}


@pytest.mark.parametrize("index, groups", [
    ([2, 2, 0, 0, 1, 1], [2, 0, 1]),
    ([0, 0, 0, 0, 1, 1], [0, 0, 1]),  # runs of 4 and 2: blocks of 2
    ([1, 1, 0, 0, 1, 1], [1, 0, 1]),  # an expert may come back
    ([0, 0, 1, 1, 1], None),  # runs of 2 and 3: no common block
    ([2, 0, 1, 0, 2], None),  # blocks of 1 are the gathered path
    ([0, 0, -1, -1], None),  # base-only rows
    ([1, 1, 1, 1], None),  # one expert: the plain path
])
def test_rows_in_equal_blocks_of_one_expert_are_found(index, groups):
    got = ExpertChoice.of(torch.tensor(index)).groups
    assert (got.tolist() if got is not None else None) == groups


@pytest.mark.parametrize("name", ["mixed", "blocks", "single", "base_rows"])
@pytest.mark.parametrize("T", [1, 5])
def test_gradients_of_the_in_place_paths_equal_the_reference(name, T):
    index = INDEXES[name]
    x = torch.randn(len(index), T, IN)
    layer, slot = make_layer()
    layer.set_trainable_experts(torch.tensor([True, True, False]))
    slot.set_choice(ExpertChoice.of(torch.tensor(index)))
    x1 = x.clone().requires_grad_()
    g = torch.randn(len(index), T, OUT)
    (layer(x1) * g).sum().backward()
    ref_layer, _ = make_layer()
    ref_layer.set_trainable_experts(torch.tensor([True, True, False]))
    x2 = x.clone().requires_grad_()
    A, B = ref_layer._expert_weights()
    rows = []
    for i, e in enumerate(index):
        y = ref_layer.base_layer(x2[i])
        if e >= 0:
            r = ref_layer.ranks[e]
            y = y + (x2[i] @ A[e, :r].T @ B[e, :, :r].T) * ref_layer.scaling[e]
        rows.append(y)
    (torch.stack(rows) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, ref_layer.lora_A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, ref_layer.lora_B.grad, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad[2].abs().sum() == 0  # frozen expert: exactly zero


def test_the_cache_follows_in_place_updates_and_replaced_experts():
    layer, slot = make_layer()
    index = [2, 0, 1, 0, 2]
    choice = ExpertChoice.of(torch.tensor(index))
    slot.set_choice(choice)
    x = torch.randn(5, 1, IN)
    with torch.no_grad():
        layer(x)
        layer.lora_B.mul_(3.0)  # an optimizer-style in-place update
        torch.testing.assert_close(layer(x), reference(layer, x, index), rtol=1e-5, atol=1e-5)
        layer.add_expert(torch.randn(R, IN), torch.randn(OUT, R), alpha=1.0)  # new parameters
        layer.scaling[0] = 0.5  # a changed buffer
        torch.testing.assert_close(layer(x), reference(layer, x, index), rtol=1e-5, atol=1e-5)


def test_autocast_and_a_bf16_base_fall_back_to_out_of_place_adds():
    layer, slot = make_layer()
    for index in ([2, 0, 1, 0, 2], [1] * 5, [2, 2, 0, 0, 1, 1]):
        x = torch.randn(len(index), 3, IN)
        with torch.no_grad():
            want = reference(layer, x, index)
            tol = dict(rtol=0, atol=0.03 * float(want.abs().max()))  # bf16 rounding of large values
            slot.set_choice(ExpertChoice.of(torch.tensor(index)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), want, **tol)
            layer.base_layer.to(torch.bfloat16)  # a bf16 base with float32 experts
            y = layer(x.bfloat16())
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), want, **tol)
            layer.base_layer.to(torch.float32)


def make_siblings(seed: int = 0, bias: bool = True) -> tuple[list[MoLoRALinear], RoutingSlot]:
    """Three modules of one slot reading one input, of different widths and ranks; expert 2 skips
    the second module and has a smaller rank in the first (zero padding inside the fused A)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    slot = RoutingSlot()
    mods = []
    for k, (out, ranks) in enumerate([(OUT, (R, R, 2)), (OUT + 4, (R, 3, 0)), (OUT - 4, (R, R, R))]):
        base = nn.Linear(IN, out, bias=bias)
        base.requires_grad_(False)
        mod = MoLoRALinear(base, slot)
        for e, r in enumerate(ranks):
            if r:
                mod.add_expert(torch.randn(r, IN, generator=g), torch.randn(out, r, generator=g), alpha=1.0 + e + k)
            else:
                mod.add_expert(None, None, alpha=1.0)
        mods.append(mod)
    return mods, slot


@pytest.mark.parametrize("name", list(INDEXES))
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("grad", [False, True])
def test_fused_a_projections_equal_the_modules_alone(name, T, grad):
    """Same outputs, and the same gradients for the experts (a frozen one included) and the input."""
    index = INDEXES[name]
    x = torch.randn(len(index), T, IN)
    gs = [torch.randn(len(index), T, out) for out in (OUT, OUT + 4, OUT - 4)]
    results = []
    for fused in (True, False):
        mods, slot = make_siblings()
        share_input(mods if fused else mods[:1])
        for m in mods:
            m.set_trainable_experts(torch.tensor([True, False, True]))
        choice = ExpertChoice.of(torch.tensor(index))
        slot.set_choice(choice)
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            ys = [m(xi) for m in mods]  # one input tensor, as q/k/v read it
            again = [m(xi) for m in reversed(mods)][::-1]  # any order; cached weights without autograd
            if grad:
                sum((y * g).sum() for y, g in zip(ys, gs)).backward()
        for y, y2 in zip(ys, again):
            torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
        assert all(m.shared._x is None for m in mods)  # the input is not kept once every module ran
        grads = [] if not grad else [xi.grad] + [p.grad for m in mods for p in (m.lora_A, m.lora_B)]
        if grad and name != "none":  # expert 1 is frozen: exactly zero, through the concatenation too
            assert all(float(m.lora_A.grad[1].abs().sum() + m.lora_B.grad[1].abs().sum()) == 0 for m in mods)
        results.append((ys, grads))
        if fused:
            with torch.no_grad():
                want = [reference(m, x, index) for m in mods]
            torch.testing.assert_close(ys, want, rtol=1e-5, atol=1e-5)
    (ys_f, g_f), (ys_u, g_u) = results
    torch.testing.assert_close(ys_f, ys_u, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_f, g_u):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [[2, 0, 1, 0, 2], [1] * 5, [2, 2, 0, 0, 1, 1]])
def test_a_bf16_base_still_shares_one_a_projection(index, monkeypatch):
    """A bf16 base with float32 experts: the modules cast one bf16 input each, yet the group
    projects it once (not once per module), with the same outputs as the modules alone."""
    from moa.layers import SharedInput

    x = torch.randn(len(index), 3, IN).bfloat16()
    outs = []
    project = SharedInput._routed_weights
    for fused in (True, False):
        mods, slot = make_siblings()
        for m in mods:
            m.base_layer.to(torch.bfloat16)
        share_input(mods if fused else mods[:1])
        slot.set_choice(ExpertChoice.of(torch.tensor(index)))
        calls = []
        monkeypatch.setattr(SharedInput, "_routed_weights", lambda *a, **k: calls.append(1) or project(*a, **k))
        with torch.no_grad():
            outs.append([m(x) for m in mods])
        assert len(calls) == (1 if fused else 3)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0.02)


@pytest.mark.parametrize("name", ["mixed", "blocks", "single", "dense", "skipped"])
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_a_group_computes_its_members_outputs_at_once(name, T, bias):
    """Without autograd, every row routed, the first member called computes every member's whole
    output, with one A projection for the group. Any call order gives the reference, each base
    weight is read once by `addmm_`, and nothing is kept once every member has its output."""
    # dense: more than 2E rows, every one routed, one token each; skipped: expert 2 skips the second module
    index = {"dense": [2, 0, 1, 0, 2, 1, 1, 0], "skipped": [2] * 5}.get(name) or INDEXES[name]
    mods, slot = make_siblings(bias=bias)
    share_input(mods)
    x = torch.randn(len(index), T, IN)
    for order in (mods, mods[::-1]):
        choice = ExpertChoice.of(torch.tensor(index))
        slot.set_choice(choice)
        with torch.no_grad(), cpu_gemm("default"), _Calls() as calls:
            ys = {id(order[0]): order[0](x)}
            assert set(mods[0].shared._outs) == {id(m) for m in order[1:]}  # the others' outputs, ready
            ys.update({id(m): m(x) for m in order[1:]})
        for m in mods:
            torch.testing.assert_close(ys[id(m)], reference(m, x, index), rtol=1e-5, atol=1e-5)
        assert mods[0].shared._outs is None and mods[0].shared._x is None
        for m in mods:
            used = [n for n, ptrs in calls.calls
                    if m.base_layer.weight.data_ptr() in ptrs and n in ("linear", "addmm_", "mm", "matmul")]
            skipped = name == "skipped" and m is mods[1]
            assert used == (["linear"] if skipped else ["addmm_"])
        many = sum(n in ("mm", "bmm") for n, _ in calls.calls)  # one A side, then each member's B side
        assert many == 1 + 3 - (name == "skipped")


def test_a_shared_input_follows_another_tensor_and_updated_weights():
    mods, slot = make_siblings()
    share_input(mods)
    index = [2, 0, 1, 0, 2]
    slot.set_choice(ExpertChoice.of(torch.tensor(index)))
    x, other = torch.randn(5, 2, IN), torch.randn(5, 2, IN)
    with torch.no_grad():
        q = mods[0](x)
        k = mods[1](other)  # not the input the group projected: its own projection
        torch.testing.assert_close(q, reference(mods[0], x, index), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, reference(mods[1], other, index), rtol=1e-5, atol=1e-5)
        mods[2].lora_A.mul_(2.0)  # in place, between two forwards with one choice
        torch.testing.assert_close(mods[2](x), reference(mods[2], x, index), rtol=1e-5, atol=1e-5)
        mods[0].remove_expert(1)  # replaced parameters
        for m in mods[1:]:
            m.remove_expert(1)
        slot.set_choice(ExpertChoice.of(torch.tensor([1, 0, -1, 1, 1])))
        for m in mods:
            torch.testing.assert_close(m(x), reference(m, x, [1, 0, -1, 1, 1]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- model level


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Add 3 and 4.", "REPEAT: apple apple", "json key=k7", "What is an ETF?", "hi", "Tell me a story."]


@pytest.fixture(scope="module")
def moa_dir(tmp_path_factory, tiny_base):
    from peft import LoraConfig, get_peft_model

    from moa.base import load_base

    root = tmp_path_factory.mktemp("perf_adapters")
    dirs = []
    for seed, name in enumerate(["fin", "med"], start=1):
        model, _ = load_base(tiny_base)
        torch.manual_seed(seed)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(model, cfg).save_pretrained(root / name)
        dirs.append(root / name)
    return MoAModel.from_adapters(dirs).save_pretrained(root / "moa")


def fit_routers(model: MoAModel, prompts, domain_ids: torch.Tensor) -> None:
    """Routers that choose `domain_ids`: least squares on the pooled inputs of explicit routing.
    domain_ids: (B,) the same expert in every layer, or (L, B) each layer's."""
    from moa.router import LayerRouter, RoutingState

    ids, mask = encode_prompts(model, prompts)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), model.routing(RoutingState("explicit", domain_ids)):
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    per_layer = domain_ids if domain_ids.ndim == 2 else domain_ids.expand(model.num_layers, -1)  # (L, B)
    for i, router in enumerate(model.routers):
        target = torch.nn.functional.one_hot(per_layer[i], model.num_experts).double() * 8 - 4
        pooled = LayerRouter.pool(out.hidden_states[i], mask.bool()).double()
        X = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(X, target, driver="gelsd").solution
        with torch.no_grad():
            router.weight.copy_(sol[:-1].T.float())
            router.bias.copy_(sol[-1].float())


@pytest.mark.parametrize("agree", [True, False])
def test_routed_generation_equals_explicit_generation(moa_dir, agree):
    """The routing prefill is reused when every layer agrees, recomputed when not."""
    model = MoAModel.from_pretrained(moa_dir)
    want = torch.tensor([0, 1, 1, 0, 1, 0])
    fit_routers(model, PROMPTS, want)
    if not agree:  # the last layer now picks the other expert, the first one still `want`
        with torch.no_grad():
            model.routers[-1].weight.neg_()
            model.routers[-1].bias.neg_()
    voted = model.generate(PROMPTS, routing="last", max_new_tokens=8)
    decided = torch.tensor([model.domain_index(r.domain) for r in voted])
    ids, mask = encode_prompts(model, PROMPTS)
    logits = model(ids, mask, routing="layer").router_logits
    layer_choice = torch.stack([lg.argmax(-1) for lg in logits])  # (L, B)
    assert bool((layer_choice == decided).all()) is agree
    if agree:
        assert decided.tolist() == want.tolist()
    explicit = model.generate(PROMPTS, domains=[r.domain for r in voted], max_new_tokens=8)
    for v, x in zip(voted, explicit):
        assert v.text == x.text and v.completion_tokens == x.completion_tokens
    for i in (0, 1):  # a prompt alone (single-expert path, no padding) generates the same
        alone = model.generate(PROMPTS[i:i + 1], domains=[voted[i].domain], max_new_tokens=8)[0]
        assert alone.text == voted[i].text


def test_routed_prefill_runs_again_only_the_rows_whose_layers_disagree(moa_dir):
    """A first-layer router that always picks expert 0 disagrees with the decision on the rows decided
    for expert 1: only those rows are prefilled again, and every row's reply equals its explicit
    generation, alone and in the batch."""
    model = MoAModel.from_pretrained(moa_dir)
    want = torch.tensor([0, 1, 1, 0, 1, 0])
    per_layer = want.repeat(model.num_layers, 1)  # (L, B)
    per_layer[0] = 0  # layer 0 picks expert 0 for every prompt; `last` decides from the last layer
    fit_routers(model, PROMPTS, per_layer)
    rows_run = []
    hook = model.base_model.register_forward_pre_hook(
        lambda mod, args, kw: rows_run.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        voted = model.generate(PROMPTS, routing="last", max_new_tokens=6, ignore_eos=True)
    finally:
        hook.remove()
    assert [model.domain_index(r.domain) for r in voted] == want.tolist()
    prompt_len = rows_run[0][1]
    assert rows_run[:2] == [(6, prompt_len), (3, prompt_len)]  # the routing prefill, then the 3 rows of expert 1
    assert all(shape == (6, 1) for shape in rows_run[2:]) and len(rows_run) == 2 + 5
    explicit = model.generate(PROMPTS, domains=[r.domain for r in voted], max_new_tokens=6, ignore_eos=True)
    assert [v.text for v in voted] == [x.text for x in explicit]
    for i in (1, 3):
        alone = model.generate(PROMPTS[i:i + 1], domains=[voted[i].domain], max_new_tokens=6, ignore_eos=True)[0]
        assert alone.text == voted[i].text


@pytest.mark.parametrize("experts, order", [
    ([0, 1, 0, 1], [0, 2, 1, 3]),
    ([1, 0, 2, 0, 1, 2], [1, 3, 0, 4, 2, 5]),
    ([0, 0, 1, 1], None),  # already in blocks
    ([0, 1, 1], None),  # counts 1 and 2: no common block
    ([0, -1, 0, -1], None),  # base-only rows
    ([1, 1, 1], None),
])
def test_expert_order_puts_rows_in_equal_blocks(experts, order):
    from moa.generation import expert_order

    got = expert_order(torch.tensor(experts))
    assert (got.tolist() if got is not None else None) == order
    assert expert_order(torch.tensor([experts, experts])) is None  # per-layer experts (L, B)


def test_generation_in_expert_blocks_returns_rows_in_the_prompts_order(moa_dir, monkeypatch):
    """Rows on alternating experts are decoded in blocks of one expert and come back in order: each
    reply equals the prompt's reply generated alone."""
    import moa.generation as generation

    model = MoAModel.from_pretrained(moa_dir)
    domains = ["fin", "med", "fin", "med", "fin", "med"]
    seen = []
    decode = generation._decode
    monkeypatch.setattr(generation, "_decode", lambda m, ids, *a, **k: seen.append(a[2].tolist()) or decode(m, ids, *a, **k))
    both = model.generate(PROMPTS, domains=domains, max_new_tokens=8)
    assert seen == [[0, 0, 0, 1, 1, 1]]
    assert [r.domain for r in both] == domains
    for i, p in enumerate(PROMPTS):
        alone = model.generate([p], domains=[domains[i]], max_new_tokens=8)[0]
        assert (both[i].text, both[i].completion_tokens) == (alone.text, alone.completion_tokens)


def test_stage2_loss_on_label_positions_equals_the_full_logits_loss(moa_dir):
    from moa.stages import stage2_loss
    from moa.losses import label_nll

    model = MoAModel.from_pretrained(moa_dir)
    model.set_trainable(experts=True, routers=True)
    model.train()
    ids, mask = encode_prompts(model, PROMPTS[:4])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : ids.shape[1] // 2] = -100
    dom = torch.tensor([0, 1, 1, 0])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "domain_ids": dom,
             "prompt_mask": mask.bool(), "global_tokens": int((labels[:, 1:] != -100).sum()), "global_rows": 4,
             "router_ids": dom, "global_router_rows": 4}
    loss, metrics = stage2_loss(model, batch, eta=0.5)
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    o = model(input_ids=ids, attention_mask=mask, domain_ids=dom, return_router_logits=True, labels=labels)
    lm = label_nll(labels, logits=o.logits)[0].sum() / batch["global_tokens"]
    want = lm + 0.5 * o.router_loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["lm_loss"], lm.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_model_equals_unfused_model_and_saves_the_same_files(moa_dir, tmp_path):
    """Logits and stage-2 gradients of the fused model equal the unfused ones, after adding and
    removing an expert too; the checkpoint it writes is the one it was loaded from."""
    from safetensors.torch import load_file

    from moa.stages import stage2_loss

    models = {}
    for fused in (True, False):
        model = MoAModel.from_pretrained(moa_dir)
        model.fuse_shared_inputs(fused)
        models[fused] = model
    groups = {id(m.shared): len(m.shared.members) for m in models[True].lora_modules.values()}
    assert sorted(groups.values()) == sorted([1, 1, 2, 3] * models[True].num_layers)  # o, down; gate/up; q/k/v
    assert all(len(m.shared.members) == 1 for m in models[False].lora_modules.values())

    ids, mask = encode_prompts(models[True], PROMPTS[:4])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : ids.shape[1] // 2] = -100
    dom = torch.tensor([0, 1, -1, 0])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "domain_ids": dom,
             "prompt_mask": mask.bool(), "global_tokens": int((labels[:, 1:] != -100).sum()), "global_rows": 4,
             "router_ids": dom, "global_router_rows": 4}

    def outputs(model):
        with torch.no_grad():
            logits = [model(ids, mask, domain_ids=d).logits for d in (dom, torch.tensor([1] * 4))]
        model.set_trainable(experts=["fin"], routers=True)
        model.train()
        stage2_loss(model, batch, eta=0.5)[0].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        model.eval()
        return logits, grads

    for step in ("loaded", "added", "removed"):
        (lf, gf), (lu, gu) = outputs(models[True]), outputs(models[False])
        torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-5, msg=step)
        assert gf.keys() == gu.keys()
        for n in gf:
            torch.testing.assert_close(gf[n], gu[n], rtol=1e-4, atol=1e-6, msg=f"{step}: {n}")
        if step == "loaded":
            for model in models.values():
                model.add_expert("fin2", moa_dir / "experts" / "fin")
        elif step == "added":
            for model in models.values():
                model.remove_expert("med")

    out = models[True].save_pretrained(tmp_path / "again")
    for name in ("fin", "fin2"):
        src = moa_dir / "experts" / ("fin" if name == "fin2" else name)
        assert sorted(p.name for p in (out / "experts" / name).iterdir()) == sorted(p.name for p in src.iterdir())
    # no optimizer step ran: the saved experts are the loaded ones, tensor for tensor
    saved = load_file(out / "experts" / "fin" / "adapter_model.safetensors")
    loaded = load_file(moa_dir / "experts" / "fin" / "adapter_model.safetensors")
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k


def test_evaluation_in_length_sorted_batches_equals_one_record_at_a_time(routed_moa_dir, tmp_path):
    """Scoring and generation batch records of similar length together (less padding); no per-record
    number changes: the same PPL, routing and replies as records run alone (no padding at all)."""
    from conftest import synthetic_records, write_jsonl

    from moa.data import read_records
    from moa.evaluate import evaluate_system, moa_system

    rows = synthetic_records(4, seed=3)
    rows[0]["prompt"] = "Add 3 and 4, then explain the sum in a few plain words for a child."  # a long one first
    records, _ = read_records(write_jsonl(tmp_path / "eval.jsonl", rows))
    model = MoAModel.from_pretrained(routed_moa_dir)
    system = moa_system("moa", routed_moa_dir, "vote", max_new_tokens=6, batch_size=4, model=model)
    batched = evaluate_system(system, records, model.tokenizer, batch_size=4, progress=False)
    alone = evaluate_system(system, records, model.tokenizer, batch_size=1, progress=False)
    assert batched["routing_accuracy"] == alone["routing_accuracy"]
    for d in ("math", "echo", "json"):
        assert batched[d]["ppl"] == pytest.approx(alone[d]["ppl"], rel=1e-4)
        assert batched[d]["exact_match"] == alone[d]["exact_match"]
    assert [g["index"] for g in batched["_generations"]] == sorted(g["index"] for g in batched["_generations"])
    assert [(g["output"], g["routed"]) for g in batched["_generations"]] == \
        [(g["output"], g["routed"]) for g in alone["_generations"]]


@pytest.mark.parametrize("agree", [True, False])
@pytest.mark.parametrize("routing", ["vote", "last"])
def test_scoring_routes_and_scores_in_one_pass_as_in_two(routed_moa_dir, tmp_path, routing, agree):
    """vote / last scoring: the one layer-routed pass (rows whose layers disagree run again) gives
    the decisions and logits of the routing pass followed by the decided pass."""
    from conftest import synthetic_records, write_jsonl

    from moa.data import collate, encode_records, read_records
    from moa.scoring import _routed_in_one_pass

    model = MoAModel.from_pretrained(routed_moa_dir)
    if not agree:  # the last router now disagrees with the others on most rows
        with torch.no_grad():
            model.routers[-1].weight.neg_()
            model.routers[-1].bias.neg_()
    records, _ = read_records(write_jsonl(tmp_path / "score.jsonl", synthetic_records(3, seed=5)))
    examples, _ = encode_records(model.tokenizer, records, 128)
    batch = collate(examples, model.tokenizer.pad_token_id, padding_side="right")
    with torch.no_grad():
        logits, decided, probs = _routed_in_one_pass(model, batch, routing)
        two = model(batch["input_ids"], batch["attention_mask"], prompt_mask=batch["prompt_mask"], routing=routing)
    assert decided.tolist() == two.expert_ids.tolist()
    layers_disagree = (torch.stack([lg.argmax(-1) for lg in two.router_logits]) != decided).any(0)  # (B,)
    assert bool(layers_disagree.any()) is not agree  # some rows run again, or none
    torch.testing.assert_close(probs, two.router_probs, rtol=1e-5, atol=1e-6)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], two.logits[keep], rtol=1e-4, atol=1e-4)


def test_generation_batch_is_its_own_size_and_changes_no_reply(routed_moa_dir, tmp_path):
    """Generation runs `generate_batch_size` prompts at once whatever the scoring batch: the replies
    and routed domains are those of prompts generated one at a time."""
    from conftest import synthetic_records, write_jsonl

    from moa.data import read_records
    from moa.evaluate import evaluate_system, moa_system

    records, _ = read_records(write_jsonl(tmp_path / "eval.jsonl", synthetic_records(4, seed=5)))
    model = MoAModel.from_pretrained(routed_moa_dir)
    calls = []
    wide = moa_system("moa", routed_moa_dir, "vote", max_new_tokens=6, batch_size=12, model=model)
    inner = wide.generate
    wide.generate = lambda prompts, doms: calls.append(len(prompts)) or inner(prompts, doms)
    batched = evaluate_system(wide, records, model.tokenizer, batch_size=2, generate_batch_size=12, progress=False)
    assert calls == [12]
    narrow = moa_system("moa", routed_moa_dir, "vote", max_new_tokens=6, batch_size=1, model=model)
    alone = evaluate_system(narrow, records, model.tokenizer, batch_size=1, generate_batch_size=1, progress=False)
    assert [(g["output"], g["routed"]) for g in batched["_generations"]] == \
        [(g["output"], g["routed"]) for g in alone["_generations"]]
    with pytest.raises(MoAError, match="batch sizes must be positive"):
        evaluate_system(wide, records, model.tokenizer, generate_batch_size=0, progress=False)



def test_scoring_skips_the_head_on_the_prompt_and_changes_no_number(routed_moa_dir, tiny_base, tmp_path):
    """Scoring asks for the logits from the position before the batch's first label token on
    (`logits_to_keep`): every forward that honours it gives the same log-probabilities, token counts
    and routing as with the logits of every position."""
    from conftest import synthetic_records, write_jsonl

    from moa.base import load_base
    from moa.data import IGNORE_INDEX, encode_records, read_records
    from moa.evaluate import peft_system
    from moa.scoring import causal_lm_forward, load_peft_adapter, logits_to_keep, moa_forward, score_examples

    labels = torch.full((2, 9), IGNORE_INDEX)
    labels[0, 6:8], labels[1, 4:6] = 1, 1
    assert logits_to_keep(labels) == 9 - 4 + 1  # from position 3, which predicts the label at 4
    labels[1, 1] = 1
    assert logits_to_keep(labels) == 0  # nothing before position 0 to cut
    assert logits_to_keep(torch.full((2, 5), IGNORE_INDEX)) == 0

    records, _ = read_records(write_jsonl(tmp_path / "s.jsonl", synthetic_records(4, seed=11)))
    model = MoAModel.from_pretrained(routed_moa_dir)
    examples, _ = encode_records(model.tokenizer, records, 256)
    pad = model.tokenizer.pad_token_id
    base, _ = load_base(tiny_base)
    adapter = load_peft_adapter(load_base(tiny_base)[0], routed_moa_dir / "experts" / "math")
    single = peft_system("single_lora", tiny_base, None, 4, 4,
                         adapters_by_domain={d: routed_moa_dir / "experts" / d for d in ("math", "echo", "json")})
    forwards = {"base": causal_lm_forward(base), "adapter": causal_lm_forward(adapter), "single": single.forward,
                **{r: moa_forward(model, r)[0] for r in ("explicit", "vote", "last")}}
    seen = {}
    for name, fwd in forwards.items():
        def spy(batch, fwd=fwd):
            logits, extras = fwd(batch)
            seen.setdefault(name, []).append((batch["input_ids"].shape[1], logits.shape[1]))
            return logits, extras
        trimmed = score_examples(spy, examples, pad, batch_size=4, progress=False)
        full = score_examples(fwd, examples, pad, batch_size=4, progress=False, trim_prompt=False)
        assert [r["tokens"] for r in trimmed] == [r["tokens"] for r in full] and all(r["tokens"] for r in full)
        assert [r["logprob"] for r in trimmed] == pytest.approx([r["logprob"] for r in full], rel=1e-5, abs=1e-5), name
        assert [r.get("domain_routed") for r in trimmed] == [r.get("domain_routed") for r in full]
        assert any(kept < total for total, kept in seen[name]), name  # the head really ran on fewer positions


def test_common_prefix_stops_short_of_every_prompts_last_token():
    from moa.data import Example
    from moa.scoring import common_prefix

    def ex(ids, prompt_len):
        return Example(index=0, domain="d", input_ids=ids, labels=ids, prompt_len=prompt_len)

    a, b = ex([1, 2, 3, 4, 5, 6], 5), ex([1, 2, 3, 9, 5, 6], 4)
    assert common_prefix([a, b]) == 3
    assert common_prefix([a, ex([1, 2, 3, 4, 5, 7], 3)]) == 2  # that prompt's last token is its own
    assert common_prefix([a, ex([7, 2, 3], 2)]) == 0
    assert common_prefix([a]) == 0  # nothing to share
    assert common_prefix([a, ex([1, 2, 3, 4, 5, 6], 1)]) == 0


def test_scoring_runs_the_shared_prefix_once_and_changes_no_number(routed_moa_dir, tiny_base, tmp_path):
    """Rows that all start with the same tokens (a chat template's system text) score the same
    with the prefix's KV cache computed once (`PrefixKV`): the batches run only what follows it,
    and a change of the weights (a PEFT merge, say) computes it again."""
    from conftest import synthetic_records, write_jsonl

    from moa.base import load_base
    from moa.data import encode_records, read_records
    from moa.evaluate import peft_system
    from moa.scoring import PrefixKV, causal_lm_forward, common_prefix, load_peft_adapter, score_examples

    records, _ = read_records(write_jsonl(tmp_path / "s.jsonl", synthetic_records(4, seed=5)))
    base, tok = load_base(tiny_base)
    system = [{"role": "system", "content": "You answer briefly and exactly, as the examples do."}]
    for r in records:  # a system text of our own in front of every prompt
        r.messages = system + r.messages
    examples, _ = encode_records(tok, records, 256)
    P = common_prefix(examples)
    assert P > 20
    pad = tok.pad_token_id
    adapter = load_peft_adapter(load_base(tiny_base)[0], routed_moa_dir / "experts" / "math")
    single = peft_system("single_lora", tiny_base, None, 4, 4,
                         adapters_by_domain={d: routed_moa_dir / "experts" / d for d in ("math", "echo", "json")})
    for name, fwd in {"base": causal_lm_forward(base), "adapter": causal_lm_forward(adapter),
                      "single": single.forward}.items():
        widths = []
        shared = score_examples(lambda b: widths.append(b["input_ids"].shape[1]) or fwd(b), examples, pad,
                                batch_size=3, progress=False, trim_prompt=False)
        whole = score_examples(lambda b: fwd({**b, "prefix_len": 0}), examples, pad, batch_size=3, progress=False,
                               trim_prompt=False)
        assert [r["tokens"] for r in shared] == [r["tokens"] for r in whole]
        assert [r["logprob"] for r in shared] == pytest.approx([r["logprob"] for r in whole], rel=1e-5, abs=1e-5), name

    calls = []
    base.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    lm = PrefixKV(base)
    ids = torch.stack([torch.tensor(e.input_ids[:P + 6]) for e in examples[:4]])  # (4, P + 6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = lm.logits(ids, mask, prefix_len=P)
        lm.logits(ids, mask, prefix_len=P)
        assert calls == [(1, P), (4, 6), (4, 6)]  # the prefix once, then only what follows it
        torch.testing.assert_close(got, base(input_ids=ids, attention_mask=mask).logits[:, P:], rtol=1e-5, atol=1e-5)
        base.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # in place: the prefix's cache is stale
        torch.testing.assert_close(lm.logits(ids, mask, prefix_len=P), base(input_ids=ids, attention_mask=mask).logits[:, P:],
                                   rtol=1e-5, atol=1e-5)
        other = ids.clone()
        other[1, 0] += 1  # a row without the prefix: the whole rows run
        torch.testing.assert_close(lm.logits(other, mask, prefix_len=P), base(input_ids=other, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
        base.to(torch.bfloat16)  # bf16 weights: whole rows, exactly as without a prefix
        calls.clear()
        assert torch.equal(PrefixKV(base).logits(ids, mask, prefix_len=P), base(input_ids=ids, attention_mask=mask).logits)
        assert calls == [(4, P + 6), (4, P + 6)]


def test_baseline_generation_takes_the_shared_prefix_from_its_cache(tiny_base):
    """The PEFT systems' generation puts the prompts' shared start before the padding and takes it
    from the prefix's KV cache: the same replies as left-padded whole prompts, and the batch's first
    forward runs only what follows the prefix."""
    from moa.base import load_base
    from moa.evaluate import _hf_generate
    from moa.scoring import PrefixKV

    model, tok = load_base(tiny_base)
    system = {"role": "system", "content": "You answer briefly and exactly, as the examples do."}
    prompts = [[system, {"role": "user", "content": q}] for q in ("Add 3 and 4.", "REPEAT: stone stone",
                                                                  "json key=k7", "Add 30 and 12, then say why.")]
    widths = []
    model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    plain = _hf_generate(model, tok, prompts, 12, 3)
    first_plain = widths[0]
    widths.clear()
    lm = PrefixKV(model)
    shared = _hf_generate(model, tok, prompts, 12, 3, lm)
    assert shared == plain and any(plain)
    P = lm._cache.get_seq_length()
    assert P > 20 and widths[0] == P  # the prefix, once
    assert widths[1] == first_plain - P  # then the first batch without it
    assert _hf_generate(model, tok, prompts[:1], 12, 3, lm) == plain[:1]  # one prompt: nothing shared


def test_metrics_keep_the_ppl_digits_of_near_deterministic_domains(routed_moa_dir, tmp_path):
    """metrics.json's PPLs keep 6 decimals: on a domain scored near 1.0000 the loss differences
    between systems are in the 5th and 6th decimals of the PPL. The report's per-domain changes
    show the digits such a change needs."""
    import math

    from conftest import synthetic_records, write_jsonl

    from moa.data import encode_records, read_records
    from moa.evaluate import evaluate_system, moa_system
    from moa.fit import _percent
    from moa.scoring import score_examples

    records, _ = read_records(write_jsonl(tmp_path / "eval.jsonl", synthetic_records(3, seed=5)))
    model = MoAModel.from_pretrained(routed_moa_dir)
    system = moa_system("moa", routed_moa_dir, "vote", max_new_tokens=4, batch_size=4, model=model)
    got = evaluate_system(system, records, model.tokenizer, batch_size=4, generate=False, progress=False)
    examples, _ = encode_records(model.tokenizer, records, 1024)
    rows = score_examples(system.forward, examples, model.tokenizer.pad_token_id, 4, False)
    for d in ("math", "echo", "json"):
        lp = sum(r["logprob"] for r in rows if r["domain"] == d)
        n = sum(r["tokens"] for r in rows if r["domain"] == d)
        assert got[d]["ppl"] == round(math.exp(-lp / n), 6)  # the same batches: the same numbers
    assert _percent(1.00003 / 1.00012 - 1) == "-0.0090%"
    assert _percent(0.0123) == "+1.2%" and _percent(0.0) == "+0.0%"


def test_single_lora_scores_and_generates_each_row_as_its_domain_alone(routed_moa_dir, tiny_base, tmp_path):
    """The single_lora system given a batch of several domains: every row's logits and greedy reply
    are those of its own domain's adapter run on it alone."""
    from conftest import synthetic_records, write_jsonl

    from moa.base import load_base
    from moa.data import collate, encode_records, read_records
    from moa.evaluate import peft_system
    from moa.scoring import load_peft_adapter

    domains = ("math", "echo", "json")
    adapters = {d: routed_moa_dir / "experts" / d for d in domains}
    single = peft_system("single_lora", tiny_base, None, 5, 8, adapters_by_domain=adapters)
    records, _ = read_records(write_jsonl(tmp_path / "s.jsonl", synthetic_records(2, seed=3)))
    tok = load_base(tiny_base)[1]
    examples, _ = encode_records(tok, records, 256)
    batch = {**collate(examples, tok.pad_token_id), "domain_names": [e.domain for e in examples]}
    assert len(set(batch["domain_names"])) == 3
    logits, _ = single.forward(batch)
    prompts = [r.prompt_messages for r in records]
    replies = single.generate(prompts, batch["domain_names"])
    for d in domains:
        alone = load_peft_adapter(load_base(tiny_base)[0], adapters[d]).eval()
        for i in [i for i, r in enumerate(records) if r.domain == d]:
            n = int(batch["attention_mask"][i].sum())
            with torch.no_grad():
                want = alone(input_ids=batch["input_ids"][i:i + 1, :n]).logits[0]
            torch.testing.assert_close(logits[i, :n], want, rtol=1e-4, atol=1e-4)
        one = peft_system("one", tiny_base, adapters[d], 5, 8)
        rows = [i for i, r in enumerate(records) if r.domain == d]
        assert [replies[i] for i in rows] == one.generate([prompts[i] for i in rows], [d] * len(rows))


def test_the_stacked_experts_follow_updates_across_forwards():
    """Without autograd, routed rows take their weights from stacked copies kept across forwards
    (each forward builds a new choice): in-place updates, replaced parameters and tensors whose
    `.data` was swapped (as `Module.to` does) must all be seen."""
    layer, slot = make_layer()
    index = [2, 0, 1, 0, 2]
    x = torch.randn(5, 3, IN)

    def check():
        slot.set_choice(ExpertChoice.of(torch.tensor(index)))
        torch.testing.assert_close(layer(x), reference(layer, x, index), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        check()
        assert layer.shared._stacked is not None
        layer.lora_A.mul_(-2.0)  # in place: a new version
        check()
        layer.lora_B.data = layer.lora_B.data * 3.0  # .data swapped: the version does not move
        check()
        layer.add_expert(torch.randn(R, IN), torch.randn(OUT, R), alpha=1.0)  # new parameters
        index = [3, 0, 3, 1, 2]
        check()


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the torch functions and tensor methods called under it, with the storages of their
    tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ptrs = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
        self.calls.append((getattr(func, "__name__", str(func)), ptrs))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ["mixed", "blocks", "single", "base_rows"])
@pytest.mark.parametrize("grad", [False, True])
def test_the_base_matmul_accumulating_into_the_lora_output_equals_the_reference(name, bias, grad):
    """Without autograd, where every row is routed, the B side runs first and the base's matmul
    accumulates into it (`addmm_`; Llama-style projections have no bias, Qwen2's q/k/v do). Under
    autograd, and with base-only rows, the delta is added after the base."""
    g = torch.Generator().manual_seed(1)
    base = nn.Linear(IN, OUT, bias=bias).requires_grad_(False)
    slot = RoutingSlot()
    layer = MoLoRALinear(base, slot)
    for e in range(E):
        layer.add_expert(torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g), alpha=2.0)
    index = INDEXES[name]
    slot.set_choice(ExpertChoice.of(torch.tensor(index)))
    x = torch.randn(len(index), 4, IN, generator=g)
    with torch.set_grad_enabled(grad), cpu_gemm("default"), _Calls() as calls:
        y = layer(x.clone().requires_grad_(grad))
    with torch.no_grad():
        want = reference(layer, x, index)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    accumulated = any(n == "addmm_" and base.weight.data_ptr() in ptrs for n, ptrs in calls.calls)
    assert accumulated is (not grad and name != "base_rows")



def test_float32_peft_systems_merge_their_adapter_and_score_as_unmerged(routed_moa_dir, tiny_base, tmp_path,
                                                                         monkeypatch):
    """The evaluation's PEFT systems merge the adapter in use into float32 weights (the bare base's
    cost); their logits stay those of PEFT's unmerged forward, and bf16 weights are not merged."""
    from conftest import synthetic_records, write_jsonl
    from peft.tuners.tuners_utils import BaseTuner

    merges = []
    merge = BaseTuner.merge_adapter
    monkeypatch.setattr(BaseTuner, "merge_adapter",
                        lambda self, names=None, *a, **k: (merges.append(names), merge(self, names, *a, **k))[1])

    from moa.base import load_base
    from moa.data import collate, encode_records, read_records
    from moa.evaluate import merges_exactly, peft_system
    from moa.scoring import load_peft_adapter, score_examples

    adapter = routed_moa_dir / "experts" / "math"
    records, _ = read_records(write_jsonl(tmp_path / "s.jsonl", synthetic_records(2, seed=4)))
    model, tok = load_base(tiny_base)
    examples, _ = encode_records(tok, records, 256)
    batch = {**collate(examples, tok.pad_token_id), "domain_names": [e.domain for e in examples]}
    merged = peft_system("mixed_lora", tiny_base, adapter, 5, 8)
    assert merges == [["default"]]
    got, _ = merged.forward(batch)
    unmerged = load_peft_adapter(model, adapter)
    assert not any(getattr(m, "merged", False) for m in unmerged.modules())
    with torch.no_grad():
        want = unmerged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(want, load_base(tiny_base)[0](input_ids=batch["input_ids"]).logits)  # the adapter matters
    assert merges_exactly(load_base(tiny_base)[0])
    assert not merges_exactly(load_base(tiny_base)[0].to(torch.bfloat16))

    # single_lora batches domain by domain, so it merges once per domain
    calls = []
    single = peft_system("single_lora", tiny_base, None, 5, 8,
                         adapters_by_domain={d: routed_moa_dir / "experts" / d for d in ("math", "echo", "json")})
    assert single.by_domain

    def forward(b):
        calls.append(b["domain_names"])
        return single.forward(b)

    score_examples(forward, examples, tok.pad_token_id, batch_size=2, progress=False, by_domain=True)
    flat = [d for names in calls for d in names]
    assert sum(a != b for a, b in zip(flat, flat[1:])) == len(set(flat)) - 1
    assert merges[1:] == [[d] for d in sorted(set(flat))]  # one merge per domain, in the batches' order


def test_an_adapter_peft_cannot_merge_runs_unmerged(routed_moa_dir, tiny_base, tmp_path, monkeypatch):
    from conftest import synthetic_records, write_jsonl
    from peft.tuners.tuners_utils import BaseTuner

    from moa.base import load_base
    from moa.data import collate, encode_records, read_records
    from moa.evaluate import peft_system
    from moa.scoring import load_peft_adapter

    tries = []

    def cannot(self, *a, **k):
        tries.append(a)
        raise NotImplementedError("no merge for this layer type")

    monkeypatch.setattr(BaseTuner, "merge_adapter", cannot)
    records, _ = read_records(write_jsonl(tmp_path / "s.jsonl", synthetic_records(2, seed=5)))
    tok = load_base(tiny_base)[1]
    examples, _ = encode_records(tok, records, 256)
    batch = {**collate(examples, tok.pad_token_id), "domain_names": [e.domain for e in examples]}
    adapters = {d: routed_moa_dir / "experts" / d for d in ("math", "echo", "json")}
    single = peft_system("single_lora", tiny_base, None, 5, 8, adapters_by_domain=adapters)
    logits, _ = single.forward(batch)
    single.forward(batch)
    assert len(tries) == 1  # tried once, then every domain runs unmerged
    for d, adapter in adapters.items():
        alone = load_peft_adapter(load_base(tiny_base)[0], adapter)
        i = batch["domain_names"].index(d)
        n = int(batch["attention_mask"][i].sum())
        with torch.no_grad():
            want = alone(input_ids=batch["input_ids"][i:i + 1, :n]).logits[0]
        torch.testing.assert_close(logits[i, :n], want, rtol=1e-4, atol=1e-4)


def _counting_onednn(monkeypatch):
    """Count the calls of moa.layers' oneDNN linear (which still runs)."""
    import moa.layers as layers

    with cpu_gemm("onednn"):
        assert layers._onednn_ok()  # its one-time probe, before counting
    used = {"linear": 0}
    lin = layers._onednn_linear

    def count(*a):
        used["linear"] += 1
        return lin(*a)

    monkeypatch.setattr(layers, "_onednn_linear", count)
    return used


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("name", list(INDEXES))
def test_frozen_projections_on_onednn_equal_the_reference(name, T, monkeypatch):
    """On a CPU in float32 without autograd, the frozen projections run on oneDNN (MOA_CPU_GEMM's
    default), for every routing path, single and shared inputs, with and without bias: the
    outputs equal the row-by-row reference to float rounding, and the default GEMM's outputs."""
    used = _counting_onednn(monkeypatch)
    index = INDEXES[name]
    for bias in (False, True):
        mods, slot = make_siblings(bias=bias)
        layer, lslot = make_layer()
        share_input(mods)
        x = torch.randn(len(index), T, IN)
        for m, s in [(layer, lslot)] + [(m, slot) for m in mods]:
            s.set_choice(ExpertChoice.of(torch.tensor(index)))
        with torch.no_grad():
            with cpu_gemm("default"):
                want = [m(x) for m in [layer] + mods]
            before = dict(used)
            with cpu_gemm("onednn"):
                got = [m(x) for m in [layer] + mods]
        assert sum(used.values()) - sum(before.values()) == 4  # each module's base projection, once
        for m, y, w in zip([layer] + mods, got, want):
            torch.testing.assert_close(y, reference(m, x, index), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_is_not_used_under_autograd_autocast_bf16_or_when_switched_off(monkeypatch):
    """Training (autograd), autocast and non-float32 weights keep PyTorch's own GEMM, as does
    MOA_CPU_GEMM=default; a wrong MOA_CPU_GEMM is a clear error."""
    import moa.layers as layers

    used = _counting_onednn(monkeypatch)
    layer, slot = make_layer()
    slot.set_choice(ExpertChoice.of(torch.tensor(INDEXES["mixed"])))
    x = torch.randn(5, 3, IN)
    with cpu_gemm("onednn"):
        y = layer(x.requires_grad_(True))  # autograd: the frozen weight's matmul must be differentiable in x
        y.sum().backward()
        assert x.grad is not None and sum(used.values()) == 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert sum(used.values()) == 0
        layer.to(torch.bfloat16)
        with torch.no_grad():
            layer(x.detach().bfloat16())
        assert sum(used.values()) == 0
    layer.to(torch.float32)
    with torch.no_grad(), cpu_gemm("default"):
        layer(x.detach())
    assert sum(used.values()) == 0
    from moa.layers import frozen_linear

    with torch.no_grad(), cpu_gemm("onednn"):  # a 1-D input, or a non-contiguous weight: F.linear
        w, xd = layer.base_layer.weight, x.detach()
        torch.testing.assert_close(frozen_linear(xd[0, 0], w, None), w @ xd[0, 0])
        torch.testing.assert_close(frozen_linear(xd, w.t().contiguous().t(), None), xd @ w.t())
        torch.testing.assert_close(frozen_linear(xd[..., :10], w[:, :10], None), xd[..., :10] @ w[:, :10].t())
    assert sum(used.values()) == 0
    with torch.no_grad(), cpu_gemm("onednn"):
        layer(x.detach())
    assert sum(used.values()) == 1

    monkeypatch.setattr(layers, "_gemm_choice", None)  # read MOA_CPU_GEMM again
    monkeypatch.setenv(layers.CPU_GEMM_ENV, "default")
    with torch.no_grad():
        layer(x.detach())
    assert sum(used.values()) == 1
    monkeypatch.setattr(layers, "_gemm_choice", None)
    monkeypatch.setenv(layers.CPU_GEMM_ENV, "blas")
    from moa.errors import MoAError

    with pytest.raises(MoAError, match="MOA_CPU_GEMM='blas'"), torch.no_grad():
        layer(x.detach())
    with pytest.raises(MoAError, match="MOA_CPU_GEMM='blas'"):  # when a model is built, whatever its dtype
        layers.use_cpu_gemm(nn.Sequential(nn.Linear(4, 2)).bfloat16())
    monkeypatch.setattr(layers, "_gemm_choice", None)
    monkeypatch.delenv(layers.CPU_GEMM_ENV)
    with torch.no_grad():
        layer(x.detach())
    assert sum(used.values()) == 2  # onednn by default


@needs_onednn
def test_routed_generation_on_onednn_matches_the_default_gemm(routed_moa_dir):
    """A whole generation on oneDNN's projections gives the default GEMM's tokens on a small model
    (the two differ only by float rounding), and the same logits to 1e-4."""
    from moa.generation import encode_prompts

    model = MoAModel.from_pretrained(routed_moa_dir).eval()
    prompts = ["alpha beta gamma", "one two three four", "x y", "hello there friend"]
    doms = [model.domains[i % len(model.domains)] for i in range(len(prompts))]
    ids, mask = encode_prompts(model, prompts)
    with cpu_gemm("default"):
        want = model.generate(prompts, domains=doms, max_new_tokens=6, ignore_eos=True)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, domains=doms).logits
    with cpu_gemm("onednn"):
        got = model.generate(prompts, domains=doms, max_new_tokens=6, ignore_eos=True)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, domains=doms).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert [r.text for r in got] == [r.text for r in want]


@needs_onednn
def test_a_moa_models_plain_linears_run_on_onednn_and_train_as_before(routed_moa_dir, monkeypatch):
    """The LM head and the projections no expert targets become `CPUGemmLinear`s (the wrapped ones'
    base layers too, which still take the fused path): the same state dict, the same logits as nn.Linear to rounding,
    oneDNN at inference, F.linear (with gradients) under autograd; PEFT wraps and merges them."""
    from peft import LoraConfig, get_peft_model

    from moa.layers import CPUGemmLinear, use_cpu_gemm

    model = MoAModel.from_pretrained(routed_moa_dir).eval()
    swapped = [n for n, m in model.base_model.named_modules() if type(m) is CPUGemmLinear]
    assert any(n.endswith("lm_head") for n in swapped) and any(n.endswith("o_proj") for n in swapped)
    assert all(m._plain_base(m.base_layer) for m in model.lora_modules.values())
    head = model.base_model.get_output_embeddings()
    x = torch.randn(3, 5, head.in_features)
    used = _counting_onednn(monkeypatch)
    with torch.no_grad():
        with cpu_gemm("onednn"):
            y = head(x)
        with cpu_gemm("default"):
            want = nn.Linear.forward(head, x)
    assert used["linear"] == 1
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    with cpu_gemm("onednn"):  # training: autograd through F.linear
        xg = x.clone().requires_grad_(True)
        head(xg).sum().backward()
    assert used["linear"] == 1 and xg.grad is not None

    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    keys = list(plain.state_dict())
    assert use_cpu_gemm(plain) == 2 and list(plain.state_dict()) == keys
    peft = get_peft_model(plain, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 8)
    with torch.no_grad(), cpu_gemm("default"):
        unmerged = peft(x)
    peft.merge_adapter()
    with torch.no_grad(), cpu_gemm("onednn"):
        torch.testing.assert_close(peft(x), unmerged, rtol=1e-5, atol=1e-5)
