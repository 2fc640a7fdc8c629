"""MoAModel: a frozen causal LM with one LoRA expert per domain and one router per layer.

    model = MoAModel.from_adapters(["lora/finance", "lora/medicine"])   # stage-1 PEFT LoRAs
    out = model(input_ids=..., attention_mask=..., domains=["finance", "medicine"])
    model.save_pretrained("moa-ckpt")
    results = MoAModel.from_pretrained("moa-ckpt").generate(["What is an ETF?"])

Every targeted linear module of every decoder layer becomes a `MoLoRALinear` holding all
experts; all modules of one layer share a `RoutingSlot` that the routing hooks
(`moa.router.routing_hooks`) fill before the layer runs. On disk (DESIGN.md section 3): a
`moa_config.json`, one standard PEFT LoRA adapter per domain under `experts/<domain>/`, and
`router.safetensors`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.base import DEFAULT_BASE, base_reference, base_signature, load_base, resolve_base
from moa.errors import MoAError
from moa.io import atomic_dir, atomic_write_json, load_tensors, save_tensors
from moa.layers import MoLoRALinear, RoutingSlot
from moa.router import LayerRouter, RoutingState, decide, layer_probs, router_loss, routing_hooks

FORMAT_VERSION = 1
ROUTINGS = ("explicit", "vote", "last", "layer")
IGNORE_INDEX = -100
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_DOMAIN = re.compile(r"\w[\w.+-]{0,99}")


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
    router_loss: Tensor | None = None
    """Mean over layers of CE(router logits, expert ids) (rows -1 ignored): explicit routing +
    return_router_logits. The stage-2 loss is `loss + model.eta * router_loss`."""
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    """(B, T, H) per layer input and the final normed output, when output_hidden_states=True."""


@dataclass
class GenerationResult:
    text: str
    """The completion, without the end-of-turn token and cut before any stop string."""
    domain: str | None
    router_probs: dict[str, float] | None
    """{domain: probability} of the routing decision; None for explicit routing."""
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens, the end-of-turn token included."""
    finish_reason: str
    """"stop" (end-of-turn token or stop string) or "length" (max_new_tokens reached)."""
    layer_probs: list[list[float]] | None = None
    """(L, E) every layer's router probabilities on the prompt (routed generation, or explicit
    with return_layer_probs); None when the routers did not run."""


