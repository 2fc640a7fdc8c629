"""MoLoRALinear: routed stacked experts equal per-expert LoRA, on every path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moa.layers import ExpertChoice, MoLoRALinear, RoutingSlot

IN, OUT = 16, 12
EXPERTS = [(4, 8.0), (8, 4.0), (2, 2.0)]  # (rank, alpha): different ranks and scalings


def make_layer(dropout: float = 0.0, seed: int = 0) -> tuple[MoLoRALinear, RoutingSlot]:
    """A MoLoRALinear with three non-trivial experts of ranks 4, 8 and 2."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT)
    base.requires_grad_(False)
    slot = RoutingSlot()
    layer = MoLoRALinear(base, slot, dropout)
    for r, alpha in EXPERTS:
        layer.add_expert(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), alpha)
    return layer, slot


def reference(layer: MoLoRALinear, x: torch.Tensor, e: int) -> torch.Tensor:
    """Plain LoRA with expert e's own (unpadded) weights: x (T, in) -> (T, out)."""
    y = layer.base_layer(x)
    if e < 0:
        return y
    A, B = layer.expert_weights(e)
    r, alpha = EXPERTS[e]
    return y + (x @ A.T @ B.T) * (alpha / r)


def test_hard_mixed_batch_equals_each_expert_row_by_row():
    layer, slot = make_layer()
    x = torch.randn(5, 7, IN)
    index = torch.tensor([1, 0, 2, -1, 1])
    slot.set_choice(ExpertChoice.of(index))
    y = layer(x)
    for i, e in enumerate(index.tolist()):
        torch.testing.assert_close(y[i], reference(layer, x[i], e), rtol=1e-5, atol=1e-5)


