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

Modules that read the same input (q/k/v of attention, gate/up of the MLP) share one `SharedInput`:
the first of them to see an input runs the A projections of all of them as ONE matmul over their
concatenated A matrices (one read of the input instead of three, and a wider, faster GEMM); the
others take their slice of that result. The parameters stay per module, so checkpoints, adding
and removing experts are as without sharing: the concatenation is of the (routed) weights, at
forward time, and autograd splits the gradient back to each module's own A.

Without autograd, where every row is routed, the LoRA's B side runs first and the frozen layer's
matmul accumulates into its output (`addmm_`): the base GEMM adds the delta inside its own
blocks, instead of one more read and write of the whole output after it. There the first member
of a `SharedInput` to see an input computes every member's whole output at once
(`SharedInput.output`). On a CPU in float32 the frozen matmuls run on oneDNN instead
(`frozen_linear`, MOA_CPU_GEMM), and the B side then accumulates into their output.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.errors import MoAError


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linear modules that read one input tensor in Llama / Qwen2 / Mistral-style decoder layers:
their LoRA A projections run as one matmul (`SharedInput`)."""


@dataclass
class ExpertChoice:
    """Hard top-1 routing of a batch, computed once and shared by the layers that use it."""

    index: Tensor
    """(B,) long: each row's expert; -1 means base only for that row."""
    single: int | None
    """The expert (or -1) when every row uses the same one: enables the plain-matmul path."""
    rows: Tensor | None
    """(B',) long: the rows that use an expert, when some rows are base only; else None."""
    groups: Tensor | None = None
    """(G,) long: when every row uses an expert and the rows come in G > 1 blocks of n > 1 rows,
    each block on one expert (e.g. 0,0,1,1,3,3; n is the gcd of the runs' lengths), each block's
    expert; else None. Such a batch (`moa.generation` orders its rows so) reads each block's
    weights once, not once per row."""
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    """Per module, the expert weights this choice uses (filled only without autograd)."""

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
        return cls(index, None, rows, None if rows is not None else _equal_runs(index))


