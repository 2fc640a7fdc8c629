"""MoAModel: a frozen causal LM with one LoRA expert per domain and one router per layer.

    model = MoAModel.from_adapters(["lora/finance", "lora/medicine"])   # stage-1 PEFT LoRAs
    out = model(input_ids=..., attention_mask=..., domains=["finance", "medicine"])
    model.save_pretrained("moa-ckpt")
    results = MoAModel.from_pretrained("moa-ckpt").generate(["What is an ETF?"])

Every targeted linear module of every decoder layer becomes a `MoLoRALinear` holding all
experts; all modules of one layer share a `RoutingSlot` that the routing hooks
(`moa.router.routing_hooks`) fill before the layer runs. The class holds the experts, the
routers and the forward pass; checkpoint I/O is `moa.checkpoint` (on-disk layout documented
there), generation `moa.generation`, routing decisions and hooks `moa.router`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from moa.errors import MoAError
from moa.generation import GenerationResult, cache_of
from moa.losses import label_nll
from moa.layers import SHARED_INPUTS, MoLoRALinear, RoutingSlot, share_input, use_cpu_gemm
from moa.router import (ROUTINGS, LayerRouter, RoutingState, check_pool_mask, check_routed_checkpointing, decide,
                        enable_routed_checkpointing, router_loss, routing_hooks)

if TYPE_CHECKING:
    from moa.checkpoint import Adapter


@dataclass
class MoAOutput:
    """What `MoAModel.forward` returns (B rows, T tokens, V vocabulary, E experts, L layers)."""

    logits: Tensor
    """(B, T, V)."""
    expert_ids: Tensor
    """(B,) long: the expert each row used (-1: base only); `layer` routing: the last layer's."""
    domains: list[str | None]
    """The domain name of `expert_ids` per row."""
    router_probs: Tensor | None = None
    """(B, E) probabilities of the routing decision (vote: mean over layers; last/layer: last layer)."""
    router_logits: list[Tensor] | None = None
    """Per layer (B, E), when the routers ran."""
    loss: Tensor | None = None
    """Mean LM cross-entropy over the label tokens, when labels are given."""
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    """(B, T, H) per layer input and the final normed output, when output_hidden_states=True."""
    router_targets: Tensor | None = None
    """(B,) the explicit experts the routers were asked to predict (explicit + return_router_logits)."""

    @property
    def router_loss(self) -> Tensor | None:
        """Mean over layers of CE(router logits, expert ids) (rows -1 ignored), computed when read:
        explicit routing + return_router_logits. The stage-2 loss is `loss + model.eta * router_loss`
        (the trainer computes its own, normalised over the global batch)."""
        if self.router_targets is None or not bool((self.router_targets >= 0).any()):
            return None
        return router_loss(self.router_logits, self.router_targets)