@dataclass
class _Adapter:
    """A PEFT LoRA adapter read from disk."""

    where: str
    r: int
    alpha: float
    use_rslora: bool
    base: str | None
    """base_model_name_or_path as recorded, if any."""
    weights: dict[str, tuple[Tensor, Tensor]]
    """{module path in the base model: (A (r, in), B (out, r))}."""

    @property
    def target_modules(self) -> list[str]:
        return sorted({p.rsplit(".", 1)[-1] for p in self.weights})


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
    """

    def __init__(self, base_model: nn.Module, tokenizer, *, base: str, target_modules: Sequence[str],
                 eta: float = 1.0, lora_dropout: float = 0.0, routing_default: str = "vote",
                 provenance: dict | None = None, seed: int = 0) -> None:
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
        hidden = base_model.config.get_text_config().hidden_size
        self.routers = nn.ModuleList(LayerRouter(hidden) for _ in layers)
        forward_params = inspect.signature(base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._keep_last = "logits_to_keep" in forward_params  # generation needs the last position only
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
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def extra_repr(self) -> str:
        return f"domains={self._domains}, target_modules={self.target_modules}, eta={self.eta}"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_adapters(cls, adapter_dirs: Sequence[str | Path], domains: Sequence[str] | None = None,
                      base: str | Path | None = None, *, dtype: torch.dtype | None = None,
                      eta: float = 1.0, lora_dropout: float = 0.0, seed: int = 0) -> "MoAModel":
        """Assemble stage-1 PEFT LoRA adapters (one per domain) on their shared base.

        Domain names default to the adapter directory names. The adapters must target the same
        modules of the same base (`base` defaults to their recorded base_model_name_or_path).
        Routers start fresh (seeded small normal init).
        """
        dirs = [Path(d) for d in adapter_dirs]
        if not dirs:
            raise MoAError("from_adapters needs at least one adapter directory")
        names = [d.name for d in dirs] if domains is None else list(domains)
        if len(names) != len(dirs):
            raise MoAError(f"{len(dirs)} adapter directories but {len(names)} domain names")
        for name in names:
            _check_domain_name(name)
        if len(set(names)) != len(names):
            raise MoAError(f"duplicate domain names: {names}")
        adapters = [_read_adapter(d) for d in dirs]
        first = adapters[0]
        for a in adapters[1:]:
            if set(a.weights) != set(first.weights):
                raise MoAError(
                    f"adapters target different modules: {first.where} targets {first.target_modules} "
                    f"({len(first.weights)} modules), {a.where} targets {a.target_modules} ({len(a.weights)} modules); "
                    "every stage-1 expert must use the same target_modules (add others with add_expert)"
                )
        recorded = [a for a in adapters if a.base]
        for a in recorded[1:]:
            if not _same_base(a.base, recorded[0].base):
                raise MoAError(f"adapters were trained on different bases: {recorded[0].where} on "
                               f"{recorded[0].base}, {a.where} on {a.base}")
        if base is None:
            base = recorded[0].base if recorded else DEFAULT_BASE
        model, tok = load_base(base, dtype)
        moa = cls(model, tok, base=base_reference(base), target_modules=first.target_modules,
                  eta=eta, lora_dropout=lora_dropout, seed=seed)
        for name, adapter in zip(names, adapters):
            moa._check_fits(adapter)
            moa._append_expert(name, adapter)
        return moa

    @classmethod
    def from_pretrained(cls, moa_dir: str | Path, base: str | Path | None = None, *,
                        dtype: torch.dtype | None = None, lora_dropout: float = 0.0) -> "MoAModel":
        """Load a checkpoint written by `save_pretrained`; `base` overrides the recorded one."""
        moa_dir = Path(moa_dir)
        cfg = read_moa_config(moa_dir)
        base = base or cfg["base"]
        model, tok = load_base(base, dtype)
        recorded_sig = cfg.get("base_signature")
        if recorded_sig and base_signature(model.config) != recorded_sig:
            raise MoAError(f"base model {base} does not match the checkpoint's base: it is "
                           f"{base_signature(model.config)}, the checkpoint was built on {recorded_sig}")
        moa = cls(model, tok, base=base_reference(base), target_modules=cfg["target_modules"],
                  eta=cfg.get("eta", 1.0), lora_dropout=lora_dropout,
                  routing_default=cfg.get("routing_default", "vote"), provenance=cfg.get("provenance"))
        for name in cfg["domains"]:
            adapter = _read_adapter(moa_dir / "experts" / name)
            moa._check_fits(adapter)
            moa._append_expert(name, adapter)
        moa.load_router_state_dict(load_tensors(moa_dir / "router.safetensors"))
        return moa

    def save_pretrained(self, out_dir: str | Path, provenance: dict | None = None) -> Path:
        """Write the checkpoint atomically (moa_config.json, experts/<domain>/, router.safetensors)."""
        if provenance is not None:
            self.provenance = dict(provenance)
        cfg = {
            "format_version": FORMAT_VERSION,
            "base": self.base_ref,
            "base_signature": base_signature(self.base_model.config),
            "domains": self.domains,
            "target_modules": self.target_modules,
            "experts": {d: dict(self.experts[d]) for d in self._domains},
            "router": {"pooling": "masked_mean", "input": "layer_input", "num_layers": self.num_layers},
            "eta": self.eta,
            "routing_default": self.routing_default,
            "provenance": self.provenance,
        }
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            atomic_write_json(tmp / "moa_config.json", cfg)
            for d in self._domains:
                atomic_write_json(tmp / "experts" / d / "adapter_config.json", self._peft_config(d))
                save_tensors(tmp / "experts" / d / "adapter_model.safetensors", self.expert_state_dict(d))
            save_tensors(tmp / "router.safetensors", self.router_state_dict())
        return out_dir

    # ------------------------------------------------------------------ experts

    def add_expert(self, domain: str, adapter_dir: str | Path, *, check_base: bool = True) -> None:
        """Import a PEFT LoRA adapter as a new expert (any rank/alpha, any subset of the target
        modules). Every router grows one output row; existing experts and rows are unchanged."""
        _check_domain_name(domain)
        if domain in self.experts:
            raise MoAError(f"domain '{domain}' already has an expert (remove_expert it first)")
        adapter = _read_adapter(adapter_dir)
        if check_base and adapter.base and not _same_base(adapter.base, self.base_ref):
            raise MoAError(f"{adapter.where} was trained on base {adapter.base}, but this model's base is "
                           f"{self.base_ref} (pass check_base=False if they are the same model)")
        self._check_fits(adapter)
        self._append_expert(domain, adapter)

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
        backward recomputation (non-reentrant checkpoint with a context_fn)."""
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _checkpoint_contexts(self):
        """(forward context, recompute context) for torch.utils.checkpoint: the recomputation of a
        layer in backward sees the routing slots as they were in its forward."""
        return contextlib.nullcontext(), _slots_as(self.slots, [(s.choice, s.weights) for s in self.slots])

    def _check_checkpointing(self) -> None:
        """Checkpointing enabled on the base model directly (e.g. base_model.gradient_checkpointing_enable)
        would recompute layers without their routing: re-enable it with the routing replay."""
        for layer in self._layers:
            if getattr(layer, "gradient_checkpointing", False):
                func = getattr(layer, "_gradient_checkpointing_func", None)
                if getattr(func, "keywords", {}).get("context_fn") != self._checkpoint_contexts:
                    self.gradient_checkpointing_enable()
                return

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def routing(self, state: RoutingState):
        """Context manager: every `base_model` forward inside it is routed by `state`."""
        return routing_hooks(self._layers, self.routers, self.slots, state)

    def _check_fits(self, adapter: _Adapter) -> None:
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

    def _append_expert(self, domain: str, adapter: _Adapter) -> None:
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

    def _peft_config(self, domain: str) -> dict:
        info = self.experts[domain]
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_ref,
            "r": info["r"], "lora_alpha": info["alpha"], "target_modules": info["target_modules"],
            "lora_dropout": 0.0, "bias": "none", "use_rslora": bool(info.get("use_rslora", False)),
            "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
        }

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
        routing = self._resolve_routing(routing, domains, domain_ids)
        self._check_checkpointing()
        B, T = input_ids.shape
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

        probs, logits_per_layer, r_loss = None, None, None
        if routing == "explicit":
            expert_ids = self._expert_ids(domains, domain_ids, B)  # (B,)
            state = RoutingState("fixed", expert_ids, pool_mask if return_router_logits else None,
                                 run_routers=return_router_logits, detach_router_inputs=not router_loss_to_experts)
            out = self._run(state, base_kwargs)
            if return_router_logits:
                logits_per_layer = state.logits
                probs = decide(logits_per_layer, "vote")[1]
                if bool((expert_ids >= 0).any()):
                    r_loss = router_loss(logits_per_layer, expert_ids)
        elif routing == "layer":
            self._check_pool_mask(pool_mask)
            state = RoutingState("layer", pool_mask=pool_mask)
            out = self._run(state, base_kwargs)
            logits_per_layer, expert_ids = state.logits, state.decisions[-1]
            probs = decide(logits_per_layer, "layer")[1]
        else:  # vote / last: one expert per row, then exactly the explicit computation
            expert_ids, probs, logits_per_layer = self._route(input_ids, attention_mask, pool_mask,
                                                              kwargs.get("position_ids"), routing)
            out = self._run(RoutingState("fixed", expert_ids), base_kwargs)

        logits = out.logits  # (B, T, V)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return MoAOutput(
            logits=logits, expert_ids=expert_ids, domains=self._names(expert_ids), router_probs=probs,
            router_logits=logits_per_layer, loss=loss, router_loss=r_loss,
            past_key_values=_cache_of(out), hidden_states=getattr(out, "hidden_states", None),
        )

    def _run(self, state: RoutingState, base_kwargs: dict):
        with self.routing(state):
            return self.base_model(**base_kwargs)

    def _route(self, input_ids: Tensor, attention_mask: Tensor, pool_mask: Tensor, position_ids: Tensor | None,
               how: str) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Routing pass (layer mode) over the prompt only; stops once the last router has run.

        Returns (expert per row (B,), decision probs (B, E), per-layer logits [(B, E)] * L).
        """
        self._check_pool_mask(pool_mask)
        # Causality: the prompt's hidden states do not depend on later tokens, so cut them.
        T = int(pool_mask.any(0).nonzero().max()) + 1
        state = RoutingState("layer", pool_mask=pool_mask[:, :T], stop_after=self.num_layers - 1)
        kwargs = dict(input_ids=input_ids[:, :T], attention_mask=attention_mask[:, :T], use_cache=False)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, :T]
        with self.routing(state):
            self.base_model(**kwargs)
        expert_ids, probs = decide(state.logits, how)
        return expert_ids, probs, state.logits

    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None, routing: str = "vote",
              prompt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decide one expert per row from the prompt alone (the routing pass, no output computed).

        Args:
            input_ids / attention_mask: (B, T) prompts (either padding side).
            routing: "vote", "last" or "layer" (the last layer's choice).
            prompt_mask: (B, T) the tokens to pool over (default: attention_mask).
        Returns:
            (expert_ids (B,), probs (B, E) of the decision).
        """
        if routing not in ROUTINGS[1:]:
            raise MoAError(f"route needs routing vote, last or layer, got {routing!r}")
        self._resolve_routing(routing, None, None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pool_mask = (prompt_mask if prompt_mask is not None else attention_mask).bool()  # (B, T)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        expert_ids, probs, _ = self._route(input_ids, attention_mask, pool_mask, position_ids, routing)
        return expert_ids, probs

    def _resolve_routing(self, routing: str | None, domains, domain_ids) -> str:
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

    def _expert_ids(self, domains, domain_ids, B: int) -> Tensor:
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

    def _names(self, expert_ids: Tensor) -> list[str | None]:
        return [self._domains[e] if e >= 0 else None for e in expert_ids.tolist()]

    @staticmethod
    def _check_pool_mask(pool_mask: Tensor) -> None:
        empty = (~pool_mask.any(1)).nonzero()
        if empty.numel():
            raise MoAError(f"row {int(empty[0])} has no prompt token for the routers to read")

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()  # lighter than no_grad on every op of every decoded token
    def generate(
        self,
        prompts: Sequence[str | list[dict]] | str,
        routing: str | None = None,
        domains: Sequence[str] | str | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        return_layer_probs: bool = False,
    ) -> list[GenerationResult]:
        """Generate one completion per prompt with the KV cache.

        Each prompt (one user turn as a string, or a list of chat messages) is rendered with the
        chat template. The expert of each row is decided once on its prompt (routing as in
        `forward`: default explicit if domains are given, else the model's routing_default)
        and kept for every generated token; one batch may mix experts. With explicit routing a
        domain of None runs that row on the base model alone.

        return_layer_probs: explicit routing also runs the routers on the prompts (a routing
            pass that does not change the completions) to report what they would have chosen in
            `layer_probs`; routed generation always reports them.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        if max_new_tokens < 1:
            raise MoAError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and (temperature < 0 or not 0 < top_p <= 1):
            raise MoAError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        routing = self._resolve_routing(routing, domains, None)
        input_ids, attention_mask = self._encode_prompts(prompts)  # (B, T) left padded
        B = input_ids.shape[0]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        probs, first, per_layer = None, None, None
        if routing == "explicit":
            per_row = self._expert_ids(domains, None, B)  # (B,)
            fixed = per_row
            if return_layer_probs:
                per_layer = self._route(input_ids, attention_mask, attention_mask.bool(), position_ids, "vote")[2]
        else:
            # One prefill routes (every layer's router reads the prompt, each layer uses its own
            # top-1) and fills the KV cache. Where every layer chose the row's final expert, as
            # trained routers nearly always do, it is exactly the prefill of that decision and
            # decoding continues from it; otherwise the prompt is run again with the decision.
            self._check_pool_mask(attention_mask.bool())
            state = RoutingState("layer", pool_mask=attention_mask.bool())
            with self.routing(state):
                out = self.base_model(**self._step_kwargs(input_ids, attention_mask, position_ids, None))
            per_row, probs = decide(state.logits, routing)
            per_layer = state.logits
            layer_choice = torch.stack(state.decisions)  # (L, B): each layer's own choice
            # layer: each layer keeps its own router's choice on the prompt
            fixed = layer_choice if routing == "layer" else per_row
            if routing == "layer" or bool((layer_choice == per_row).all()):
                first = (out.logits[:, -1], _cache_of(out))
        tokens, lengths, stopped = self._decode(input_ids, attention_mask, position_ids, fixed, max_new_tokens,
                                                do_sample, temperature, top_p, seed, stops, first)
        names = self._names(per_row)
        prompt_lens = attention_mask.sum(1).tolist()
        by_row = None if per_layer is None else layer_probs(per_layer).transpose(0, 1).tolist()  # (B, L, E)
        results = []
        for i in range(B):
            n = lengths[i]
            row = tokens[i, :n].tolist()
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            reason = "stop" if stopped[i] else "length"
            for s in stops:
                cut = text.find(s)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
            results.append(GenerationResult(
                text=text, domain=names[i],
                router_probs=None if probs is None else dict(zip(self._domains, probs[i].tolist())),
                prompt_tokens=int(prompt_lens[i]), completion_tokens=n, finish_reason=reason,
                layer_probs=None if by_row is None else by_row[i],
            ))
        return results

    def _encode_prompts(self, prompts) -> tuple[Tensor, Tensor]:
        """Render with the chat template and left-pad: (input_ids (B, T), attention_mask (B, T))."""
        rows = []
        for i, p in enumerate(prompts):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if not messages or not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in messages):
                raise MoAError(f"prompt {i} is empty")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        pad = self._pad_id()
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, T - len(r):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _eos_ids(self) -> Tensor:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.base_model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long, device=self.device)

    def _step_kwargs(self, input_ids: Tensor, mask: Tensor, position_ids: Tensor, cache) -> dict:
        """Base-model arguments of one generation step: logits of the last position only."""
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[self._cache_kw] = cache
        return kwargs

    def _decode(self, input_ids, attention_mask, position_ids, fixed, max_new_tokens, do_sample, temperature,
                top_p, seed, stops, first=None) -> tuple[Tensor, list[int], list[bool]]:
        """Token-by-token decoding with the experts fixed per row (and per layer for `layer`).

        `first`: (last-position logits (B, V), KV cache) of a prefill already run with exactly
        these experts, or None to run it here.
        Returns (tokens (B, N), completion length per row, whether each row stopped early).
        """
        B = input_ids.shape[0]
        eos, pad = self._eos_ids(), self._pad_id()
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)  # (B,)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=self.device)  # (B,)
        out_tokens: list[Tensor] = []
        step_ids, step_pos, mask, cache = input_ids, position_ids, attention_mask, None
        with self.routing(RoutingState("fixed", fixed)):
            for step in range(max_new_tokens):
                if step == 0 and first is not None:
                    last_logits, cache = first
                else:
                    out = self.base_model(**self._step_kwargs(step_ids, mask, step_pos, cache))
                    last_logits, cache = out.logits[:, -1], _cache_of(out)  # (B, V)
                nxt = _next_token(last_logits, do_sample, temperature, top_p, generator)  # (B,)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # (B,)
                out_tokens.append(nxt)
                done = ~finished & torch.isin(nxt, eos)  # (B,)
                if stops:
                    done |= self._hit_stop(torch.stack(out_tokens, 1), finished | done, stops)
                lengths = torch.where(done, step + 1, lengths)
                finished |= done
                if bool(finished.all()):
                    break
                step_ids = nxt[:, None]  # (B, 1)
                step_pos = step_pos[:, -1:] + 1  # (B, 1)
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, T + step + 1)
        return torch.stack(out_tokens, 1), lengths.tolist(), finished.tolist()

    def _hit_stop(self, tokens: Tensor, skip: Tensor, stops: list[str]) -> Tensor:
        """(B,) bool: rows (not in `skip`) whose completion so far contains a stop string."""
        hit = torch.zeros_like(skip)
        for i in (~skip).nonzero().squeeze(1).tolist():
            text = self.tokenizer.decode(tokens[i].tolist(), skip_special_tokens=True)
            hit[i] = any(s in text for s in stops)
        return hit


# --------------------------------------------------------------------------- helpers


def read_moa_config(moa_dir: str | Path) -> dict:
    """The checkpoint's moa_config.json, checked for presence, JSON and format version."""
    cfg_path = Path(moa_dir) / "moa_config.json"
    if not cfg_path.is_file():
        raise MoAError(f"{moa_dir} is not a MoA checkpoint (no moa_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MoAError(f"{cfg_path}: invalid JSON ({e.msg})") from None
    if cfg.get("format_version") != FORMAT_VERSION:
        raise MoAError(f"{cfg_path}: unsupported format_version {cfg.get('format_version')!r} "
                       f"(this moa reads {FORMAT_VERSION})")
    return cfg


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) predicting labels (B, T) shifted by one (-100 ignored)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


@contextlib.contextmanager
def _slots_as(slots: list[RoutingSlot], snapshot: list[tuple]) -> Iterator[None]:
    """Temporarily put the slots back in a recorded state (choice, weights)."""
    saved = [(s.choice, s.weights) for s in slots]
    try:
        for s, (choice, weights) in zip(slots, snapshot):
            s.choice, s.weights = choice, weights
        yield
    finally:
        for s, (choice, weights) in zip(slots, saved):
            s.choice, s.weights = choice, weights


def _cache_of(output) -> Any:
    """The KV cache of a transformers output (`cache` in recent versions, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """logits: (B, V) -> next token (B,): greedy, or sampled with temperature and nucleus top_p."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    # float64, and the maximum shifted to 0 first: a tiny temperature (down to the smallest float)
    # then sends the others to -inf (greedy in the limit) instead of overflowing every logit to
    # inf, or turning into 0 in float32, and the softmax into NaN.
    logits = logits.double()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature  # (B, V)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
        p = sorted_logits.softmax(-1)  # (B, V)
        drop = p.cumsum(-1) - p > top_p  # (B, V): the mass before this token already covers top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)  # (B, V)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)


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


def _check_domain_name(name: str) -> None:
    if not isinstance(name, str) or not _DOMAIN.fullmatch(name):
        raise MoAError(f"invalid domain name {name!r}: use letters, digits, '_', '-', '.', '+' "
                       "(it becomes a directory name), at most 100 characters")


# adapter_config.json fields that change what a LoRA computes or stores; MoA needs them unset.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "layers_to_transform", "layer_replication",
                "modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices", "target_parameters")


