"""`moa score`: log-likelihood of each record's response under a base model, a PEFT adapter,
or an MoA checkpoint (with routing), plus per-domain perplexity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from moa.data import Example, collate
from moa.errors import MoAError
from moa.losses import label_nll, per_row_sums


def response_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) of every position and which positions are label tokens (from `label_nll`).

    logits (B,T,V), labels (B,T) -> (B, T-1) float32 log-probabilities (0 off the labels), (B, T-1) bool.
    """
    nll, keep = label_nll(labels, logits=logits)  # (N,), (B, T-1)
    picked = torch.zeros(keep.shape, dtype=torch.float32, device=nll.device)
    picked[keep] = -nll
    return picked, keep


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label) over label tokens and their count.

    logits (B,T,V), labels (B,T) -> (B,) float64 sums, (B,) long counts.
    """
    nll, keep = label_nll(labels, logits=logits)
    return -per_row_sums(nll, keep), keep.sum(-1)


def causal_lm_forward(model, lm: "PrefixKV | None" = None) -> Callable[[dict], tuple[torch.Tensor, list[dict]]]:
    """Forward fn for a transformers CausalLM / PeftModel: returns (logits, per-row extras); the
    logits of the last `batch["logits_to_keep"]` positions only, where the model can, and after
    the `batch["prefix_len"]` tokens every row starts with only (`PrefixKV`: `lm`, to share one
    with the model's generation)."""

    lm = lm or PrefixKV(model)

    def fwd(batch):
        logits = lm.logits(batch["input_ids"], batch["attention_mask"], batch.get("logits_to_keep", 0),
                           batch.get("prefix_len", 0))
        return logits, [{} for _ in range(batch["input_ids"].size(0))]

    return fwd


class PrefixKV:
    """A transformers CausalLM (or a PeftModel around one) scoring batches whose rows all start with
    the same tokens, such as a chat template's system text (SmolLM2's is 24 tokens, a quarter of
    the demo's test tokens): the KV cache of that prefix is computed once and copied into each
    batch, which then runs only the positions after it. The logits are those of the whole rows
    up to float rounding (the prefix's keys and values do not depend on what follows them).

    The cache is kept for one prefix and one state of the weights: any in-place change of a
    parameter (a PEFT merge, say) or another `state` (e.g. the active adapter's name) computes
    it again. A model whose forward takes no cache runs whole rows, and so does one with bf16 or
    fp16 weights: there the prefix's keys and values from a forward of their own round
    differently from the batch's (SmolLM2-135M in bf16: mean |logit error| against float32 0.141
    with the prefix cached, 0.118 without, and PPL moved by about 1%), while whole rows score the
    same at any batch size.
    """

    def __init__(self, model) -> None:
        import inspect

        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self.keeps = accepts_logits_to_keep(model)
        exact = all(p.dtype == torch.float32 for p in model.parameters())  # see the class docstring
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None) if exact else None
        self._key = self._cache = None

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0, prefix_len: int = 0,
               state=None) -> torch.Tensor:
        """(B, T', V): the logits of the last T' positions of input_ids (B, T): the last `keep` when
        keep > 0 and the model can trim, else those after the first `prefix_len` tokens (which
        every row must share), else all T."""
        model = self.model
        device = next(model.parameters()).device
        ids, mask = input_ids.to(device), attention_mask.to(device)
        kw = {"logits_to_keep": keep} if self.keeps and keep else {}
        P = prefix_len
        shared = P and self.cache_kw and P < ids.shape[1] and bool((ids[:, :P] == ids[:1, :P]).all())
        cache = self.batch_cache(ids[0, :P], ids.shape[0], state) if shared else None
        if cache is None:
            return model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        positions = torch.arange(P, ids.shape[1], device=device)[None].expand(ids.shape[0], -1)  # (B, T - P)
        return model(input_ids=ids[:, P:], attention_mask=mask, position_ids=positions, use_cache=True,
                     **{self.cache_kw: cache}, **kw).logits

    def batch_cache(self, prefix: torch.Tensor, rows: int, state=None):
        """A new KV cache of `rows` rows holding the prefix (P,) (on the model's device): a batch's
        forward appends to it, so each batch gets its own copy of the one computed. None for a
        cache that cannot be copied into rows (not a transformers `Cache`)."""
        import copy

        from moa.generation import cache_of

        from moa.layers import _versions

        key = (tuple(prefix.tolist()), state, _versions(tuple(self.model.parameters())))
        if self._key != key:
            self._key = None
            with torch.no_grad():
                self._cache = cache_of(self.model(input_ids=prefix[None], use_cache=True))
            self._key = key
        if not hasattr(self._cache, "batch_repeat_interleave"):
            return None
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(rows)
        return cache


