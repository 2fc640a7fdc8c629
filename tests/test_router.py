"""Routers, routing losses and decisions, and the routing hooks (on toy layers, no HF)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moa.layers import ExpertChoice, MoLoRALinear, RoutingSlot
from moa.router import (
    LayerRouter,
    RoutingState,
    decide,
    last,
    router_loss,
    routing_hooks,
    vote,
)

H = 8


def test_pool_is_the_masked_mean_and_ignores_nan_padding():
    hidden = torch.randn(2, 4, H)
    hidden[0, 3] = float("nan")  # a padded position
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    pooled = LayerRouter.pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 1:].mean(0))
    assert pooled.dtype == torch.float32


def test_router_logits_shape_and_bf16_input_pooled_in_float32():
    router = LayerRouter(H, 3, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 5, H)
    mask = torch.ones(2, 5)
    logits = router(hidden.bfloat16(), mask)
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, router(hidden, mask), atol=0.05, rtol=0.05)


def test_add_and_remove_output_keep_other_rows_bitwise():
    router = LayerRouter(H, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.5, -0.5]))
    W, b = router.weight.detach().clone(), router.bias.detach().clone()
    router.add_output(torch.Generator().manual_seed(1))
    assert router.num_experts == 3
    assert torch.equal(router.weight[:2], W) and torch.equal(router.bias[:2], b)
    assert router.bias[2] == 0 and router.weight[2].abs().max() < 0.2
    router.remove_output(0)
    assert torch.equal(router.weight[0], W[1]) and torch.equal(router.bias[0], b[1])


def test_router_loss_is_mean_over_layers_of_cross_entropy():
    logits = [torch.randn(4, 3) for _ in range(3)]
    target = torch.tensor([0, 2, 1, 1])
    want = sum(F.cross_entropy(l, target) for l in logits) / 3
    torch.testing.assert_close(router_loss(logits, target), want)


def test_vote_is_the_majority_of_layer_choices():
    # Row 0: layers choose 1, 1, 0 -> 1 even though layer 2 is very confident about 0.
    # Row 1: all layers choose 2.
    logits = [torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]),
              torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]),
              torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 3.0]])]
    assert vote(logits).tolist() == [1, 2]
    assert last(logits).tolist() == [0, 2]
    index, probs = decide(logits, "vote")
    torch.testing.assert_close(probs, torch.stack([l.softmax(-1) for l in logits]).mean(0))
    index, probs = decide(logits, "last")
    torch.testing.assert_close(probs, logits[-1].softmax(-1))


def test_vote_ties_are_broken_by_summed_probabilities():
    # Two layers, one vote each for experts 0 and 1; expert 1's layer is more confident.
    logits = [torch.tensor([[0.2, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0]])]
    assert vote(logits).tolist() == [1]
    logits = [torch.tensor([[math.log(9), 0.0, 0.0]]), torch.tensor([[0.0, 0.1, 0.0]])]
    assert vote(logits).tolist() == [0]


# --------------------------------------------------------------------------- hooks on toy layers


class ToyLayer(nn.Module):
    def __init__(self, slot: RoutingSlot):
        super().__init__()
        self.proj = MoLoRALinear(nn.Linear(H, H), slot)

    def forward(self, hidden_states):
        return hidden_states + self.proj(hidden_states)


def toy_stack(num_layers: int = 3, num_experts: int = 2):
    torch.manual_seed(0)
    slots = [RoutingSlot() for _ in range(num_layers)]
    layers = nn.ModuleList(ToyLayer(s) for s in slots)
    for layer in layers:
        for _ in range(num_experts):
            layer.proj.add_expert(torch.randn(2, H), torch.randn(H, 2), 4)
    routers = [LayerRouter(H, num_experts, torch.Generator().manual_seed(i)) for i in range(num_layers)]
    return layers, routers, slots


def run(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def test_hooks_are_removed_and_slots_cleared_when_the_forward_raises():
    layers, routers, slots = toy_stack()
    state = RoutingState("explicit", torch.tensor([0, 1]))
    with pytest.raises(RuntimeError):
        with routing_hooks(layers, routers, slots, state):
            run(layers, torch.randn(2, 3, H + 1))  # wrong width: the first linear raises
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    assert all(s.choice is None and s.weights is None for s in slots)


def test_fixed_routing_sets_every_layer_and_collects_router_logits():
    layers, routers, slots = toy_stack()
    x, mask = torch.randn(2, 3, H), torch.ones(2, 3)
    state = RoutingState("explicit", torch.tensor([1, 0]), pool_mask=mask, run_routers=True)
    with routing_hooks(layers, routers, slots, state):
        seen = []
        layers[1].register_forward_pre_hook(lambda m, a: seen.append(slots[1].choice.index.tolist()))
        run(layers, x)
    assert seen == [[1, 0]]
    assert len(state.logits) == 3 and state.logits[0].shape == (2, 2)
    assert [d.tolist() for d in state.decisions] == [[1, 0]] * 3
    torch.testing.assert_close(state.logits[0], routers[0](x, mask))


def test_layer_routing_uses_each_routers_top1_and_a_routing_pass_stops_early():
    layers, routers, slots = toy_stack()
    x, mask = torch.randn(2, 3, H), torch.ones(2, 3)
    state = RoutingState("layer", pool_mask=mask)
    with routing_hooks(layers, routers, slots, state):
        run(layers, x)
    assert [d.tolist() for d in state.decisions] == [l.argmax(-1).tolist() for l in state.logits]

    calls = []
    layers[2].proj.register_forward_hook(lambda *a: calls.append(1))
    routing_pass = RoutingState("layer", pool_mask=mask, stop_after=2)
    with routing_hooks(layers, routers, slots, routing_pass):
        run(layers, x)
    assert calls == []  # the last layer itself did not run
    for a, b in zip(routing_pass.logits, state.logits):
        assert torch.equal(a, b)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)


def test_per_layer_fixed_index_and_soft_gates():
    layers, routers, slots = toy_stack()
    x = torch.randn(2, 3, H)
    per_layer = torch.tensor([[0, 1], [1, 1], [-1, 0]])  # (L, B)
    state = RoutingState("explicit", per_layer)
    with routing_hooks(layers, routers, slots, state):
        y = run(layers, x)
    assert [d.tolist() for d in state.decisions] == per_layer.tolist()
    # Soft one-hot gates that encode the same choices give the same output.
    gates = lambda i, h: F.one_hot(per_layer[i].clamp(min=0), 2).float()[:, None, :].expand(2, h.shape[1], 2) \
        * (per_layer[i] >= 0).float()[:, None, None]
    with routing_hooks(layers, routers, slots, RoutingState("soft", gates=gates)):
        torch.testing.assert_close(run(layers, x), y, rtol=1e-5, atol=1e-5)


def test_routers_refuse_a_continuation_without_the_prompt():
    layers, routers, slots = toy_stack()
    state = RoutingState("layer", pool_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="whole prompt"):
        with routing_hooks(layers, routers, slots, state):
            run(layers, torch.randn(2, 1, H))
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)


def test_expert_choice_paths():
    assert ExpertChoice.of(torch.tensor([2, 2, 2])).single == 2
    c = ExpertChoice.of(torch.tensor([0, -1, 1]))
    assert c.single is None and c.rows.tolist() == [0, 2]
    assert ExpertChoice.of(torch.tensor([0, 1])).rows is None
