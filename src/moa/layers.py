"""MoLoRALinear: a frozen linear layer plus E LoRA experts stacked side by side.

    y = base(x) + scaling[e] * B[e] @ A[e] @ dropout(x)        (e = the row's expert)

Every MoLoRALinear of one decoder layer reads its routing from the same `RoutingSlot`, which
the routing hooks (`moa.router.routing_hooks`) fill once per forward: a hard top-1 choice
per row (`ExpertChoice`), soft per-token weights (B, T, E) for the MoE-LoRA baseline, or
nothing (base only).

Experts of different rank are zero-padded to the largest rank r_max. The padding is a fixed
point of training: a padded row of A and the matching column of B are both exactly zero, so
both get exactly zero gradient (grad A[e, j] is proportional to B[e, :, j] and vice versa),
and zero stays zero under SGD/Adam/AdamW (weight decay included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ExpertChoice:
    """Hard top-1 routing of a batch, computed once and shared by the layers that use it."""

    index: Tensor
    """(B,) long: each row's expert; -1 means base only for that row."""
    single: int | None
    """The expert (or -1) when every row uses the same one: enables the plain-matmul path."""
    rows: Tensor | None
    """(B',) long: the rows that use an expert, when some rows are base only; else None."""

    @classmethod
    def of(cls, index: Tensor) -> "ExpertChoice":
        index = index.long()  # (B,)
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(f"expert index must have shape (B,) with B > 0, got {tuple(index.shape)}")
        # One host sync per choice (not per module): decides the path every module takes.
        first = int(index[0])
        if bool((index == first).all()):
            return cls(index, first, None)
        active = index >= 0  # (B,)
        rows = None if bool(active.all()) else active.nonzero().squeeze(1)  # (B',)
        return cls(index, None, rows)


class RoutingSlot:
    """The routing of one decoder layer for the current forward; shared by its MoLoRALinears."""

    __slots__ = ("choice", "weights")

    def __init__(self) -> None:
        self.choice: ExpertChoice | None = None
        self.weights: Tensor | None = None  # (B, T, E)

    def set_choice(self, choice: ExpertChoice | None) -> None:
        self.choice, self.weights = choice, None

    def set_weights(self, weights: Tensor | None) -> None:
        self.choice, self.weights = None, weights

    def clear(self) -> None:
        self.choice = self.weights = None

    def __repr__(self) -> str:
        state = "choice" if self.choice is not None else "weights" if self.weights is not None else "empty"
        return f"RoutingSlot({state})"


class MoLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus E stacked LoRA experts, routed per row.

    Parameters: `lora_A` (E, r_max, in), `lora_B` (E, out, r_max); buffer `scaling` (E,) holds
    alpha_e / r_e (0 for an expert that does not target this module). `ranks[e]` is expert e's
    true rank; rows/columns beyond it are zero padding.

    Args:
        base_layer: the frozen linear layer being wrapped.
        slot: the routing slot of this module's decoder layer.
        dropout: LoRA dropout on the input (training only).
        dtype: dtype of the expert weights (float32 by default, whatever the base dtype).
    """

    def __init__(self, base_layer: nn.Linear, slot: RoutingSlot, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.zeros(0, 0, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(0, self.out_features, 0, dtype=dtype, device=device))
        self.register_buffer("scaling", torch.zeros(0, dtype=dtype, device=device))
        self.ranks: list[int] = []
        # (E,) bool of the experts that get gradients, or None for all: see set_trainable_experts.
        self.register_buffer("trainable_mask", None, persistent=False)

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}"

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, in) -> (B, T, out)."""
        result = self.base_layer(x)  # (B, T, out)
        slot = self.slot
        if self.num_experts == 0 or (slot.choice is None and slot.weights is None):
            return result
        A, B = self._expert_weights()  # (E, r, in), (E, out, r)
        xd = self.dropout(x).to(A.dtype)  # (B, T, in)
        if slot.weights is not None:
            delta = self._soft(xd, slot.weights, A, B)
        else:
            delta = self._hard(xd, slot.choice, A, B)
            if delta is None:
                return result
        return result + delta.to(result.dtype)

    def _expert_weights(self) -> tuple[Tensor, Tensor]:
        if self.trainable_mask is None:
            return self.lora_A, self.lora_B
        # Frozen experts see their weights detached: exactly zero gradient for their slices.
        m = self.trainable_mask[:, None, None]  # (E, 1, 1)
        return torch.where(m, self.lora_A, self.lora_A.detach()), torch.where(m, self.lora_B, self.lora_B.detach())

    def _hard(self, x: Tensor, choice: ExpertChoice, A: Tensor, B: Tensor) -> Tensor | None:
        """Top-1 per row; computes only the expert each row uses. Returns None for base only."""
        if choice.single is not None:
            e = choice.single
            if e < 0 or self.ranks[e] == 0:
                return None
            r = self.ranks[e]
            h = F.linear(x, A[e, :r])  # (B, T, r)
            return F.linear(h, B[e, :, :r]) * self.scaling[e]  # (B, T, out)
        index = choice.index
        if choice.rows is not None:  # some rows are base only: compute the others
            rows = choice.rows  # (B',)
            delta = self._gathered(x.index_select(0, rows), index.index_select(0, rows), A, B)  # (B', T, out)
            out = delta.new_zeros(x.shape[0], *delta.shape[1:])  # (B, T, out)
            return out.index_copy(0, rows, delta)
        return self._gathered(x, index, A, B)

    def _gathered(self, x: Tensor, index: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """x: (B, T, in), index: (B,) all >= 0 -> (B, T, out); batched matmul, no loop over rows."""
        A_rows = A.index_select(0, index)  # (B, r, in)
        B_rows = B.index_select(0, index)  # (B, out, r)
        h = torch.bmm(x, A_rows.transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(h, B_rows.transpose(1, 2))  # (B, T, out)
        return delta * self.scaling.index_select(0, index)[:, None, None]

    def _soft(self, x: Tensor, weights: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """Soft mixture: sum_e weights[..., e] * scaling[e] * B[e] A[e] x, in two matmuls."""
        E, r, _ = A.shape
        Bsz, T, _ = x.shape
        h = F.linear(x, A.reshape(E * r, self.in_features))  # (B, T, E*r)
        w = weights.to(h.dtype) * self.scaling  # (B, T, E)
        h = (h.view(Bsz, T, E, r) * w[..., None]).view(Bsz, T, E * r)  # (B, T, E*r)
        B_all = B.permute(1, 0, 2).reshape(self.out_features, E * r)  # (out, E*r)
        return F.linear(h, B_all)  # (B, T, out)

    # ------------------------------------------------------------------ experts

    def add_expert(self, A: Tensor | None, B: Tensor | None, alpha: float, use_rslora: bool = False) -> None:
        """Append one expert. A: (r, in), B: (out, r); None for an expert that skips this module."""
        if A is None or B is None:
            r, A, B = 0, None, None
        else:
            r = A.shape[0]
            if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
                raise ValueError(
                    f"expert shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a linear layer "
                    f"{self.in_features} -> {self.out_features}"
                )
        r_max = max([r, *self.ranks])
        newA = self._pad(self.lora_A.data, r_max, dim=1)
        newB = self._pad(self.lora_B.data, r_max, dim=2)
        rowA = newA.new_zeros(1, r_max, self.in_features)  # (1, r_max, in)
        rowB = newB.new_zeros(1, self.out_features, r_max)  # (1, out, r_max)
        if r:
            rowA[0, :r] = A.to(rowA)
            rowB[0, :, :r] = B.to(rowB)
        scale = 0.0 if r == 0 else alpha / (math.sqrt(r) if use_rslora else r)
        self._replace(torch.cat([newA, rowA]), torch.cat([newB, rowB]),
                      torch.cat([self.scaling, self.scaling.new_tensor([scale])]), [*self.ranks, r])
        if self.trainable_mask is not None:
            self.trainable_mask = torch.cat([self.trainable_mask, self.trainable_mask.new_ones(1)])

    def remove_expert(self, e: int) -> None:
        keep = [k for k in range(self.num_experts) if k != e]
        ranks = [self.ranks[k] for k in keep]
        r_max = max(ranks, default=0)
        idx = torch.tensor(keep, dtype=torch.long, device=self.lora_A.device)
        A = self.lora_A.data.index_select(0, idx)[:, :r_max]  # (E-1, r_max, in)
        B = self.lora_B.data.index_select(0, idx)[:, :, :r_max]  # (E-1, out, r_max)
        self._replace(A.contiguous(), B.contiguous(), self.scaling.index_select(0, idx), ranks)
        if self.trainable_mask is not None:
            self.trainable_mask = self.trainable_mask.index_select(0, idx)

    def expert_weights(self, e: int) -> tuple[Tensor, Tensor] | None:
        """Expert e's own (A (r, in), B (out, r)), unpadded views; None if it skips this module."""
        r = self.ranks[e]
        if r == 0:
            return None
        return self.lora_A[e, :r], self.lora_B[e, :, :r]

    def reset_expert(self, e: int, generator: torch.Generator | None = None) -> None:
        """PEFT's default LoRA init for expert e: A kaiming-uniform, B zero (delta = 0)."""
        r = self.ranks[e]
        with torch.no_grad():
            self.lora_A[e].zero_()
            self.lora_B[e].zero_()
            if r:
                A = torch.empty(r, self.in_features, dtype=self.lora_A.dtype)
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) as nn.Linear
                A.uniform_(-bound, bound, generator=generator)
                self.lora_A[e, :r] = A.to(self.lora_A.device)

    def set_trainable_experts(self, mask: Tensor | None) -> None:
        """mask: (E,) bool of the experts that get gradients, or None for all of them."""
        self.trainable_mask = None if mask is None else mask.to(device=self.lora_A.device, dtype=torch.bool)

    @staticmethod
    def _pad(t: Tensor, r_max: int, dim: int) -> Tensor:
        extra = r_max - t.shape[dim]
        if extra <= 0:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    def _replace(self, A: Tensor, B: Tensor, scaling: Tensor, ranks: list[int]) -> None:
        requires_grad = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(A, requires_grad=requires_grad)
        self.lora_B = nn.Parameter(B, requires_grad=requires_grad)
        self.scaling = scaling
        self.ranks = ranks