def _equal_runs(index: Tensor) -> Tensor | None:
    """(G,) long: the expert of each block of n rows, for the largest n > 1 that cuts index into
    blocks of one expert each (n = the gcd of its runs' lengths: 0,0,0,0,1,1 is 0,0 | 0,0 | 1,1);
    None if there is no such n."""
    values = index.tolist()
    n, run = 0, 1
    for prev, cur in zip(values, values[1:]):
        if cur == prev:
            run += 1
        else:
            n, run = math.gcd(n, run), 1
    n = math.gcd(n, run)
    return None if n < 2 or n == len(values) else index[::n].clone()  # (G,)


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
        self._alone = SharedInput((self,))
        self.shared = self._alone
        """The modules whose A projections run with this one's (see `share_input`); itself alone by default."""

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}"

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, in) -> (B, T, out)."""
        slot = self.slot
        choice, weights = slot.choice, slot.weights
        if (choice is None and weights is None) or not self.ranks or (choice is not None and choice.single == -1):
            return self._base(x)
        dropout = self.training and isinstance(self._modules["dropout"], nn.Dropout)
        xl = self._modules["dropout"](x) if dropout else x  # the LoRA's input; the base reads x
        if weights is not None:
            A, B = self._expert_weights()  # (E, r, in), (E, out, r)
            result = self._base(x)
            return result + self._soft(xl.to(A.dtype), weights, A, B).to(result.dtype)
        # xl goes uncast: the modules sharing it recognise it by identity (`SharedInput.project` casts)
        return self._hard(x, xl, choice, alone=dropout)

    def _base(self, x: Tensor) -> Tensor:
        """The frozen layer's output (B, T, out)."""
        # Runs 7 times per layer for every decoded token: direct dict lookups, not Module.__getattr__.
        base = self._modules["base_layer"]
        if self._plain_base(base):
            params = base._parameters
            return frozen_linear(x, params["weight"], params["bias"])  # skips a module call per token
        return base(x)

    @staticmethod
    def _plain_base(base: nn.Module) -> bool:
        return type(base) in _PLAIN_LINEARS and not (base._forward_hooks or base._forward_pre_hooks)

    def _expert_weights(self) -> tuple[Tensor, Tensor]:
        if self.trainable_mask is None:
            return self.lora_A, self.lora_B
        # Frozen experts see their weights detached: exactly zero gradient for their slices.
        m = self.trainable_mask[:, None, None]  # (E, 1, 1)
        return torch.where(m, self.lora_A, self.lora_A.detach()), torch.where(m, self.lora_B, self.lora_B.detach())

    def _hard(self, x: Tensor, xl: Tensor, choice: ExpertChoice, alone: bool) -> Tensor:
        """The base output plus each row's own expert: x (B, T, in) the base's input, xl the LoRA's
        (x after dropout) -> (B, T, out).

        Computes only the expert each row uses: plain matmuls when every row uses the same one;
        batched matmuls over blocks of rows when the rows come in equal blocks of one expert each
        (`ExpertChoice.groups`: each block reads its expert's weights once); else the rows'
        gathered weights in batched matmuls (rows with no expert are left out). One-token steps
        (decoding) of more than 2E rows in no such blocks instead run every expert on every row and
        mask out the others: the weights are then read once per step instead of once per row, in
        two plain matmuls, for E times the (small) FLOPs of one token.
        The A side comes from this module's `SharedInput` (one matmul for the modules that read
        x; `alone`: this module's x is its own, e.g. after its dropout). Without autograd, the B
        side runs first when every row is routed and the dtypes agree: the base's matmul then
        accumulates into the LoRA's output (`addmm_`, beta = 1, inside the GEMM's own blocks),
        which saves a separate read and write of the whole output. Otherwise the delta is added
        into the base's output in place, which is safe under autograd: the base's matmul does not
        save its output for backward.
        """
        shared = self._alone if alone else self.shared
        if xl is x and choice.rows is None and not torch.is_grad_enabled():
            y = shared.output(self, x, choice)
            if y is not None:
                return y
        projected = shared.project(self, xl, choice)
        if projected is None:  # no expert of this choice targets this module
            return self._base(x)
        h, Bt, mode, x2 = projected
        base = self._modules["base_layer"]
        out = self.out_features
        W = base._parameters["weight"] if self._plain_base(base) else None
        # Not under autograd: an in-place add into a view of the LoRA's output is recorded as a
        # copy of the slices, which made forward + backward 6% slower than the old order.
        if (W is not None and choice.rows is None and x.dtype == h.dtype == Bt.dtype == W.dtype
                and not torch.is_autocast_enabled(x.device.type)
                and not (torch.is_grad_enabled() and (h.requires_grad or Bt.requires_grad or x.requires_grad))):
            if x2 is None or xl is not x or x2.dtype != x.dtype:  # x2: the LoRA's input as (B*T, in)
                x2 = x.reshape(-1, self.in_features)
            # plain: h (B*T, r), Bt (r, out); dense: h (B, E*r), Bt (E*r, out); grouped: h (G, n*T, r),
            # Bt (G, r, out); gathered: h (B, T, r), Bt (B, r, out)
            y = _frozen_plus_lora(x2, W, base._parameters["bias"], h, Bt, mode == "plain")  # (B*T, out)
            return y.view(*x.shape[:-1], out)
        result = self._base(x)
        if mode == "plain":
            return _add_matmul(result, h, Bt)  # (B, T, out)
        if mode == "grouped":  # h (G, n*T, r), Bt (G, r, out): blocks of n rows
            if result.dtype == h.dtype == Bt.dtype and result.is_contiguous():
                result.view(Bt.shape[0], -1, result.shape[-1]).baddbmm_(h, Bt)
                return result
            return result + torch.bmm(h, Bt.to(h.dtype)).view(result.shape).to(result.dtype)
        if choice.rows is not None:  # some rows are base only: h holds the others
            rows = choice.rows  # (B',)
            return result.index_add_(0, rows, torch.bmm(h, Bt.to(h.dtype)).to(result.dtype))
        return _add_bmm(result, h, Bt)  # h (B, T, r), Bt (B, r, out)

    def _routed_B(self, choice: ExpertChoice, B: Tensor, index: Tensor | None) -> Tensor | None:
        """The B side of a choice with the scaling folded in (the small side), transposed.

        Every row uses expert e (index None): scaling_e * B_e^T (r_e, out), unpadded (None if
        r_e = 0). Otherwise the experts `index` (B',) of the routed rows: scaling * B^T
        (B', r_max, out) (None if r_max = 0).
        """
        if index is None:
            e = choice.single
            r = self.ranks[e]
            return None if r == 0 else (B[e, :, :r] * self.scaling[e]).t().contiguous()  # (r, out)
        if B.shape[2] == 0:
            return None
        scale = self.scaling.index_select(0, index)[:, None, None]  # (B', 1, 1)
        return (B.index_select(0, index) * scale).transpose(1, 2).contiguous()  # (B', r_max, out)

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