def test_all_rows_routed_without_base_only_rows_uses_the_gathered_path():
    layer, slot = make_layer()
    x = torch.randn(3, 4, IN)
    index = torch.tensor([2, 0, 1])
    choice = ExpertChoice.of(index)
    assert choice.single is None and choice.rows is None
    slot.set_choice(choice)
    y = layer(x)
    for i, e in enumerate(index.tolist()):
        torch.testing.assert_close(y[i], reference(layer, x[i], e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("e", [0, 1, 2, -1])
def test_single_expert_fast_path_equals_gathered_path(e):
    layer, slot = make_layer()
    x = torch.randn(3, 5, IN)
    index = torch.full((3,), e)
    fast = ExpertChoice.of(index)
    assert fast.single == e
    slot.set_choice(fast)
    y_fast = layer(x)
    slot.set_choice(ExpertChoice(index, None, None if e >= 0 else torch.empty(0, dtype=torch.long)))
    y_gathered = layer(x)
    torch.testing.assert_close(y_fast, y_gathered, rtol=1e-5, atol=1e-6)
    if e < 0:
        assert torch.equal(y_fast, layer.base_layer(x))


def test_empty_slot_is_base_only():
    layer, slot = make_layer()
    x = torch.randn(2, 3, IN)
    slot.clear()
    assert torch.equal(layer(x), layer.base_layer(x))


def test_soft_one_hot_weights_equal_hard_routing():
    layer, slot = make_layer()
    x = torch.randn(4, 6, IN)
    index = torch.tensor([0, 2, 1, 0])
    slot.set_choice(ExpertChoice.of(index))
    hard = layer(x)
    slot.set_weights(nn.functional.one_hot(index, 3).float()[:, None, :].expand(4, 6, 3))
    torch.testing.assert_close(layer(x), hard, rtol=1e-5, atol=1e-5)


def test_soft_weights_mix_experts_linearly():
    layer, slot = make_layer()
    x = torch.randn(2, 3, IN)
    w = torch.rand(2, 3, 3)
    slot.set_weights(w)
    base = layer.base_layer(x)
    want = base + sum(w[..., e:e + 1] * (reference(layer, x, e) - base) for e in range(3))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_each_expert_of_mixed_rank_equals_its_own_peft_lora():
    """A rank-4 and a rank-8 PEFT LoRA on the same linear, stacked in one MoLoRALinear."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN, OUT))
    slot = RoutingSlot()
    layer = MoLoRALinear(base[0], slot)
    peft_models = []
    for r, alpha in [(4, 8), (8, 32)]:
        model = nn.Sequential(nn.Linear(IN, OUT))
        model.load_state_dict(base.state_dict())
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False))
        lora = pm.base_model.model[0]
        layer.add_expert(lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach(), alpha)
        peft_models.append(pm.eval())
    assert layer.lora_A.shape == (2, 8, IN) and layer.lora_B.shape == (2, OUT, 8)
    x = torch.randn(2, 5, IN)
    for e, pm in enumerate(peft_models):
        slot.set_choice(ExpertChoice.of(torch.tensor([e, e])))
        torch.testing.assert_close(layer(x), pm(x), rtol=1e-5, atol=1e-6)
    slot.set_choice(ExpertChoice.of(torch.tensor([1, 0])))
    y = layer(x)
    torch.testing.assert_close(y[0], peft_models[1](x[:1])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1], peft_models[0](x[1:])[0], rtol=1e-5, atol=1e-6)


def test_rank_padding_gets_no_gradient_and_stays_zero_under_adamw():
    layer, slot = make_layer()
    slot.set_choice(ExpertChoice.of(torch.tensor([0, 1, 2, 1])))
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(4, 3, IN)).square().sum().backward()
        opt.step()
    for e, (r, _) in enumerate(EXPERTS):
        assert layer.lora_A.grad[e, r:].abs().sum() == 0
        assert layer.lora_B.grad[e, :, r:].abs().sum() == 0
        assert layer.lora_A[e, r:].abs().sum() == 0
        assert layer.lora_B[e, :, r:].abs().sum() == 0
        assert layer.lora_A.grad[e, :r].abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_frozen_experts_get_exactly_zero_gradient():
    layer, slot = make_layer()
    layer.set_trainable_experts(torch.tensor([False, True, False]))
    slot.set_choice(ExpertChoice.of(torch.tensor([0, 1, 2])))
    layer(torch.randn(3, 2, IN)).sum().backward()
    assert layer.lora_A.grad[0].abs().sum() == 0 and layer.lora_A.grad[2].abs().sum() == 0
    assert layer.lora_B.grad[0].abs().sum() == 0 and layer.lora_B.grad[2].abs().sum() == 0
    assert layer.lora_A.grad[1].abs().sum() > 0 and layer.lora_B.grad[1].abs().sum() > 0


def test_dropout_only_in_training():
    layer, slot = make_layer(dropout=0.5)
    slot.set_choice(ExpertChoice.of(torch.tensor([1])))
    x = torch.randn(1, 8, IN)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], reference(layer, x[0], 1), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), layer.eval()(x))


def test_remove_expert_keeps_the_others_and_shrinks_padding():
    layer, slot = make_layer()
    kept = [tuple(t.clone() for t in layer.expert_weights(e)) for e in (0, 2)]
    layer.remove_expert(1)  # the rank-8 expert
    assert layer.ranks == [4, 2] and layer.lora_A.shape == (2, 4, IN)
    for e, (A, B) in enumerate(kept):
        assert torch.equal(layer.expert_weights(e)[0], A) and torch.equal(layer.expert_weights(e)[1], B)
    torch.testing.assert_close(layer.scaling, torch.tensor([8.0 / 4, 2.0 / 2]))


def test_expert_skipping_a_module_adds_nothing():
    layer, slot = make_layer()
    layer.add_expert(None, None, alpha=16)
    slot.set_choice(ExpertChoice.of(torch.tensor([3, 3])))
    x = torch.randn(2, 3, IN)
    assert torch.equal(layer(x), layer.base_layer(x))
    slot.set_choice(ExpertChoice.of(torch.tensor([3, 0])))
    torch.testing.assert_close(layer(x)[0], layer.base_layer(x[0]))


def test_wrong_shapes_are_refused():
    layer, _ = make_layer()
    with pytest.raises(ValueError, match="do not fit"):
        layer.add_expert(torch.zeros(4, IN + 1), torch.zeros(OUT, 4), 8)