def common_prefix(examples: Sequence[Example]) -> int:
    """How many first tokens every example shares, short of the last token of every prompt (the
    positions from there on predict the labels and are computed per row); 0 for fewer than 2."""
    return shared_start([e.input_ids for e in examples], min((e.prompt_len for e in examples), default=0) - 1)


def shared_start(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """The length of the longest start every sequence shares, at most `limit`; 0 for fewer than 2."""
    if len(seqs) < 2 or limit <= 0:
        return 0
    first, n = seqs[0], min(limit, len(seqs[0]))
    for ids in seqs[1:]:
        k = 0
        while k < n and k < len(ids) and ids[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def accepts_logits_to_keep(model) -> bool:
    """Whether a transformers CausalLM (or a PeftModel around one) computes the logits of only the
    last N positions when asked (`logits_to_keep`)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions of a batch need logits: from the one before its first label token
    (that position predicts it) to the end; 0 (all of them) when there is nothing to cut. The
    prompt before it (often most of a record: the chat template's system text, the question) then
    never goes through the LM head. labels: (B, T), IGNORE_INDEX off the labels."""
    from moa.data import IGNORE_INDEX

    has = labels != IGNORE_INDEX  # (B, T)
    if not bool(has.any()):
        return 0
    first = int(has.any(0).nonzero()[0])  # the earliest label position of any row
    return labels.shape[1] - first + 1 if first >= 2 else 0


@torch.no_grad()
def score_examples(
    forward: Callable[[dict], tuple[torch.Tensor, list[dict]]],
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "score",
    trim_prompt: bool = True,
    by_domain: bool = False,
) -> list[dict]:
    """Score every example; rows are batched by length. Returns one dict per example, in order:
    {"index", "domain", "logprob", "tokens", **extras}.

    trim_prompt: ask the forward (batch["logits_to_keep"], see `logits_to_keep`) for the logits
    of the positions that predict a label and after only; a forward may ignore it.
    by_domain: batch domain by domain (by length within each), for a forward that runs one domain
    at a time.
    Every batch also says how many first tokens all the examples share (batch["prefix_len"],
    `common_prefix`): a forward may compute them once for all batches (`PrefixKV`) or ignore it."""
    from tqdm.auto import tqdm

    if by_domain:
        order = sorted(range(len(examples)), key=lambda i: (examples[i].domain, len(examples[i].input_ids)))
    else:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    results: list[dict | None] = [None] * len(examples)
    prefix_len = common_prefix(examples)
    with tqdm(total=len(examples), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate([examples[i] for i in idx], pad_id, padding_side="right")
            batch["domain_names"] = [examples[i].domain for i in idx]
            batch["prefix_len"] = prefix_len
            if trim_prompt:
                batch["logits_to_keep"] = logits_to_keep(batch["labels"])
            logits, extras = forward(batch)  # (B, T', V): a forward may give the last T' <= T positions only
            labels = batch["labels"][:, batch["labels"].shape[1] - logits.shape[1]:]
            lp, n = token_logprobs(logits, labels.to(logits.device))
            for k, i in enumerate(idx):
                results[i] = {"index": examples[i].index, "domain": examples[i].domain,
                              "logprob": float(lp[k]), "tokens": int(n[k]), **extras[k]}
            bar.update(len(idx))
    return results  # type: ignore[return-value]


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """Per-domain perplexity over response tokens: exp(-sum logprob / sum tokens)."""
    agg: dict[str, list[float]] = {}
    for r in rows:
        a = agg.setdefault(r["domain"], [0.0, 0])
        a[0] += r["logprob"]
        a[1] += r["tokens"]
    return {d: {"ppl": math.exp(-lp / max(1, n)), "tokens": n} for d, (lp, n) in agg.items()}


def load_peft_adapter(model, adapter_dir):
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise MoAError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        m = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as e:
        raise MoAError(f"adapter {path} does not fit the base model: {str(e).splitlines()[0]}") from e
    m.eval()
    return m


def moa_forward(moa, routing: str, base=None, fallback: str | float | None = None):
    """Forward fn for an MoA checkpoint (a directory or a loaded MoAModel); extras per row:
    domain_routed (None: the fallback chose the base model) and router_probs. fallback:
    `--fallback` off|auto|P (None: leave the model's as it is)."""
    from moa.fallback import set_fallback
    from moa.model import MoAModel

    model = moa if isinstance(moa, MoAModel) else MoAModel.from_pretrained(moa, base=base)
    if fallback is not None:
        set_fallback(model, fallback)
    model.eval()
    index = {d: k for k, d in enumerate(model.domains)}

    def fwd(batch):
        kw = {}
        if routing == "explicit":
            if "domain_names" not in batch:
                raise MoAError("--routing explicit needs each record's domain")
            kw["domains"] = batch["domain_names"]
        if batch.get("logits_to_keep") and model._keep_last:
            kw["logits_to_keep"] = batch["logits_to_keep"]
        with torch.no_grad():
            if routing in ("vote", "last") and getattr(model, "fallback", None) is None:
                # (with a fallback in force, the routed forward below: the fallback reads pooled
                # states the one-pass decision does not keep)
                logits, expert_ids, probs_all = _routed_in_one_pass(model, batch, routing,
                                                                    kw.get("logits_to_keep", 0))
                names = model.domain_names(expert_ids)
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            prompt_mask=batch["prompt_mask"], routing=routing, **kw)
                logits, names, probs_all = out.logits, out.domains, out.router_probs
        extras = []
        for i, d in enumerate(names):
            probs = None
            if probs_all is not None:
                probs = {dom: round(float(probs_all[i, k]), 6) for dom, k in index.items()}
            extras.append({"domain_routed": d, "router_probs": probs})
        return logits, extras

    return fwd, model.tokenizer


def _routed_in_one_pass(model, batch: dict, routing: str,
                        keep: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vote / last routing and the logits of that decision, mostly in one forward instead of two.

    One `layer`-routed forward runs every router on the prompt and each layer with its own top-1.
    A row whose layers all chose the row's final decision was computed exactly as the decision
    computes it (as `moa.generation.prefill` relies on), so its logits are kept; only the other
    rows run again with their decision. Trained routers agree in nearly every row, so scoring pays
    one pass instead of a routing pass plus a pass. Returns (logits (B, T, V), or of the last `keep`
    positions when keep > 0, expert per row (B,), probs (B, E) of the decision).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = {"logits_to_keep": keep} if keep else {}
    out = model(input_ids=ids, attention_mask=mask, prompt_mask=batch["prompt_mask"], routing="layer", **kw)
    decided, probs = model.decide(out.router_logits, routing)  # (B,), (B, E)
    per_layer = torch.stack([lg.argmax(-1) for lg in out.router_logits])  # (L, B)
    logits = out.logits  # (B, T, V)
    redo = (per_layer != decided).any(0).nonzero().squeeze(1).cpu()  # (B',)
    if redo.numel():
        again = model(input_ids=ids[redo], attention_mask=mask[redo], domain_ids=decided[redo].cpu(), **kw)
        logits[redo.to(logits.device)] = again.logits
    return logits, decided, probs