class SharedInput:
    """MoLoRALinears of one decoder layer that read the same input tensor: their LoRA A projections
    run as ONE matmul over the concatenated (routed) A matrices, and each module takes its slice.

    The first member called with an input computes the projection of every member and keeps it
    until each other member has taken its part (members are matched to it by the input tensor's
    identity, so a member called with any other tensor simply gets its own projection computed:
    grouping modules that do not share an input costs time, never correctness). Without autograd
    the concatenated weights are kept on the `ExpertChoice`, so decoding gathers them once per
    choice, not once per token; and the members' experts are kept stacked, scaled and transposed
    across choices (one more copy of the experts' weights in memory), so routed rows copy their
    weights from them in one gather per tensor.

    Args:
        members: the modules, in the order the model usually calls them (q, k, v).
    """

    __slots__ = ("members", "_x", "_version", "_choice", "_h", "_waiting", "_stacked", "_outs")

    def __init__(self, members) -> None:
        self.members = tuple(members)
        self._stacked = None  # (weights, their stamp, A (E, R, in), per member scaled B^T (E, r, out) or None)
        self._forget()

    def _forget(self) -> None:
        self._x = self._version = self._choice = self._h = None  # the input, its projection (B', T, R)
        self._waiting: set[int] = set()  # ids of the members that have not taken their slice yet
        self._outs: dict[int, Tensor] | None = None  # `output`: the members' outputs not yet taken

    def __repr__(self) -> str:
        return f"SharedInput({len(self.members)} modules)"

    def project(self, member: "MoLoRALinear", x: Tensor, choice: ExpertChoice):
        """member's (x A^T, routed scaled B^T, mode, x2) for a choice, or None if it has no expert there.

        x: (B, T, in), the member's input before any cast. Mode "plain", every row on expert e:
        (B*T, r), (r, out). "grouped", rows in G equal blocks of one expert each: (G, n*T, r),
        (G, r, out). "gathered", mixed: (B', T, r) and (B', r, out) of the routed rows B'. "plain"
        for mixed rows with one token each (decoding), dense: every expert on every row,
        (B, E*r) with the other experts' columns zeroed, and (E*r, out). x2: the input as
        (B*T, in) in the experts' dtype (None where the projection did not need it), so that the
        members do not reshape it again.
        """
        if not (self._x is x and self._choice is choice and self._version == _version(x) and self._h is not None):
            self._forget()
            projected = self._project(x, choice)
            if projected is None:
                return None
            self._x, self._version, self._choice, self._h = x, _version(x), choice, projected
            if len(self.members) > 1:
                self._waiting = {id(m) for m in self.members}
        h, parts, mode, x2 = self._h
        part = parts[self.members.index(member)] if len(parts) > 1 else parts[0]
        if self._waiting:
            self._waiting.discard(id(member))
        if not self._waiting:  # every member has its slice: do not keep the input alive
            self._forget()
        if part is None:
            return None
        start, stop, Bt = part
        if start == 0 and stop == h.shape[-1]:
            return h, Bt, mode, x2
        return h[..., start:stop], Bt, mode, x2  # h: a view, its rows strided as the matmuls allow

    def _project(self, x: Tensor, choice: ExpertChoice):
        """(x A^T of every member, per member (start, stop, B^T) or None, mode, x2) as `project`
        describes them, or None when no member has an expert in this choice."""
        # One token per row and more than twice as many rows as experts: reading every expert
        # once then costs less than reading each row's own gathered copy. At 8 rows on 4
        # experts the gathered path measured faster (docs/RESULTS.md, Performance II).
        grouped = choice.groups is not None and x.dim() == 3
        dense = (not grouped and choice.single is None and x.dim() == 3 and x.shape[1] == 1
                 and x.shape[0] > 2 * self.members[0].num_experts)
        mode = "plain" if choice.single is not None or dense else "grouped" if grouped else "gathered"
        A, parts, mask = self._routed_weights(choice, mode, dense)
        if A is None:
            return None
        xs = x if x.dtype == A.dtype else x.to(A.dtype)  # (B, T, in)
        x2 = None
        if mode == "plain":  # A: A^T (in, R), dense (in, E*R)
            x2 = xs.reshape(-1, xs.shape[-1])  # (B*T, in)
            h = torch.mm(x2, A)  # (B*T, R), dense: (B, E*R)
            if dense:
                h = h.mul_(mask)  # each row keeps its own expert's columns
        elif mode == "grouped":
            h = torch.bmm(xs.reshape(A.shape[0], -1, xs.shape[-1]), A)  # (G, n*T, R)
        else:
            if choice.rows is not None:
                xs = xs.index_select(0, choice.rows)  # (B', T, in)
            h = torch.bmm(xs, A)  # (B', T, R)
        return h, parts, mode, x2

    def output(self, member: "MoLoRALinear", x: Tensor, choice: ExpertChoice) -> Tensor | None:
        """Without autograd, every row routed: member's whole output (B, T, out), its frozen layer's
        plus its expert's, or None where this path does not apply (autocast, a base that is not a
        plain `nn.Linear`, dtypes that differ: the caller then runs the general one).

        The first member called with x computes every member's output: one A projection, each
        member's B side, then each frozen weight's matmul accumulating into it (`addmm_`, beta =
        1). The others take theirs: one call does the group's Python and bookkeeping once, not
        once per member, which is most of what a one-token step's small matmuls cost besides
        their dispatch.
        """
        outs = self._outs
        if outs is not None and self._x is x and self._choice is choice and self._version == _version(x):
            y = outs.pop(id(member), None)
            if y is not None:
                if not outs:
                    self._forget()
                return y
        if torch.is_autocast_enabled(x.device.type):
            return None
        bases = []
        for m in self.members:
            base = m._modules["base_layer"]
            W = base._parameters["weight"] if m._plain_base(base) else None
            if W is None or W.dtype != x.dtype or m._parameters["lora_A"].dtype != x.dtype:
                return None
            bases.append((W, base._parameters["bias"]))
        self._forget()
        projected = self._project(x, choice)
        if projected is None:  # no member has an expert here
            return None
        h, parts, mode, x2 = projected
        if x2 is None:
            x2 = x.reshape(-1, x.shape[-1])  # (B*T, in)
        rows = x2.shape[0]
        shape = x.shape[:-1]
        ys = {}
        for m, part, (W, bias) in zip(self.members, parts, bases):
            if part is None:
                ys[id(m)] = frozen_linear(x, W, bias)
                continue
            start, stop, Bt = part
            hm = h if start == 0 and stop == h.shape[-1] else h[..., start:stop]
            ym = _frozen_plus_lora(x2, W, bias, hm, Bt, mode == "plain")  # (B*T, out)
            ys[id(m)] = ym.view(*shape, ym.shape[-1])
        y = ys.pop(id(member))
        if ys:
            self._x, self._version, self._choice, self._outs = x, _version(x), choice, ys
        return y

    def _routed_weights(self, choice: ExpertChoice, mode: str, dense: bool = False
                        ) -> tuple[Tensor | None, list, Tensor | None]:
        """(the members' routed A concatenated on the rank axis, per member (start, stop, B^T) or None,
        the dense row mask or None).

        Every row uses expert e: A^T (in, R) of the members' unpadded A_e. Gathered: A^T (B', in, R)
        of each routed row's padded A; grouped: A^T (G, in, R) of each block's; `dense`: all experts
        A^T (in, E*R), member by member, expert by expert, with B^T (E*r, out) and the mask (B, E*R)
        of each row's own columns. Without autograd (generation) kept on the choice, checked
        against in-place updates and replaced parameters of every member.
        """
        cacheable = not torch.is_grad_enabled()
        key = (self, mode, dense)
        if cacheable:
            hit = choice.cache.get(key)
            weights = self._weights()
            if hit is not None and all(map(operator.is_, weights, hit[0])) and _versions(weights) == hit[1]:
                return hit[2]
        index = None
        if mode == "grouped":
            index = choice.groups  # (G,)
        elif choice.single is None and not dense:
            index = choice.index if choice.rows is None else choice.index.index_select(0, choice.rows)  # (B',)
        if cacheable and index is not None:
            versions = _versions(weights)
            out = self._gather(index, weights, versions)
            choice.cache[key] = (weights, versions, out)
            return out
        As, parts, masks, R = [], [], [], 0
        for m in self.members:
            A, B = m._expert_weights()  # (E, r_max, in), (E, out, r_max)
            if choice.single is not None:
                A = A[choice.single, :m.ranks[choice.single]]  # (r, in)
                Bt = m._routed_B(choice, B, None)
            elif dense:
                E, r = A.shape[:2]
                A = A.reshape(E * r, -1)  # (E*r, in)
                Bt = None if r == 0 else (B * m.scaling[:, None, None]).transpose(1, 2).reshape(E * r, -1)  # (E*r, out)
                if Bt is not None:
                    own = choice.index[:, None] == torch.arange(E, device=choice.index.device)  # (B, E); -1: none
                    masks.append(own.repeat_interleave(r, dim=1))  # (B, E*r)
            else:
                Bt = m._routed_B(choice, B, index)
            if Bt is None:
                parts.append(None)
                continue
            As.append(A)
            r = A.shape[-2]
            parts.append((R, R + r, Bt))
            R += r
        A = mask = None
        if As:
            A = As[0] if len(As) == 1 else torch.cat(As, dim=-2)  # (R, in), (E, R, in) or (E*R, in)
            if index is not None:
                A = A.index_select(0, index).transpose(1, 2)  # (B', in, R); grouped: (G, in, R)
            else:
                A = A.t()  # (in, R) or (in, E*R)
            if dense:
                mask = torch.cat(masks, dim=1).to(A.dtype)  # (B, E*R)
        out = A, parts, mask
        if cacheable:
            choice.cache[key] = (weights, _versions(weights), out)
        return out

    def _gather(self, index: Tensor, weights: tuple, versions: tuple) -> tuple[Tensor | None, list, None]:
        """`_routed_weights` for the experts `index` (B',) without autograd: one copy of the rows'
        weights taken from the members' stacked, scaled and transposed experts, which are kept
        (checked against in-place updates and replaced parameters) so that each forward does not
        concatenate, scale and transpose them again."""
        stamp = (versions, tuple([w.data_ptr() for w in weights]))  # the pointers: .data swapped by .to()
        stacked = self._stacked
        if stacked is None or not all(map(operator.is_, weights, stacked[0])) or stamp != stacked[1]:
            As, Bts = [], []
            for m in self.members:
                A, B = m.lora_A, m.lora_B  # (E, r_max, in), (E, out, r_max)
                if B.shape[2] == 0:
                    Bts.append(None)
                    continue
                As.append(A)
                Bts.append((B * m.scaling[:, None, None]).transpose(1, 2).contiguous())  # (E, r_max, out)
            A = None if not As else As[0] if len(As) == 1 else torch.cat(As, dim=1)  # (E, R, in)
            stacked = self._stacked = (weights, stamp, A, Bts)
        A_all, Bts = stacked[2], stacked[3]
        if A_all is None:
            return None, [None] * len(self.members), None
        parts, R = [], 0
        for Bt in Bts:
            if Bt is None:
                parts.append(None)
                continue
            r = Bt.shape[1]
            parts.append((R, R + r, Bt.index_select(0, index)))  # (B', r, out)
            R += r
        return A_all.index_select(0, index).transpose(1, 2), parts, None  # (B', in, R)

    def _weights(self) -> tuple:
        """Every member's expert tensors (lora_A, lora_B, scaling), held: identity is meaningful."""
        out = []
        for m in self.members:
            out += (m._parameters["lora_A"], m._parameters["lora_B"], m._buffers["scaling"])
        return tuple(out)


