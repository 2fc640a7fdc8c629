"""Routers, routing losses and decisions, and the hooks that route a forward pass.

One `LayerRouter` sits before every decoder layer: it pools that layer's input hidden
states over the prompt tokens (masked mean, float32) and maps them to expert logits with
one linear layer. A `RoutingState` describes one forward (the mode, the explicit experts or
the pool mask, and what the routers said); `routing_hooks` installs forward pre-hooks on the
decoder layers that read it, run the routers when needed and fill each layer's
`RoutingSlot`, and always removes them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.errors import MoAError
from moa.layers import ExpertChoice, RoutingSlot

ROUTER_INIT_STD = 0.02
ROUTINGS = ("explicit", "vote", "last", "layer")
"""The public routing modes (see README 'Routing'); explicit: the caller names the domain."""


class LayerRouter(nn.Module):
    """Masked mean of a layer's input over the prompt, then a linear map to E expert logits.

    Parameters (float32): `weight` (E, H), `bias` (E,).

    Args:
        hidden_size: H, the width of the decoder's hidden states.
        num_experts: E (rows initialised as by `add_output`).
        generator: seeds that initialisation.
    """

    def __init__(self, hidden_size: int, num_experts: int = 0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.zeros(0, hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(0, dtype=torch.float32))
        for _ in range(num_experts):
            self.add_output(generator)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}"

    @staticmethod
    def pool(hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden: (B, T, H), mask: (B, T) (1 = prompt token) -> (B, H) float32 masked mean."""
        keep = mask.bool()[..., None]  # (B, T, 1)
        # where, not multiply: padded positions may hold NaN (fully masked attention rows).
        total = torch.where(keep, hidden.to(torch.float32), 0.0).sum(dim=1)  # (B, H)
        return total / keep.sum(dim=1).clamp(min=1).to(torch.float32)  # (B, H)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden: (B, T, H), mask: (B, T) -> logits (B, E) float32."""
        pooled = self.pool(hidden, mask)  # (B, H)
        return F.linear(pooled.to(self.weight.dtype), self.weight, self.bias)  # (B, E)

    def add_output(self, generator: torch.Generator | None = None) -> None:
        """Grow one expert row (small normal init, zero bias); the old rows are kept exactly."""
        W, b = self.weight.data, self.bias.data  # (E, H), (E,)
        row = torch.randn(1, self.hidden_size, generator=generator, dtype=torch.float32) * ROUTER_INIT_STD  # (1, H)
        self._set(torch.cat([W, row.to(W)]), torch.cat([b, b.new_zeros(1)]))

    def remove_output(self, e: int) -> None:
        keep = [k for k in range(self.num_experts) if k != e]
        idx = torch.tensor(keep, dtype=torch.long, device=self.weight.device)
        self._set(self.weight.data.index_select(0, idx), self.bias.data.index_select(0, idx))

    def _set(self, W: Tensor, b: Tensor) -> None:
        requires_grad = self.weight.requires_grad
        self.weight = nn.Parameter(W.contiguous(), requires_grad=requires_grad)
        self.bias = nn.Parameter(b.contiguous(), requires_grad=requires_grad)


# --------------------------------------------------------------------------- losses and decisions


def router_loss(router_logits: Sequence[Tensor], domain_ids: Tensor, reduction: str = "mean") -> Tensor:
    """Mean over layers of the cross-entropy of each layer's logits (B, E) against domain_ids (B,).

    Rows with domain id -1 (base only, or a prompt the routers did not see whole) are ignored.
    reduction: "mean" over the rows, or "sum" over them (the trainer divides by the global batch).
    """
    if not router_logits:
        raise ValueError("router_loss needs the logits of at least one layer")
    target = domain_ids.to(router_logits[0].device).long()  # (B,)
    losses = [F.cross_entropy(logits.float(), target, ignore_index=-1, reduction=reduction)
              for logits in router_logits]
    return torch.stack(losses).mean()


def router_hits(router_logits: Sequence[Tensor], domain_ids: Tensor) -> list[Tensor]:
    """Per layer, the number of rows whose top-1 expert is their domain id (rows -1 never count)."""
    target = domain_ids.to(router_logits[0].device).long()  # (B,)
    return [(logits.argmax(-1) == target).sum() for logits in router_logits]


