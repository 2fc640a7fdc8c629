"""Routed generation with the KV cache: `generate(model, prompts, ...)` (also `MoAModel.generate`).

The expert of each row is decided once on its prompt (or named by the caller) and kept for every
generated token; one batch may mix experts. Decoding is token by token with the experts fixed
per row (per layer for `layer` routing), so the routers never run on a generated token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from moa.errors import MoAError
from moa.layers import ExpertChoice
from moa.router import RoutingState, check_pool_mask, decide, layer_probs


@dataclass
class GenerationResult:
    text: str
    """The completion, without the end-of-turn token and cut before any stop string."""
    domain: str | None
    """The expert that answered; None: the base model (named so, or sent there by the fallback)."""
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


@torch.inference_mode()  # lighter than no_grad on every op of every decoded token
def generate(
    model,
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
    ignore_eos: bool = False,
    min_tokens: int = 0,
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
    ignore_eos: keep generating after the end-of-turn token, up to max_new_tokens (benchmarks).
    min_tokens: the end-of-turn token cannot come (nor a stop string end the text) before this many
        tokens.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise MoAError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min_tokens < 0:
        raise MoAError(f"min_tokens must be >= 0, got {min_tokens}")
    if do_sample and (temperature < 0 or not 0 < top_p <= 1):
        raise MoAError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    routing = model.resolve_routing(routing, domains, None)
    input_ids, attention_mask = encode_prompts(model, prompts)  # (B, T) left padded
    B = input_ids.shape[0]
    pre = prefill(model, input_ids, attention_mask, routing, domains, return_layer_probs)
    per_row, probs, per_layer = pre.per_row, pre.probs, pre.per_layer
    order = expert_order(pre.experts)
    if order is None:
        tokens, lengths, stopped = _decode(model, input_ids, attention_mask, pre.position_ids, pre.experts,
                                           max_new_tokens, do_sample, temperature, top_p, seed, stops,
                                           (pre.logits, pre.cache), ignore_eos, min_tokens)
    else:  # decode with the rows in blocks of one expert, then put them back in the prompts' order
        pre.cache.reorder_cache(order)
        tokens, lengths, stopped = _decode(model, input_ids[order], attention_mask[order], pre.position_ids[order],
                                           pre.experts[order], max_new_tokens, do_sample, temperature, top_p,
                                           seed, stops, (pre.logits[order], pre.cache), ignore_eos, min_tokens)
        back = torch.argsort(order)  # (B,)
        tokens, lengths, stopped = tokens[back], [lengths[i] for i in back.tolist()], [stopped[i] for i in back.tolist()]
    names = model.domain_names(per_row)
    prompt_lens = attention_mask.sum(1).tolist()
    by_row = None if per_layer is None else layer_probs(per_layer).transpose(0, 1).tolist()  # (B, L, E)
    results = []
    for i in range(B):
        n = lengths[i]
        row = tokens[i, :n].tolist()
        text = model.tokenizer.decode(row, skip_special_tokens=True)
        reason = "stop" if stopped[i] else "length"
        for s in stops:
            cut = text.find(s)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        results.append(GenerationResult(
            text=text, domain=names[i],
            router_probs=None if probs is None else dict(zip(model._domains, probs[i].tolist())),
            prompt_tokens=int(prompt_lens[i]), completion_tokens=n, finish_reason=reason,
            layer_probs=None if by_row is None else by_row[i],
        ))
    return results


@dataclass
class Prefill:
    """A prompt batch run through the model once, its experts decided (B rows, T prompt tokens)."""

    logits: Tensor
    """(B, V) logits of the last prompt position: the first generated token comes from them."""
    cache: Any
    """The KV cache of the prompts, computed with exactly `experts`."""
    position_ids: Tensor
    """(B, T) positions of the prompt tokens (left padding does not shift them)."""
    experts: Tensor
    """(B,) one expert per row (-1: base only), or (L, B) one per layer (`layer` routing)."""
    per_row: Tensor
    """(B,) the expert reported per row (`layer`: the last layer's)."""
    probs: Tensor | None
    """(B, E) probabilities of the routing decision; None for explicit routing."""
    per_layer: list[Tensor] | None
    """Per layer (B, E) router logits on the prompt, when the routers ran."""


@torch.inference_mode()
def prefill(model, input_ids: Tensor, attention_mask: Tensor, routing: str, domains=None,
            return_layer_probs: bool = False) -> Prefill:
    """Decide each row's expert on its prompt and fill the KV cache with that decision.

    input_ids / attention_mask: (B, T) left padded (as `encode_prompts` gives them).
    routing: "explicit" (domains name each row's expert, None = base) or vote/last/layer; under
        vote / last the model's fallback may send a row to the base model (expert -1, domain None).
    """
    B = input_ids.shape[0]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    probs, per_layer = None, None
    if routing == "explicit":
        per_row = experts = model.expert_ids_for(domains, None, B)  # (B,)
        if return_layer_probs:
            # every layer's probabilities, as routed requests report them, whatever route_layers is
            per_layer = model._route(input_ids, attention_mask, attention_mask.bool(), position_ids, "vote",
                                     model.num_layers)[2]
    else:
        # One prefill routes (every layer's router reads the prompt, each layer uses its own
        # top-1) and fills the KV cache. A row whose every layer chose its final expert was
        # computed exactly as the prefill of that decision, and decoding continues from it; the
        # other rows (often a weak first-layer router's) run again with their decision, alone.
        check_pool_mask(attention_mask.bool())
        fallback = getattr(model, "fallback", None)
        pool_at = fallback.pool_layers if fallback is not None and routing != "layer" else ()
        state = RoutingState("layer", pool_mask=attention_mask.bool(), pool_at=pool_at)
        with model.routing(state):
            out = model.base_model(**_step_kwargs(model, input_ids, attention_mask, position_ids, None))
        # vote / last: from the first route_layers routers, as the early-exit routing pass decides; a
        # row the fallback sends to the base model (-1) differs from every layer's choice: run again
        per_row, probs = (decide(state.logits, routing) if routing == "layer"
                          else model.decide(state.logits, routing, state.pooled))
        per_layer = state.logits
        layer_choice = torch.stack(state.decisions)  # (L, B): each layer's own choice
        # layer: each layer keeps its own router's choice on the prompt
        experts = layer_choice if routing == "layer" else per_row
        redo = None if routing == "layer" else (layer_choice != per_row).any(0).nonzero().squeeze(1)  # (B',)
        if redo is None or redo.numel() == 0:
            return Prefill(out.logits[:, -1], cache_of(out), position_ids, experts, per_row, probs, per_layer)
        if redo.numel() < B:
            logits, cache = out.logits[:, -1], cache_of(out)  # (B, V)
            with model.routing(RoutingState("explicit", experts[redo])):
                again = model.base_model(**_step_kwargs(model, input_ids[redo], attention_mask[redo],
                                                        position_ids[redo], None))
            if _splice_rows(cache, redo, cache_of(again)):
                logits[redo] = again.logits[:, -1]
                return Prefill(logits, cache, position_ids, experts, per_row, probs, per_layer)
    with model.routing(RoutingState("explicit", experts)):
        out = model.base_model(**_step_kwargs(model, input_ids, attention_mask, position_ids, None))
    return Prefill(out.logits[:, -1], cache_of(out), position_ids, experts, per_row, probs, per_layer)


def _splice_rows(cache, rows: Tensor, part) -> bool:
    """Write the KV cache `part` of a prefill of rows `rows` (B',) of a batch into the batch's `cache`
    (same prompt length), in place. False, with nothing changed, when either cache is not a per-layer
    key/value cache this can splice (then the caller runs the whole batch again)."""
    layers, parts = getattr(cache, "layers", None), getattr(part, "layers", None)
    if not layers or parts is None or len(layers) != len(parts):
        return False
    pairs = []
    for layer, new in zip(layers, parts):
        if type(layer) is not type(new):
            return False
        for name in ("keys", "values"):
            old_t, new_t = getattr(layer, name, None), getattr(new, name, None)
            if not (isinstance(old_t, Tensor) and isinstance(new_t, Tensor) and old_t.dim() == new_t.dim() >= 2
                    and new_t.shape[0] == rows.numel() and old_t.shape[1:] == new_t.shape[1:]):
                return False
            pairs.append((old_t, new_t))
    for old_t, new_t in pairs:
        old_t.index_copy_(0, rows, new_t)
    return True


def expert_order(experts: Tensor) -> Tensor | None:
    """(B,) a row order that puts rows of one expert in equal blocks, or None if there is none
    better than the given order.

    Rows in equal blocks of one expert each (`ExpertChoice.groups`, e.g. 0,0,1,1,2,2) run every
    LoRA matmul once per block instead of once per row, so each expert's weights are read once
    per step: decoding 8 rows on 4 experts in blocks of 2 reads 4 experts' weights, not 8 rows'
    gathered copies. None for per-layer experts (L, B), one expert, base-only rows, rows already
    in blocks, or expert counts with no common block size (then every order gathers per row).
    """
    if experts.ndim != 1:
        return None
    choice = ExpertChoice.of(experts)
    if choice.single is not None or choice.rows is not None or choice.groups is not None:
        return None
    order = torch.sort(experts, stable=True).indices  # (B,)
    return order if ExpertChoice.of(experts[order]).groups is not None else None


def encode_prompts(model, prompts) -> tuple[Tensor, Tensor]:
    """Render with the chat template and left-pad: (input_ids (B, T), attention_mask (B, T))."""
    rows = []
    for i, p in enumerate(prompts):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if not messages or not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in messages):
            raise MoAError(f"prompt {i} is empty")
        text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    pad = _pad_id(model)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r):] = 1
    return input_ids.to(model.device), attention_mask.to(model.device)