CPU_GEMM_ENV = "MOA_CPU_GEMM"
"""Environment variable: "onednn" (the default) or "default" (PyTorch's own GEMM, MKL on most
builds) for the frozen base projections of MoA layers on a CPU, in float32, without autograd
(`frozen_linear`)."""

_onednn_works: bool | None = None  # oneDNN's linear is there and agrees with F.linear (checked once)
_gemm_choice: str | None = None  # "onednn" / "default": MOA_CPU_GEMM, or `cpu_gemm`'s while it runs


def _check_choice(choice: str) -> str:
    choice = choice.strip().lower()
    if choice not in ("onednn", "default"):
        raise MoAError(f"{CPU_GEMM_ENV}={choice!r}: expected onednn or default")
    return choice


@contextlib.contextmanager
def cpu_gemm(choice: str):
    """Within this block the frozen projections' CPU GEMM is `choice` ("onednn" or "default"),
    whatever MOA_CPU_GEMM says."""
    global _gemm_choice
    old, _gemm_choice = _gemm_choice, _check_choice(choice)
    try:
        yield
    finally:
        _gemm_choice = old


def _choice() -> str:
    """The CPU GEMM in force: `cpu_gemm`'s, else MOA_CPU_GEMM's (read once; a wrong value is an error)."""
    global _gemm_choice
    if _gemm_choice is None:
        _gemm_choice = _check_choice(os.environ.get(CPU_GEMM_ENV, "onednn"))
    return _gemm_choice