def layer_probs(router_logits: Sequence[Tensor]) -> Tensor:
    """(L, B, E) softmax probabilities of every layer's router."""
    return torch.stack([logits.float().softmax(-1) for logits in router_logits])


def vote(router_logits: Sequence[Tensor]) -> Tensor:
    """Majority of the layers' top-1 choices (B,); ties broken by the summed probabilities."""
    probs = layer_probs(router_logits)  # (L, B, E)
    L, _, E = probs.shape
    counts = F.one_hot(probs.argmax(-1), E).sum(0).float()  # (B, E)
    # The tie-break term stays below 1, so it only orders experts with equal vote counts.
    return (counts + probs.sum(0) / (L + 1)).argmax(-1)  # (B,)


def last(router_logits: Sequence[Tensor]) -> Tensor:
    """The last layer's top-1 choice (B,)."""
    return router_logits[-1].argmax(-1)


def decide(router_logits: Sequence[Tensor], how: str) -> tuple[Tensor, Tensor]:
    """One expert per row from the per-layer logits: (index (B,), probs (B, E)).

    how: "vote" (probs = mean of the layers' probabilities) or "last"/"layer" (the last layer's).
    """
    if how == "vote":
        return vote(router_logits), layer_probs(router_logits).mean(0)
    if how in ("last", "layer"):
        return last(router_logits), router_logits[-1].float().softmax(-1)
    raise ValueError(f"unknown decision rule {how!r}")


def check_pool_mask(pool_mask: Tensor) -> None:
    """Every row needs at least one prompt token for the routers to read. pool_mask: (B, T) bool."""
    empty = (~pool_mask.any(1)).nonzero()
    if empty.numel():
        raise MoAError(f"row {int(empty[0])} has no prompt token for the routers to read")


# --------------------------------------------------------------------------- routing a forward


class RoutingDone(Exception):
    """Raised by the hooks to end a routing pass once the last needed router has run."""


@dataclass
class RoutingState:
    """How one forward is routed, and what the routers said.

    Modes:
        "explicit": every row uses `expert_index` -- (B,) the same expert in every layer, or
            (L, B) one per layer; -1 = base only. Routers run only if `run_routers`.
        "layer": each layer uses its own router's top-1 on the pooled prompt (`pool_mask`).
        "soft": each layer's slot gets `gates(layer, hidden (B, T, H)) -> weights (B, T, E)`.
        "base": no expert anywhere.
    """

    mode: str = "explicit"
    expert_index: Tensor | None = None
    pool_mask: Tensor | None = None
    """(B, T) bool: the tokens the routers pool over (prompt tokens, no padding)."""
    run_routers: bool = False
    gates: Callable[[int, Tensor], Tensor] | None = None
    detach_router_inputs: bool = False
    """Routers read detached hidden states: their loss trains the routers only, never the
    experts that produced those states."""
    stop_after: int | None = None
    """End the forward (raise RoutingDone) once this layer's router has run: a routing pass."""
    pool_at: tuple[int, ...] = ()
    """Layers whose pooled input (the masked mean the routers read) is kept in `pooled` (the
    out-of-domain fallback's distance reads it; see moa.fallback)."""
    pooled: dict[int, Tensor] = field(default_factory=dict)
    """{layer: (B, H) float32 pooled input} for the layers of `pool_at`, when the routers ran."""
    logits: list[Tensor] = field(default_factory=list)
    """Per layer, in order: router logits (B, E), when the routers ran."""
    decisions: list[Tensor] = field(default_factory=list)
    """Per layer, in order: the expert index (B,) that layer used (explicit and layer modes)."""
    _choices: list[ExpertChoice] | ExpertChoice | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("explicit", "layer", "soft", "base"):
            raise ValueError(f"unknown routing mode {self.mode!r}")
        if self.mode == "explicit":
            if self.expert_index is None:
                raise ValueError("explicit routing needs expert_index")
            if self.expert_index.ndim == 1:
                self._choices = ExpertChoice.of(self.expert_index)
            else:
                self._choices = [ExpertChoice.of(row) for row in self.expert_index]
        if (self.mode == "layer" or self.run_routers) and self.pool_mask is None:
            raise ValueError(f"routing mode {self.mode!r} with routers needs a pool_mask")
        if self.mode == "soft" and self.gates is None:
            raise ValueError("soft routing needs gates")

    def routers_run(self) -> bool:
        return self.mode == "layer" or self.run_routers

    def enter_layer(self, i: int, hidden: Tensor, router: LayerRouter, slot: RoutingSlot) -> None:
        """Called before decoder layer i with its input hidden (B, T, H): route, fill the slot."""
        logits = None
        if self.routers_run():
            if self.pool_mask.shape != hidden.shape[:2]:
                raise ValueError(
                    f"routers pool over a mask of shape {tuple(self.pool_mask.shape)} but layer {i} got "
                    f"hidden states of shape {tuple(hidden.shape[:2])} (routers only run on a whole prompt)"
                )
            logits = router(hidden.detach() if self.detach_router_inputs else hidden, self.pool_mask)  # (B, E)
            self.logits.append(logits)
            if i in self.pool_at:
                self.pooled[i] = router.pool(hidden.detach(), self.pool_mask)  # (B, H)
            if self.stop_after == i:
                raise RoutingDone
        if self.mode == "explicit":
            choice = self._choices if isinstance(self._choices, ExpertChoice) else self._choices[i]
            slot.set_choice(choice)
            self.decisions.append(choice.index)
        elif self.mode == "layer":
            choice = ExpertChoice.of(logits.argmax(-1))  # (B,)
            slot.set_choice(choice)
            self.decisions.append(choice.index)
        elif self.mode == "soft":
            slot.set_weights(self.gates(i, hidden))  # (B, T, E)
        else:
            slot.clear()