def _pad_id(model) -> int:
    tok = model.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _eos_ids(model) -> Tensor:
    ids = {model.tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model.base_model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long, device=model.device)


def _step_kwargs(model, input_ids: Tensor, mask: Tensor, position_ids: Tensor, cache) -> dict:
    """Base-model arguments of one generation step: logits of the last position only."""
    kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "use_cache": True}
    if model._keep_last:
        kwargs["logits_to_keep"] = 1
    if cache is not None:
        kwargs[model._cache_kw] = cache
    return kwargs


def _decode(model, input_ids, attention_mask, position_ids, fixed, max_new_tokens, do_sample, temperature,
            top_p, seed, stops, first=None, ignore_eos=False, min_tokens=0) -> tuple[Tensor, list[int], list[bool]]:
    """Token-by-token decoding with the experts fixed per row (and per layer for `layer`).

    `first`: (last-position logits (B, V), KV cache) of a prefill already run with exactly
    these experts, or None to run it here.
    Returns (tokens (B, N), completion length per row, whether each row stopped early).
    """
    B = input_ids.shape[0]
    eos, pad = _eos_ids(model), _pad_id(model)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)  # (B,)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=model.device)  # (B,)
    out_tokens: list[Tensor] = []
    step_ids, step_pos, mask, cache = input_ids, position_ids, attention_mask, None
    with model.routing(RoutingState("explicit", fixed)):
        for step in range(max_new_tokens):
            if step == 0 and first is not None:
                last_logits, cache = first
            else:
                out = model.base_model(**_step_kwargs(model, step_ids, mask, step_pos, cache))
                last_logits, cache = out.logits[:, -1], cache_of(out)  # (B, V)
            if step < min_tokens:
                last_logits = last_logits.index_fill(-1, eos, float("-inf"))  # (B, V)
            nxt = _next_token(last_logits, do_sample, temperature, top_p, generator)  # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # (B,)
            out_tokens.append(nxt)
            done = ~finished & torch.isin(nxt, eos) & (not ignore_eos)  # (B,)
            if stops and step + 1 >= min_tokens:
                done |= _hit_stop(model, torch.stack(out_tokens, 1), finished | done, stops)
            lengths = torch.where(done, step + 1, lengths)
            finished |= done
            if bool(finished.all()):
                break
            step_ids = nxt[:, None]  # (B, 1)
            step_pos = step_pos[:, -1:] + 1  # (B, 1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, T + step + 1)
    return torch.stack(out_tokens, 1), lengths.tolist(), finished.tolist()


def _hit_stop(model, tokens: Tensor, skip: Tensor, stops: list[str]) -> Tensor:
    """(B,) bool: rows (not in `skip`) whose completion so far contains a stop string."""
    hit = torch.zeros_like(skip)
    for i in (~skip).nonzero().squeeze(1).tolist():
        text = model.tokenizer.decode(tokens[i].tolist(), skip_special_tokens=True)
        hit[i] = any(s in text for s in stops)
    return hit


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


def cache_of(output) -> Any:
    """The KV cache of a transformers output (`cache` in recent versions, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