def _onednn_ok() -> bool:
    """oneDNN's float32 linear (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU
    backend emits for a linear) is chosen (MOA_CPU_GEMM), there, and gives F.linear's result on a
    probe (to float rounding); the probe runs once per process."""
    global _onednn_works
    if _choice() != "onednn":
        return False
    if _onednn_works is None:
        _onednn_works = False
        if torch.backends.mkldnn.is_available():
            try:
                with torch.no_grad():
                    g = torch.Generator().manual_seed(0)
                    x, w, b = (torch.randn(s, generator=g) for s in ((3, 5, 16), (24, 16), (24,)))
                    y = _onednn_linear(x, w, b)  # (3, 5, 24)
                    _onednn_works = bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
            except (RuntimeError, AttributeError, NotImplementedError):
                pass
    return _onednn_works


def _cpu_fp32_inference(x: Tensor, W: Tensor) -> bool:
    """The frozen projection x W^T runs on oneDNN: a CPU, float32, no autograd, no autocast, chosen."""
    return (x.device.type == "cpu" and x.dtype == W.dtype == torch.float32 and x.dim() >= 2 and W.dim() == 2
            and W.is_contiguous() and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and _onednn_ok())


def frozen_linear(x: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, W, bias) for a frozen base projection. On a CPU, in float32 and without
    autograd, it runs as oneDNN's linear instead of the default GEMM (MKL on most PyTorch builds):
    on the AMD EPYC this was measured on, oneDNN took 0.6-0.9x MKL's time for the 8 rows of a
    decoded token and 0.85-0.93x for 1,024 rows (docs/RESULTS.md, Performance II;
    `benchmarks/cpu_gemm.py` measures it on any CPU). The result is the same up to float rounding
    (another summation order). MOA_CPU_GEMM=default switches it off."""
    if _cpu_fp32_inference(x, W):
        return _onednn_linear(x, W, bias)
    return F.linear(x, W, bias)


class CPUGemmLinear(nn.Linear):
    """An `nn.Linear` whose forward is `frozen_linear`: oneDNN's linear on a CPU in float32 without
    autograd, `F.linear` otherwise (training included). Same parameters, state dict and results
    (to float rounding); `use_cpu_gemm` turns a model's plain linears into these."""

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.weight, self.bias)