class MoAModel(nn.Module):
    """A frozen base causal LM + E LoRA experts in every targeted linear + one router per layer.

    Build it with `from_adapters` (stage-1 PEFT adapters) or `from_pretrained` (a saved MoA
    checkpoint). The constructor wraps `base_model` in place with zero experts.

    Args:
        base_model: a transformers CausalLM (frozen here).
        tokenizer: its tokenizer (with a chat template for `generate`).
        base: the base reference recorded in moa_config.json.
        target_modules: short names of the linear modules that get experts (q_proj, ...).
        eta: weight of the router loss in stage 2 (stored in the config).
        lora_dropout: dropout on the experts' input, training only.
        routing_default: the routing used when neither `routing` nor domains are given.
        seed: seeds the initialisation of new router rows.
        route_layers: vote / last routing decides from the routers of the first K layers only
            (early exit: the routing pass stops after layer K's router); None: all layers.
    """

    def __init__(self, base_model: nn.Module, tokenizer, *, base: str, target_modules: Sequence[str],
                 eta: float = 1.0, lora_dropout: float = 0.0, routing_default: str = "vote",
                 provenance: dict | None = None, seed: int = 0, route_layers: int | None = None) -> None:
        super().__init__()
        if routing_default not in ROUTINGS[1:]:
            raise MoAError(f"routing_default must be one of {', '.join(ROUTINGS[1:])}, got {routing_default!r}")
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.base_ref = base
        self.eta = float(eta)
        self.routing_default = routing_default
        self.provenance = dict(provenance or {})
        self.seed = seed
        self.target_modules = sorted(set(target_modules))
        self._domains: list[str] = []
        self.experts: dict[str, dict] = {}
        """{domain: {"r", "alpha", "target_modules"[, "use_rslora"]}} as in moa_config.json."""
        for p in base_model.parameters():
            p.requires_grad_(False)
        layers = _decoder_layers(base_model)
        self._layers = tuple(layers)  # a tuple: not registered twice as a submodule
        self.slots = [RoutingSlot() for _ in layers]
        self.lora_modules = _inject(base_model, layers, self.slots, self.target_modules, lora_dropout)
        """{module path in base_model: MoLoRALinear}, in model order (a plain dict, not registered twice)."""
        use_cpu_gemm(base_model)  # the LM head and untargeted projections: oneDNN at float32 CPU inference
        self.fuse_shared_inputs(True)
        hidden = base_model.config.get_text_config().hidden_size
        # float32 like the experts (master weights), on the base's device
        self.routers = nn.ModuleList(LayerRouter(hidden) for _ in layers).to(_device_of(base_model))
        forward_params = inspect.signature(base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._keep_last = "logits_to_keep" in forward_params  # generation needs the last position only
        self.route_layers = route_layers
        self.routing_only = False
        """Loaded for routing alone (`moa.checkpoint.load_routing_part`): the first layers, no LM head."""
        self.fallback_calibration = None
        """The checkpoint's out-of-domain calibration (`moa.fallback.FallbackConfig`), saved with it."""
        self.fallback = None
        """The fallback in force (`moa.fallback.set_fallback`: off, the calibration, or another
        threshold): vote / last routing sends a prompt beyond it to the base model (expert -1)."""
        self.eval()

    # ------------------------------------------------------------------ properties

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    @property
    def num_experts(self) -> int:
        return len(self._domains)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def route_layers(self) -> int:
        """K: vote / last routing decides from the routers of layers 1..K (default: all layers)."""
        return self._route_layers or self.num_layers

    @route_layers.setter
    def route_layers(self, k: int | None) -> None:
        self._route_layers = self._check_route_layers(k)

    def _check_route_layers(self, k: int | None) -> int | None:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_layers):
            raise MoAError(f"route_layers must be an integer from 1 to {self.num_layers} (the model's layers), "
                           f"got {k!r}")
        return k

    @property
    def device(self) -> torch.device:
        return _device_of(self.base_model)

    def extra_repr(self) -> str:
        return f"domains={self._domains}, target_modules={self.target_modules}, eta={self.eta}"

    # ------------------------------------------------------------------ construction (I/O: moa.checkpoint)

    @classmethod
    def from_adapters(cls, adapter_dirs, domains=None, base=None, **kwargs) -> "MoAModel":
        """Assemble stage-1 PEFT LoRA adapters (see `moa.checkpoint.assemble`)."""
        from moa.checkpoint import assemble

        return assemble(cls, adapter_dirs, domains, base, **kwargs)

    @classmethod
    def from_pretrained(cls, moa_dir, base=None, **kwargs) -> "MoAModel":
        """Load a saved MoA checkpoint (see `moa.checkpoint.load_checkpoint`): `device=` auto|cpu|cuda|
        cuda:N|mps and `dtype=` auto|float32|bfloat16|float16 of the base (experts stay float32)."""
        from moa.checkpoint import load_checkpoint

        return load_checkpoint(cls, moa_dir, base, **kwargs)

    def save_pretrained(self, out_dir, provenance: dict | None = None) -> Path:
        """Write the checkpoint atomically (see `moa.checkpoint.save_checkpoint`)."""
        from moa.checkpoint import save_checkpoint

        return save_checkpoint(self, out_dir, provenance)

    # ------------------------------------------------------------------ experts

    def add_expert(self, domain: str, adapter: "str | Path | Adapter", *, check_base: bool = True) -> None:
        """Import a PEFT LoRA adapter (a directory, or one read by `moa.checkpoint.read_adapter`) as a
        new expert (any rank/alpha, any subset of the target modules). Every router grows one output
        row; existing experts and rows are unchanged."""
        from moa.checkpoint import Adapter, check_domain_name, read_adapter, same_base

        check_domain_name(domain)
        if domain in self.experts:
            raise MoAError(f"domain '{domain}' already has an expert (remove_expert it first)")
        if not isinstance(adapter, Adapter):
            adapter = read_adapter(adapter)
        if check_base and adapter.base and not same_base(adapter.base, self.base_ref):
            raise MoAError(f"{adapter.where} was trained on base {adapter.base}, but this model's base is "
                           f"{self.base_ref} (pass check_base=False if they are the same model)")
        self._check_fits(adapter)
        self._append_expert(domain, adapter)
        self._drop_fallback()

    def remove_expert(self, domain: str) -> None:
        """Drop a domain's expert from every module and its row from every router."""
        e = self.domain_index(domain)
        if self.num_experts == 1:
            raise MoAError(f"cannot remove '{domain}': it is the only expert")
        for mod in self.lora_modules.values():
            mod.remove_expert(e)
        for router in self.routers:
            router.remove_output(e)
        del self._domains[e]
        del self.experts[domain]
        self._drop_fallback()

    def _drop_fallback(self) -> None:
        """The fallback was calibrated on the old domains: a changed set of experts drops it
        (`moa calibrate` computes a new one) rather than keep a stale threshold."""
        self.fallback_calibration = self.fallback = None

    def domain_index(self, domain: str) -> int:
        try:
            return self._domains.index(domain)
        except ValueError:
            raise MoAError(f"unknown domain '{domain}' (known domains: {', '.join(self._domains) or 'none'})") from None

    def expert_state_dict(self, domain: str) -> dict[str, Tensor]:
        """The expert of `domain` as PEFT adapter tensors (keys `base_model.model.<path>.lora_A.weight`
        (r, in) and `.lora_B.weight` (out, r)); detached copies."""
        e = self.domain_index(domain)
        out = {}
        for path, mod in self.lora_modules.items():
            weights = mod.expert_weights(e)
            if weights is not None:
                out[f"base_model.model.{path}.lora_A.weight"] = weights[0].detach().clone()
                out[f"base_model.model.{path}.lora_B.weight"] = weights[1].detach().clone()
        return out

    def router_state_dict(self) -> dict[str, Tensor]:
        """{layers.<i>.weight (E, H), layers.<i>.bias (E,)}: detached copies."""
        out = {}
        for i, router in enumerate(self.routers):
            out[f"layers.{i}.weight"] = router.weight.detach().clone()
            out[f"layers.{i}.bias"] = router.bias.detach().clone()
        return out

    def load_router_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for i, router in enumerate(self.routers):
            for name in ("weight", "bias"):
                key, param = f"layers.{i}.{name}", getattr(router, name)
                if key not in tensors:
                    raise MoAError(f"router weights: missing {key}")
                if tensors[key].shape != param.shape:
                    raise MoAError(f"router weights: {key} has shape {tuple(tensors[key].shape)}, "
                                   f"expected {tuple(param.shape)} ({self.num_experts} experts)")
                with torch.no_grad():
                    param.copy_(tensors[key])

    def set_trainable(self, experts: bool | Sequence[str] = True, routers: bool = True) -> None:
        """Choose what trains: all experts (True), none (False) or the named ones, and the routers.
        The base model is always frozen. Named experts: the others get exactly zero gradient
        (their slices of the stacked weights are detached; an optimizer with decoupled weight
        decay would still shrink them, so give it weight_decay=0 or only train all experts)."""
        if isinstance(experts, bool):
            train_experts, mask = experts, None
        else:
            names = list(experts)
            ids = {self.domain_index(d) for d in names}
            train_experts = bool(ids)
            mask = torch.tensor([e in ids for e in range(self.num_experts)], dtype=torch.bool)
        for mod in self.lora_modules.values():
            mod.lora_A.requires_grad_(train_experts)
            mod.lora_B.requires_grad_(train_experts)
            mod.set_trainable_experts(mask if train_experts else None)
        for p in self.routers.parameters():
            p.requires_grad_(routers)

    def reset_experts(self, seed: int = 0, domains: Sequence[str] | None = None) -> None:
        """Re-initialise experts as a fresh PEFT LoRA (A kaiming-uniform, B zero: delta = 0), seeded.
        The "random init" ablation of stage 2; all experts unless `domains` names some."""
        ids = [self.domain_index(d) for d in (self._domains if domains is None else domains)]
        for m, mod in enumerate(self.lora_modules.values()):
            for e in ids:
                mod.reset_expert(e, torch.Generator().manual_seed(seed * 1_000_003 + m * 1_009 + e))

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing of the decoder layers that replays each layer's routing in the
        backward recomputation (see `moa.router.enable_routed_checkpointing`)."""
        enable_routed_checkpointing(self.base_model, self.slots)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def split_trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(router parameters, expert parameters) that require grad, told apart by the module
        that owns them (never by name: a base model may call its own modules 'router')."""
        routers = [p for p in self.routers.parameters() if p.requires_grad]
        experts = [p for mod in self.lora_modules.values() for p in (mod.lora_A, mod.lora_B) if p.requires_grad]
        return routers, experts

    def fuse_shared_inputs(self, fused: bool = True) -> None:
        """Run the LoRA A projections of modules that read the same input (q/k/v, gate/up: see
        `moa.layers.SHARED_INPUTS`) as one matmul each (True, the default), or every module alone.
        The same function either way (up to float rounding); checkpoints are not affected."""
        groups: dict[tuple, list[MoLoRALinear]] = {}
        for path, mod in self.lora_modules.items():
            parent, _, name = path.rpartition(".")
            sibling = next((k for k, names in enumerate(SHARED_INPUTS) if name in names), None)
            key = (parent, sibling) if fused and sibling is not None else (path, None)
            groups.setdefault(key, []).append(mod)
        for members in groups.values():
            share_input(members)

    def set_lora_dropout(self, p: float) -> None:
        """Dropout on every expert's input while training (0: none)."""
        for mod in self.lora_modules.values():
            mod.dropout = nn.Dropout(p) if p > 0 else nn.Identity()

    def routing(self, state: RoutingState):
        """Context manager: every `base_model` forward inside it is routed by `state`."""
        return routing_hooks(self._layers, self.routers, self.slots, state)

    def _check_fits(self, adapter) -> None:
        """Every adapter module must be one of ours with matching shapes."""
        for path, (A, B) in adapter.weights.items():
            mod = self.lora_modules.get(path)
            if mod is None:
                short = path.rsplit(".", 1)[-1]
                what = ("is not a target module of this model (targets: " + ", ".join(self.target_modules) + ")"
                        if short not in self.target_modules else "does not exist in the base model (wrong base?)")
                raise MoAError(f"{adapter.where}: module {path} {what}")
            if A.shape != (adapter.r, mod.in_features) or B.shape != (mod.out_features, adapter.r):
                raise MoAError(
                    f"{adapter.where}: {path} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, but the base "
                    f"layer is {mod.in_features} -> {mod.out_features} with r={adapter.r} (adapter for another base?)"
                )

    def _append_expert(self, domain: str, adapter) -> None:
        for path, mod in self.lora_modules.items():
            A, B = adapter.weights.get(path, (None, None))
            mod.add_expert(A, B, adapter.alpha, adapter.use_rslora)
        e = self.num_experts
        for i, router in enumerate(self.routers):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 1_009 + e)
            router.add_output(g)
        self._domains.append(domain)
        info = {"r": adapter.r, "alpha": adapter.alpha, "target_modules": adapter.target_modules}
        if adapter.use_rslora:
            info["use_rslora"] = True
        self.experts[domain] = info


    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        domains: Sequence[str] | None = None,
        routing: str | None = None,
        domain_ids: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_router_logits: bool = False,
        router_loss_to_experts: bool = True,
        past_key_values: Any = None,
        use_cache: bool = False,
        **kwargs,
    ) -> MoAOutput:
        """Run the model with routed experts.

        Args:
            input_ids: (B, T).
            attention_mask: (B, T), 1 for real tokens (default: all ones).
            domains / domain_ids: the expert of each row, by name or index (B,) (None / -1: base only);
                they imply routing="explicit".
            routing: "explicit", "vote", "last" or "layer"; default: explicit if domains are
                given, else the model's routing_default.
            prompt_mask: (B, T) bool, the tokens the routers pool over (default: attention_mask).
            labels: (B, T) with -100 on ignored tokens; shifted inside as in transformers.
            return_router_logits: explicit routing also runs the routers (stage-2 router loss).
            router_loss_to_experts: with return_router_logits, whether the router loss may reach the
                experts through the hidden states the routers read (False: routers read detached states).
            past_key_values / use_cache: KV cache, passed to the base model; routers cannot run
                on a continuation, so use explicit routing (domain_ids) with a cache.
        """
        self._check_full("forward")
        routing = self.resolve_routing(routing, domains, domain_ids)
        check_routed_checkpointing(self._layers)
        B, T = input_ids.shape
        # Batches are collated on the CPU; the model may live on an accelerator.
        input_ids, attention_mask, prompt_mask, labels = _to(self.device, input_ids, attention_mask, prompt_mask,
                                                             labels)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pool_mask = (prompt_mask if prompt_mask is not None else attention_mask).bool()  # (B, T)
        routers_run = routing != "explicit" or return_router_logits
        if routers_run and past_key_values is not None:
            raise MoAError(f"routing '{routing}' (or return_router_logits) needs the whole prompt, not a "
                           "continuation of a KV cache: decide the experts first, then pass domain_ids")
        if kwargs.get("position_ids") is None and past_key_values is None:
            # From the mask, as transformers' generate does: left padding does not shift positions.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        base_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        if past_key_values is not None:
            base_kwargs[self._cache_kw] = past_key_values

        probs, logits_per_layer, targets = None, None, None
        if routing == "explicit":
            expert_ids = self.expert_ids_for(domains, domain_ids, B)  # (B,)
            state = RoutingState("explicit", expert_ids, pool_mask if return_router_logits else None,
                                 run_routers=return_router_logits, detach_router_inputs=not router_loss_to_experts)
            out = self._run(state, base_kwargs)
            if return_router_logits:
                logits_per_layer = state.logits
                probs = decide(logits_per_layer, "vote")[1]
                targets = expert_ids
        elif routing == "layer":
            check_pool_mask(pool_mask)
            state = RoutingState("layer", pool_mask=pool_mask)
            out = self._run(state, base_kwargs)
            logits_per_layer, expert_ids = state.logits, state.decisions[-1]
            probs = decide(logits_per_layer, "layer")[1]
        else:  # vote / last: one expert per row, then exactly the explicit computation
            expert_ids, probs, logits_per_layer = self._route(input_ids, attention_mask, pool_mask,
                                                              kwargs.get("position_ids"), routing)
            out = self._run(RoutingState("explicit", expert_ids), base_kwargs)

        logits = out.logits  # (B, T, V)
        loss = None if labels is None else label_nll(labels, logits=logits)[0].mean()
        return MoAOutput(
            logits=logits, expert_ids=expert_ids, domains=self.domain_names(expert_ids), router_probs=probs,
            router_logits=logits_per_layer, loss=loss, router_targets=targets,
            past_key_values=cache_of(out), hidden_states=getattr(out, "hidden_states", None),
        )

    def _run(self, state: RoutingState, base_kwargs: dict):
        with self.routing(state):
            return self.base_model(**base_kwargs)

    def _route(self, input_ids: Tensor, attention_mask: Tensor, pool_mask: Tensor, position_ids: Tensor | None,
               how: str, route_layers: int | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Routing pass (layer mode) over the prompt only; stops once router K has run
        (K = route_layers, default the model's `route_layers`).

        Returns (expert per row (B,), decision probs (B, E), per-layer logits [(B, E)] * K).
        """
        K = self._check_route_layers(route_layers) or self.route_layers
        pool_at = self.fallback.pool_layers if self.fallback is not None and how != "layer" else ()
        state = self._routing_pass(input_ids, attention_mask, pool_mask, position_ids, max((K - 1, *pool_at)), pool_at)
        logits = state.logits[:K]  # the fallback may have read a later layer's input
        expert_ids, probs = self._decide(logits, how, state.pooled)
        return expert_ids, probs, logits

    def _routing_pass(self, input_ids: Tensor, attention_mask: Tensor, pool_mask: Tensor,
                      position_ids: Tensor | None, stop_after: int, pool_at: tuple[int, ...] = ()) -> RoutingState:
        """Layer-mode pass over the prompt up to router `stop_after`; the state holds every router's
        logits and the pooled inputs of the layers `pool_at`."""
        check_pool_mask(pool_mask)
        # Causality: the prompt's hidden states do not depend on later tokens, so cut them.
        T = int(pool_mask.any(0).nonzero().max()) + 1
        state = RoutingState("layer", pool_mask=pool_mask[:, :T], stop_after=stop_after, pool_at=tuple(pool_at))
        kwargs = dict(input_ids=input_ids[:, :T], attention_mask=attention_mask[:, :T], use_cache=False)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, :T]
        with self.routing(state):
            self.base_model(**kwargs)
        return state

    def _decide(self, logits: Sequence[Tensor], how: str, pooled: dict[int, Tensor] | None) -> tuple[Tensor, Tensor]:
        """`moa.router.decide`, then the out-of-domain fallback (vote / last only): a row whose
        prompt lies beyond its threshold gets expert -1, the base model. (index (B,), probs (B, E))."""
        expert_ids, probs = decide(logits, how)
        if self.fallback is not None and how in ("vote", "last"):
            expert_ids = self.fallback.apply(expert_ids, logits, pooled or {}, how)
        return expert_ids, probs

    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None, routing: str = "vote",
              prompt_mask: Tensor | None = None, route_layers: int | None = None) -> tuple[Tensor, Tensor]:
        """Decide one expert per row from the prompt alone (the routing pass, no output computed).

        Args:
            input_ids / attention_mask: (B, T) prompts (either padding side).
            routing: "vote", "last" or "layer" (the last layer's choice).
            prompt_mask: (B, T) the tokens to pool over (default: attention_mask).
            route_layers: K, decide from the routers of the first K layers only (the pass stops
                there); default: the model's `route_layers`.
        Returns:
            (expert_ids (B,), probs (B, E) of the decision).
        """
        if routing not in ROUTINGS[1:]:
            raise MoAError(f"route needs routing vote, last or layer, got {routing!r}")
        self.resolve_routing(routing, None, None)
        input_ids, attention_mask, prompt_mask = _to(self.device, input_ids, attention_mask, prompt_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pool_mask = (prompt_mask if prompt_mask is not None else attention_mask).bool()  # (B, T)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        expert_ids, probs, _ = self._route(input_ids, attention_mask, pool_mask, position_ids, routing, route_layers)
        return expert_ids, probs

    def decide(self, router_logits: Sequence[Tensor], how: str,
               pooled: dict[int, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`moa.router.decide` over the routers of the first `route_layers` layers only: what a
        forward that ran every router (a routed prefill) decides, as the early-exit pass would,
        the fallback included (`pooled`: the RoutingState's, of `fallback.pool_layers`)."""
        return self._decide(list(router_logits)[: self.route_layers], how, pooled)

    def _check_full(self, what: str) -> None:
        if self.routing_only:
            raise MoAError(f"this model was loaded for routing only (the embeddings and the first {self.num_layers} "
                           f"layers, no LM head): it cannot {what}; load it with MoAModel.from_pretrained")

    def resolve_routing(self, routing: str | None, domains, domain_ids) -> str:
        if self.num_experts == 0:
            raise MoAError("this model has no expert")
        named = domains is not None or domain_ids is not None
        if routing is None:
            return "explicit" if named else self.routing_default
        if routing not in ROUTINGS:
            raise MoAError(f"unknown routing '{routing}' (choose from {', '.join(ROUTINGS)})")
        if routing == "explicit" and not named:
            raise MoAError("routing 'explicit' needs domains (or domain_ids)")
        if routing != "explicit" and named:
            raise MoAError(f"domains are only used with routing 'explicit', not '{routing}'")
        return routing

    def expert_ids_for(self, domains, domain_ids, B: int) -> Tensor:
        if domains is not None and domain_ids is not None:
            raise MoAError("give domains or domain_ids, not both")
        if domains is not None:
            if isinstance(domains, str):
                domains = [domains] * B
            if len(domains) != B:
                raise MoAError(f"{len(domains)} domains for a batch of {B} rows")
            ids = torch.tensor([-1 if d is None else self.domain_index(d) for d in domains], dtype=torch.long)
        else:
            ids = torch.as_tensor(domain_ids, dtype=torch.long).reshape(-1)
            if ids.shape[0] != B:
                raise MoAError(f"{ids.shape[0]} domain_ids for a batch of {B} rows")
            bad = ids[(ids < -1) | (ids >= self.num_experts)]
            if bad.numel():
                raise MoAError(f"domain id {int(bad[0])} out of range (-1 .. {self.num_experts - 1})")
        return ids.to(self.device)

    def domain_names(self, expert_ids: Tensor) -> list[str | None]:
        return [self._domains[e] if e >= 0 else None for e in expert_ids.tolist()]


    def generate(self, prompts, routing: str | None = None, domains=None, **kwargs) -> list[GenerationResult]:
        """Generate one completion per prompt (see `moa.generation.generate` for the arguments)."""
        from moa.generation import generate

        self._check_full("generate")
        return generate(self, prompts, routing=routing, domains=domains, **kwargs)


# --------------------------------------------------------------------------- helpers


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.to(device) for t in tensors)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (len == num_hidden_layers), e.g. `model.layers`."""
    n = model.config.get_text_config().num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise MoAError(f"cannot find the {n} decoder layers of {type(model).__name__}")
    found.sort(key=lambda nm: (not nm[0].endswith("layers"), nm[0].count(".")))
    return found[0][1]


def _inject(model: nn.Module, layers: nn.ModuleList, slots: list[RoutingSlot], target_modules: list[str],
            dropout: float) -> dict[str, MoLoRALinear]:
    """Replace every targeted nn.Linear of every decoder layer by a MoLoRALinear (in place)."""
    prefix = next(name for name, m in model.named_modules() if m is layers)
    out: dict[str, MoLoRALinear] = {}
    for i, layer in enumerate(layers):
        targets = [(name, m) for name, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
        for name, linear in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            wrapped = MoLoRALinear(linear, slots[i], dropout)
            setattr(parent, attr, wrapped)
            out[f"{prefix}.{i}.{name}"] = wrapped
    found = {p.rsplit(".", 1)[-1] for p in out}
    missing = [t for t in target_modules if t not in found]
    if missing:
        raise MoAError(f"target modules {missing} are not linear layers of the base model's decoder layers")
    return out