@contextlib.contextmanager
def routing_hooks(
    layers: Sequence[nn.Module],
    routers: Sequence[LayerRouter],
    slots: Sequence[RoutingSlot],
    state: RoutingState,
) -> Iterator[RoutingState]:
    """Route every forward run inside the block by `state`; hooks and slots are always cleared.

    Explicit experts (or none) without routers need no hook: the slots are filled on entry.

    A forward that ends early with RoutingDone (a routing pass) is swallowed here.
    """
    handles = []

    def make_hook(i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            state.enter_layer(i, hidden, routers[i], slots[i])

        return hook

    try:
        if state.mode in ("explicit", "base") and not state.routers_run():
            # Nothing is decided inside the forward: fill the slots once, without per-layer hooks
            # (they would cost a Python call per layer on every forward, i.e. every decoded token).
            for i, slot in enumerate(slots):
                state.enter_layer(i, None, routers[i], slot)
        else:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        try:
            yield state
        except RoutingDone:
            pass
    finally:
        for h in handles:
            h.remove()
        for slot in slots:
            slot.clear()


# --------------------------------------------------------------------------- activation checkpointing


class ReplayRouting:
    """`context_fn` for torch.utils.checkpoint: the recomputation of a layer in backward sees the
    routing slots as they were in its forward (the hooks are gone by then)."""

    def __init__(self, slots: Sequence[RoutingSlot]) -> None:
        self.slots = list(slots)

    def __call__(self):
        snapshot = [(s.choice, s.weights) for s in self.slots]
        return contextlib.nullcontext(), _slots_as(self.slots, snapshot)


@contextlib.contextmanager
def _slots_as(slots: Sequence[RoutingSlot], snapshot: list[tuple]) -> Iterator[None]:
    """Temporarily put the slots back in a recorded state (choice, weights)."""
    saved = [(s.choice, s.weights) for s in slots]
    try:
        for s, (choice, weights) in zip(slots, snapshot):
            s.choice, s.weights = choice, weights
        yield
    finally:
        for s, (choice, weights) in zip(slots, saved):
            s.choice, s.weights = choice, weights


def enable_routed_checkpointing(base_model: nn.Module, slots: Sequence[RoutingSlot]) -> None:
    """Activation checkpointing of the decoder layers (non-reentrant) with the routing replayed."""
    kwargs = {"use_reentrant": False, "context_fn": ReplayRouting(slots)}
    if hasattr(base_model, "activation_checkpointing_enable"):
        base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_routed_checkpointing(layers: Sequence[nn.Module]) -> None:
    """Checkpointing switched on for the base model directly would recompute layers in backward
    without their routing (wrong gradients): refuse it, naming the right call."""
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if not isinstance(getattr(func, "keywords", {}).get("context_fn"), ReplayRouting):
                raise MoAError("gradient checkpointing was enabled on the base model directly, which would "
                               "recompute the layers without their routing; use MoAModel.gradient_checkpointing_enable()")
            return