def _read_adapter(adapter_dir: str | Path) -> _Adapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    d = Path(adapter_dir)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise MoAError(f"{d} is not a PEFT adapter directory (no adapter_config.json)")
    if not weights_path.is_file():
        hint = " (only safetensors is read, never pickle)" if (d / "adapter_model.bin").exists() else ""
        raise MoAError(f"{d}: missing adapter_model.safetensors{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MoAError(f"{cfg_path}: invalid JSON ({e.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MoAError(f"{d}: peft_type {cfg.get('peft_type')} is not LORA")
    for key in _UNSUPPORTED:
        if cfg.get(key) not in (None, False, [], {}):
            raise MoAError(f"{d}: adapter_config.json sets {key}={cfg[key]!r}, which MoA does not support")
    if cfg.get("bias", "none") != "none":
        raise MoAError(f"{d}: adapter_config.json sets bias={cfg['bias']!r}; MoA supports bias 'none' only")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise MoAError(f"{cfg_path}: needs integer r >= 1 and numeric lora_alpha (got r={r!r}, lora_alpha={alpha!r})")
    halves: dict[str, dict[str, Tensor]] = {}
    for key, t in load_tensors(weights_path).items():
        m = _KEY.match(key)
        if m is None:
            raise MoAError(f"{weights_path}: unsupported tensor {key} (MoA imports LoRA A/B weights of linear layers)")
        halves.setdefault(m["path"], {})[m["ab"]] = t
    weights = {}
    for path, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise MoAError(f"{weights_path}: {path} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if ab["A"].shape[0] != r or ab["B"].shape[-1] != r:
            raise MoAError(f"{weights_path}: {path} has rank {ab['A'].shape[0]}, adapter_config.json says r={r}")
        weights[path] = (ab["A"], ab["B"])
    if not weights:
        raise MoAError(f"{weights_path}: no LoRA weights")
    return _Adapter(str(d), r, float(alpha) if not float(alpha).is_integer() else int(alpha),
                    bool(cfg.get("use_rslora", False)), cfg.get("base_model_name_or_path"), weights)


def _same_base(a: str, b: str) -> bool:
    """Whether two base references name the same checkpoint (same string or same directory)."""
    if str(a) == str(b):
        return True
    try:
        return resolve_base(a) == resolve_base(b)
    except MoAError:
        # One of them cannot be found here (moved or deleted): only the shape checks can tell.
        return True