_PLAIN_LINEARS = (nn.Linear, CPUGemmLinear)


def use_cpu_gemm(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` of `model` (its LM head, projections no expert targets, the base
    layers of MoLoRALinears and of PEFT layers) into a `CPUGemmLinear`, in place: their inference
    on a CPU in float32 then runs on oneDNN, as MoLoRALinear's frozen projections do. Returns how
    many were turned."""
    _choice()  # a wrong MOA_CPU_GEMM fails here, when the model is built, whatever its dtype
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = CPUGemmLinear
            n += 1
    return n


def _frozen_plus_lora(x2: Tensor, W: Tensor, bias: Tensor | None, h: Tensor, Bt: Tensor, plain: bool) -> Tensor:
    """x2 W^T + bias + the LoRA's h Bt, as (N, out), without autograd. x2 (N, in); plain: h (N, r),
    Bt (r, out); else batched: h (G, N / G, r), Bt (G, r, out).

    With PyTorch's default GEMM the B side runs first and the frozen matmul accumulates into it
    (`addmm_`, beta = 1: the delta is added inside the GEMM's own blocks, not in one more pass over
    the output). On oneDNN (`frozen_linear`) the frozen matmul runs first and the B side
    accumulates into it: oneDNN's fused sum post-op measured no faster than its plain linear at
    1,024 rows, the plain linear then `addmm_` 0.90x of the default order (0.73x at 8 rows)."""
    if _cpu_fp32_inference(x2, W):
        y = _onednn_linear(x2, W, bias)  # (N, out)
        if plain:
            return y.addmm_(h, Bt)
        y.view(h.shape[0], h.shape[1], y.shape[-1]).baddbmm_(h, Bt)
        return y
    y = torch.mm(h, Bt) if plain else torch.bmm(h, Bt).view(-1, Bt.shape[-1])  # (N, out)
    if bias is not None:
        y.add_(bias)
    return y.addmm_(x2, W.t())


def _onednn_linear(x: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, W, bias, "none", [], "")


def share_input(modules) -> None:
    """Let these MoLoRALinears (of one layer, reading the same input) run their A projections as one
    matmul; a single module goes back to running alone."""
    modules = tuple(modules)
    group = modules[0]._alone if len(modules) == 1 else SharedInput(modules)
    for m in modules:
        m.shared = group


def _version(t: Tensor) -> int | None:
    """The in-place update counter of a tensor (inference tensors have none)."""
    return None if t.is_inference() else t._version


def _versions(tensors: tuple) -> tuple:
    """The in-place update counters of tensors (None for inference tensors)."""
    try:
        return tuple([t._version for t in tensors])
    except RuntimeError:  # an inference tensor among them
        return tuple(_version(t) for t in tensors)


def _add_matmul(result: Tensor, h: Tensor, Bt: Tensor) -> Tensor:
    """result + h @ Bt. result: (..., out), h: (N, r) with N the rows of result, Bt: (r, out); in
    place when possible."""
    if result.dtype == h.dtype == Bt.dtype and result.is_contiguous():
        result.view(-1, result.shape[-1]).addmm_(h, Bt)
        return result
    return result + torch.mm(h, Bt.to(h.dtype)).view(result.shape).to(result.dtype)  # e.g. bf16 base or autocast


def _add_bmm(result: Tensor, h: Tensor, Bt: Tensor) -> Tensor:
    """result + h @ Bt per row. result: (B, T, out), h: (B, T, r), Bt: (B, r, out); in place when possible."""
    if result.dtype == h.dtype == Bt.dtype:
        return result.baddbmm_(h, Bt)
    return result + torch.bmm(h, Bt.to(h.dtype)).to(result.dtype)
