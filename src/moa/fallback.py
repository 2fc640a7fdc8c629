"""Out-of-domain fallback: a prompt far from every domain goes to the base model, with no expert.

The routers always pick one of the E experts, whatever the prompt asks. A checkpoint can carry
a calibrated **fallback**: a score of how far a prompt is from the domains, and a threshold;
under `vote` and `last` routing a prompt whose score is above the threshold gets expert -1
(the base model alone, `domain` None). Forced routing (`moa:<domain>`, domains=...) never falls
back.

Scores (higher = farther from the domains):

- `distance` (default): the masked mean of the prompt's hidden states at the input of one
  decoder layer (what that layer's router reads), compared with each domain's centroid of the
  training prompts in units of that domain's own per-dimension standard deviation:
  `min_k mean_h ((x_h - mu_kh) / s_kh)^2`, a diagonal Mahalanobis distance to the nearest
  domain. Per domain, because the domains' spreads differ by an order of magnitude (code
  prompts vary far more than JSON ones): with one shared scale the threshold is set by the
  widest domain and a generic question passes as a loose member of a narrow one. Each s_k is
  shrunk toward the pooled spread (`SHRINK` pseudo-prompts) so a small domain's estimate stays
  stable. The layer is chosen at calibration by holding each domain out in turn (it plays the
  unknown prompts) and keeping the candidate layer that rejects the held-out domains most at
  the in-domain acceptance asked for.
- `msp`: 1 - the decision's maximum router probability (vote: mean over the layers).
- `energy`: -logsumexp of the router logits, mean over the deciding layers.

docs/RESULTS.md "Out-of-domain fallback" has the measurement that chose `distance`: the
routers are trained to separate the domains from each other, never from anything else, so
their confidence is high on most generic questions too.

The threshold starts at the `acceptance` quantile of the scores of the in-domain validation
prompts (default 1.0: every one of them keeps its expert, their largest score; on the demo 0.99
sent 2% of in-domain test prompts to the base model, 1.0 0.8%). A maximum over a few dozen
prompts is a low estimate of how far a new in-domain prompt may lie (on the recipe search's
`writing` data 3 of 60 test prompts lay beyond it), so calibration also scores **reference
prompts** of no domain (`REFERENCES`, or the user's own). They break ties between candidate
layers, and where even the nearest of them (their `REFERENCE_QUANTILE` score) lie beyond that
start, the threshold moves to the geometric middle of the gap: a margin for in-domain prompts
that still rejects the references. Where the references overlap the domains (domains of
general questions), there is no gap and no margin. The in-domain validation scores are stored
with the calibration, so `--fallback P` can move the threshold to another acceptance P without
recalibrating. On disk (see `moa.checkpoint`): a `fallback` block in moa_config.json
(method, threshold, acceptance, layer, domains, calibration summary) and `fallback.safetensors`
(`valid_scores` (N,), and for `distance` `centroids` (E, H) and `scale` (E, H)). A checkpoint
without them loads with the fallback off. Anything that changes the experts or the routers
(add/remove/retrain-expert, stage 2) drops the calibration instead of keeping a stale one.

    summary = calibrate_checkpoint("runs/moa", train_records, valid_records)   # in place
    model = MoAModel.from_pretrained("runs/moa")          # fallback on (auto)
    set_fallback(model, "off")                            # or "auto", or 0.95
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from moa.errors import MoAError
from moa.router import decide

METHODS = ("distance", "msp", "energy")
FILE = "fallback.safetensors"
DEFAULT_ACCEPTANCE = 1.0
DEFAULT_DEPTHS = (0.4, 0.5, 0.6)
"""Candidate layers of the distance method, as fractions of the depth (layers 12, 15, 18 of 30):
on the demo the middle layers separate generic questions from the domains, the first ones
(bag of words) do not (docs/RESULTS.md "Out-of-domain fallback"). Where the held-out-domain
rule rates candidates equally, the deepest is kept (on the demo it caught the most generic
questions at the same in-domain acceptance)."""
REFERENCES = Path(__file__).parent / "resources" / "reference_prompts.jsonl"
"""100 everyday questions and requests of no particular domain (none of them in
benchmarks/generic_prompts.jsonl, which measures the fallback): the default out-of-domain
references of `calibrate`."""
REFERENCE_QUANTILE = 0.05
"""The reference score that bounds the threshold's margin: the 5% of references nearest the domains."""
SHRINK = 10
"""Pseudo-prompts of the pooled within-domain spread mixed into each domain's own."""
MAX_TRAIN_PER_DOMAIN = 200
"""Training prompts per domain the centroids and spreads are estimated from (the first ones)."""


@dataclass
class FallbackConfig:
    """A calibrated out-of-domain fallback (see the module docstring)."""

    method: str
    """"distance", "msp" or "energy"."""
    threshold: float
    """A prompt whose score is above this goes to the base model."""
    domains: list[str]
    """The experts it was calibrated for, in order (the centroids' rows)."""
    valid_scores: Tensor
    """(N,) float32 sorted scores of the in-domain validation prompts: `at_acceptance` reads them."""
    acceptance: float = DEFAULT_ACCEPTANCE
    """The in-domain validation acceptance `threshold` was set for."""
    layer: int | None = None
    """distance: the decoder layer whose pooled input is compared (0 = the embeddings)."""
    centroids: Tensor | None = None
    """distance: (E, H) float32 mean pooled input of each domain's training prompts."""
    scale: Tensor | None = None
    """distance: (E, H) float32 each domain's standard deviation per dimension (or (H,), one shared)."""
    calibration: dict = field(default_factory=dict)
    """What calibrate measured (data sizes, acceptance and routing accuracy on the validation prompts)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MoAError(f"unknown fallback method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.method == "distance":
            if self.layer is None or self.centroids is None or self.scale is None:
                raise MoAError("the distance fallback needs a layer, centroids and scale")
            if self.centroids.shape[0] != len(self.domains) or self.scale.shape not in (self.centroids.shape,
                                                                                        self.centroids.shape[1:]):
                raise MoAError(f"fallback centroids of shape {tuple(self.centroids.shape)} and scale of shape "
                               f"{tuple(self.scale.shape)} do not fit {len(self.domains)} domains")
        if self.valid_scores.ndim != 1 or self.valid_scores.numel() == 0:
            raise MoAError("the fallback needs the scores of at least one validation prompt")

    @property
    def pool_layers(self) -> tuple[int, ...]:
        """The layers whose pooled input the routing pass must keep for `score`."""
        return (self.layer,) if self.method == "distance" else ()

    def score(self, logits: Sequence[Tensor], pooled: dict[int, Tensor], how: str) -> Tensor:
        """(B,) float32, higher = farther from the domains.

        logits: the deciding routers' logits [(B, E)] * K; pooled: {layer: (B, H)} with `pool_layers`;
        how: "vote" or "last" (which routers msp / energy read).
        """
        if self.method == "distance":
            if self.layer not in pooled:
                raise MoAError(f"the distance fallback reads the input of layer {self.layer}, which this routing "
                               "pass did not keep")
            x = pooled[self.layer].float()  # (B, H)
            return distances(x, self.centroids.to(x.device), self.scale.to(x.device)).min(1).values  # (B,)
        deciding = list(logits) if how == "vote" else list(logits)[-1:]
        if self.method == "msp":
            return 1.0 - decide(deciding, "vote")[1].max(-1).values  # (B,)
        return -torch.stack([torch.logsumexp(lg.float(), -1) for lg in deciding]).mean(0)  # (B,)

    def apply(self, expert_ids: Tensor, logits: Sequence[Tensor], pooled: dict[int, Tensor], how: str) -> Tensor:
        """expert_ids (B,) with -1 (the base model) where the prompt's score is above the threshold."""
        far = self.score(logits, pooled, how).to(expert_ids.device) > self.threshold  # (B,)
        return torch.where(far, torch.full_like(expert_ids, -1), expert_ids)

    def at_acceptance(self, p: float) -> "FallbackConfig":
        """A copy whose threshold keeps the fraction `p` of the in-domain validation prompts (no
        reference margin: exactly that quantile)."""
        return replace(self, threshold=threshold_at(self.valid_scores, p), acceptance=float(p))

    # ------------------------------------------------------------------ on disk

    def to_block(self) -> dict:
        """The `fallback` block of moa_config.json (its tensors go to `FILE`)."""
        return {"method": self.method, "threshold": self.threshold, "acceptance": self.acceptance,
                "layer": self.layer, "domains": list(self.domains), "file": FILE, "calibration": self.calibration}

    def tensors(self) -> dict[str, Tensor]:
        out = {"valid_scores": self.valid_scores.float().contiguous()}
        if self.method == "distance":
            out.update(centroids=self.centroids.float().contiguous(), scale=self.scale.float().contiguous())
        return out

    @classmethod
    def from_block(cls, block: dict, tensors: dict[str, Tensor], where: str) -> "FallbackConfig":
        if not isinstance(block, dict):
            raise MoAError(f"{where}: the fallback block must be an object")
        missing = [k for k in ("method", "threshold", "domains") if k not in block]
        missing += [k for k in ("valid_scores",) + (("centroids", "scale") if block.get("method") == "distance" else ())
                    if k not in tensors]
        if missing:
            raise MoAError(f"{where}: the fallback calibration lacks {', '.join(missing)} (run `moa calibrate` again)")
        try:
            return cls(method=block["method"], threshold=float(block["threshold"]), domains=list(block["domains"]),
                       valid_scores=tensors["valid_scores"].float(), acceptance=float(block.get("acceptance", 0)),
                       layer=block.get("layer"), centroids=tensors.get("centroids"), scale=tensors.get("scale"),
                       calibration=dict(block.get("calibration") or {}))
        except MoAError as e:
            raise MoAError(f"{where}: {e}") from None


def distances(x: Tensor, centroids: Tensor, scale: Tensor) -> Tensor:
    """x (B, H), centroids (E, H), scale (E, H) or (H,) -> (B, E) mean squared standardized distance."""
    z = (x[:, None, :] - centroids[None]) / scale  # (B, E, H)
    return z.pow(2).mean(-1)  # (B, E)


def threshold_at(valid_scores: Tensor, p: float) -> float:
    """The score that keeps at least the fraction p of `valid_scores` (accepted: score <= it)."""
    check_acceptance(p)
    v = valid_scores.float().sort().values
    return float(v[min(len(v), math.ceil(p * len(v) - 1e-9)) - 1])


def check_acceptance(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1 or math.isnan(p):
        raise MoAError(f"the fallback acceptance must be a number in (0, 1], got {p!r}")
    return float(p)


# --------------------------------------------------------------------------- --fallback off|auto|P


def parse_fallback(text) -> str | float:
    """`--fallback` off | auto | P, P in (0, 1]: the in-domain acceptance on the calibration's
    validation prompts that sets the threshold. Returns "off", "auto" or P."""
    value = str(text).strip().lower()
    if value in ("off", "auto"):
        return value
    try:
        p = float(value)
    except ValueError:
        p = None
    if p is None or not 0 < p <= 1:
        raise MoAError(f"--fallback must be off, auto or a number P in (0, 1] (the fraction of in-domain "
                       f"validation prompts kept by the threshold, e.g. 0.99), got {text!r}")
    return p


def set_fallback(model, spec: str | float | None = "auto") -> None:
    """Put the fallback `spec` in force on a loaded model: "off" (never), "auto" / None (the
    checkpoint's calibration, off without one), or P (the calibration's threshold moved to the
    in-domain validation acceptance P; a checkpoint without calibration is an error)."""
    spec = "auto" if spec is None else parse_fallback(spec)
    cal = getattr(model, "fallback_calibration", None)
    model.fallback_spec = spec
    if spec == "off" or cal is None:
        if cal is None and spec not in ("off", "auto"):
            raise MoAError(f"--fallback {spec}: this checkpoint has no fallback calibration (run `moa calibrate` "
                           "on it, or use --fallback off|auto)")
        model.fallback = None
        return
    fb = cal if spec == "auto" else cal.at_acceptance(spec)
    calibrated_k = fb.calibration.get("route_layers")
    if fb.method != "distance" and calibrated_k not in (None, model.route_layers):
        raise MoAError(f"the checkpoint's {fb.method} fallback was calibrated on the routers of {calibrated_k} layers, "
                       f"but this model decides with {model.route_layers}: calibrate with the same route_layers, or "
                       "use --fallback off")
    if getattr(model, "routing_only", False) and fb.layer is not None and fb.layer >= model.num_layers:
        raise MoAError(f"the checkpoint's fallback reads the input of layer {fb.layer}, but only the first "
                       f"{model.num_layers} layers are loaded: route with more layers (--route-layers "
                       f"{fb.layer + 1} or more) or use --fallback off")
    model.fallback = fb


# --------------------------------------------------------------------------- calibration


@torch.no_grad()
def prompt_features(model, prompts: Sequence, layers: Sequence[int] = (), batch_size: int = 16,
                    progress: bool = True, desc: str = "fallback features",
                    logits: bool = True) -> tuple[Tensor | None, dict[int, Tensor]]:
    """Run the routing pass over `prompts` (chat messages, as generate and the server render them).

    Returns (logits (N, K, E) of the first K = model.route_layers routers, {layer: (N, H) pooled
    input of that layer} for `layers`), rows in input order. logits=False: None, and the pass
    stops at the last of `layers` (the training prompts of the distance method need no more).
    """
    from tqdm.auto import tqdm

    from moa.generation import encode_prompts

    K = model.route_layers
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    out = torch.zeros(len(prompts), K, model.num_experts) if logits else None
    stop = max((K - 1, *layers)) if logits else max(layers)
    pooled: dict[int, Tensor] = {}
    with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            ids, mask = encode_prompts(model, [prompts[i] for i in idx])  # (b, T) left padded
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T)
            state = model._routing_pass(ids, mask, mask.bool(), position_ids, stop, tuple(layers))
            rows = torch.tensor(idx)
            if logits:
                out[rows] = torch.stack(state.logits[:K], 1).float().cpu()  # (b, K, E)
            for l in layers:
                x = state.pooled[l].float().cpu()  # (b, H)
                pooled.setdefault(l, torch.zeros(len(prompts), x.shape[1]))[rows] = x
            bar.update(len(idx))
    return out, pooled


def _centroids(x: Tensor, y: Tensor, E: int, per_domain: bool = True) -> tuple[Tensor, Tensor]:
    """Per-domain means (E, H) and standard deviations (E, H) of x (N, H), each domain's variance
    shrunk toward the pooled within-domain one by `SHRINK` pseudo-prompts (per_domain=False:
    the pooled one alone, (H,))."""
    mu = torch.stack([x[y == k].mean(0) for k in range(E)])  # (E, H)
    pooled = (x - mu[y]).pow(2).mean(0)  # (H,)
    if per_domain:
        n = torch.stack([(y == k).sum() for k in range(E)]).to(x.dtype)[:, None]  # (E, 1)
        own = torch.stack([(x[y == k] - mu[k]).pow(2).mean(0) for k in range(E)])  # (E, H)
        var = (n * own + SHRINK * pooled) / (n + SHRINK)  # (E, H)
    else:
        var = pooled
    scale = var.sqrt()
    return mu, scale.clamp(min=float(scale.max()) * 1e-6 + 1e-12)


def _held_out_rejection(xtr: Tensor, ytr: Tensor, xva: Tensor, yva: Tensor, E: int, acceptance: float,
                        per_domain: bool = True) -> float:
    """Mean over domains d of the fraction of d's validation prompts rejected by a distance
    fallback calibrated without d: how well this layer tells an unseen kind of prompt apart."""
    rates = []
    for d in range(E):
        keep = [k for k in range(E) if k != d]
        remap = torch.full((E,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        tr = ytr != d
        mu, scale = _centroids(xtr[tr], remap[ytr[tr]], len(keep), per_domain)
        score = distances(xva, mu, scale).min(1).values  # (N,)
        t = threshold_at(score[yva != d], acceptance)
        rates.append(float((score[yva == d] > t).float().mean()))
    return sum(rates) / len(rates)


def calibrate(model, train_records: Sequence, valid_records: Sequence, *, method: str = "distance",
              acceptance: float = DEFAULT_ACCEPTANCE, layers: Sequence[int] | None = None,
              batch_size: int = 16, progress: bool = True,
              max_train_per_domain: int | None = MAX_TRAIN_PER_DOMAIN,
              references: Sequence | None = None) -> FallbackConfig:
    """Calibrate the out-of-domain fallback of `model` (a MoAModel, full or routing part).

    Args:
        train_records / valid_records: labelled records (`moa.data.read_records`) of the model's
            domains; the centroids and scale come from the training prompts, the threshold from
            the validation prompts. Records of other domains are an error.
        method: "distance", "msp" or "energy" (see the module docstring).
        acceptance: the fraction of in-domain validation prompts the threshold keeps.
        layers: distance: candidate layers (default `default_layers`); the one that best rejects
            a held-out domain is kept.
        max_train_per_domain: distance: the centroids use the first N training prompts of each
            domain (None: all); the routing pass over them is the costly part of calibration.
        references: prompts (chat messages) of no domain (`reference_prompts()`); among distance
            layers that tie on held-out domains they pick the one that rejects them most, and
            they set the margin above the in-domain threshold (see the module docstring). None:
            neither.
    Returns:
        the FallbackConfig (not yet in force nor saved: see `calibrate_checkpoint`, `set_fallback`).
    """
    acceptance = check_acceptance(acceptance)
    domains = list(model.domains)
    ytr, yva = (_labels(rs, domains, what) for rs, what in ((train_records, "training"), (valid_records, "validation")))
    cands = candidate_layers(model, method, layers)
    ftr = {}
    if cands:
        keep = first_per_domain(train_records, max_train_per_domain)
        train_records, ytr = [train_records[i] for i in keep], ytr[keep]
        missing = [d for k, d in enumerate(domains) if not bool((ytr == k).any())]
        if missing:
            raise MoAError(f"the training records have no prompt of domain(s) {', '.join(missing)}: the distance "
                           "fallback needs every domain's centroid")
        ftr = prompt_features(model, [r.prompt_messages for r in train_records], cands, batch_size, progress,
                              "fallback: train", logits=False)[1]
    lva, fva = prompt_features(model, [r.prompt_messages for r in valid_records], cands, batch_size, progress,
                               "fallback: valid")
    lref = fref = None
    if references:
        lref, fref = prompt_features(model, list(references), cands, batch_size, progress, "fallback: references",
                                     logits=method != "distance")
    how = "last" if model.routing_default == "last" else "vote"
    fb = fit_fallback(domains, method, acceptance, ftr, ytr, lva, fva, yva, how, lref=lref, fref=fref)
    fb.calibration.update(n_train=len(train_records), route_layers=model.route_layers)
    return fb


def candidate_layers(model, method: str, layers: Sequence[int] | None = None) -> list[int]:
    """The layers whose pooled input `method` may read: none but for distance, where they are
    `layers` (default `default_layers`) checked against the layers the routing pass computes."""
    if method not in METHODS:
        raise MoAError(f"unknown fallback method {method!r} (choose from {', '.join(METHODS)})")
    if method != "distance":
        return []
    top = min(model.num_layers, model.route_layers)  # layers whose input the routing pass computes
    cands = list(layers) if layers is not None else default_layers(top)
    if model.num_experts < 2:  # nothing to hold out: the first candidate
        cands = cands[:1]
    bad = [l for l in cands if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < top]
    if bad or not cands:
        raise MoAError(f"fallback layers must be integers from 0 to {top - 1}, got {list(cands)}")
    return cands


def default_layers(num_layers: int) -> list[int]:
    """`DEFAULT_DEPTHS` of a model with `num_layers` decoder layers (12, 15, 18 of 30)."""
    return sorted({min(num_layers - 1, round(f * num_layers)) for f in DEFAULT_DEPTHS})


def fit_fallback(domains: list[str], method: str, acceptance: float, ftr: dict[int, Tensor], ytr: Tensor,
                 lva: Tensor, fva: dict[int, Tensor], yva: Tensor, how: str = "vote",
                 per_domain_scale: bool = True, lref: Tensor | None = None,
                 fref: dict[int, Tensor] | None = None) -> FallbackConfig:
    """The fallback from prompt features (`prompt_features`): ftr {layer: (N, H)} / ytr (N,) the
    training prompts' pooled inputs and domain ids (distance only), lva (M, K, E) / fva / yva the
    validation prompts' router logits, pooled inputs and domain ids, lref (R, K, E) / fref the
    reference prompts' (optional; msp / energy read lref, distance fref). Distance keeps the layer
    of ftr that best rejects a held-out domain, on ties the one that rejects the most references
    at the in-domain threshold, then the deepest;
    per_domain_scale=False: one shared spread (measured worse, kept for the comparison in
    benchmarks/fallback_bench.py)."""
    E = len(domains)
    held_out, ref_rejection = {}, {}
    with_refs = (fref if method == "distance" else lref) is not None
    logits = list(lva.unbind(1))  # [(M, E)] * K
    ref_logits = list(lref.unbind(1)) if lref is not None else []  # [(R, E)] * K

    def probe_at(layer: int | None) -> FallbackConfig:
        if layer is None:
            return FallbackConfig(method, 0.0, domains, torch.zeros(1), acceptance)
        mu, scale = _centroids(ftr[layer], ytr, E, per_domain_scale)
        return FallbackConfig("distance", 0.0, domains, torch.zeros(1), acceptance, layer, mu, scale)

    if method == "distance":
        cands = sorted(ftr)
        held_out = {l: round(_held_out_rejection(ftr[l], ytr, fva[l], yva, E, acceptance, per_domain_scale), 4)
                    for l in cands} if E >= 2 else {cands[0]: None}
        if with_refs and len(cands) > 1:
            for l in cands:
                p = probe_at(l)
                t = threshold_at(p.score(logits, fva, how), acceptance)
                ref_rejection[l] = round(float((p.score(ref_logits, fref, how) > t).float().mean()), 4)
        # ties: the references rejected, then the deepest (see DEFAULT_DEPTHS)
        layer = max(cands, key=lambda l: (held_out[l] or 0, ref_rejection.get(l, 0), l))
        probe = probe_at(layer)
    else:
        probe = probe_at(None)
    scores = probe.score(logits, fva, how)  # (M,)
    start = threshold_at(scores, acceptance)
    threshold, margin = start, {}
    if with_refs:
        ref_scores = probe.score(ref_logits, fref, how)  # (R,)
        threshold, margin = reference_margin(start, ref_scores)
    fb = replace(probe, valid_scores=scores.sort().values, threshold=threshold)
    decided = fb.apply(decide(logits, how)[0], logits, fva, how)  # (M,)
    fb.calibration = {
        "n_valid": len(yva), "routing": how,
        "valid_acceptance": round(float((decided >= 0).float().mean()), 4),
        "valid_routing_accuracy": round(float((decided == yva).float().mean()), 4),
        **({"held_out_domain_rejection": {str(k): v for k, v in held_out.items()}} if held_out else {}),
        **({"reference_rejection_by_layer": {str(k): v for k, v in ref_rejection.items()}} if ref_rejection else {}),
        **margin,
    }
    return fb


def reference_margin(start: float, ref_scores: Tensor) -> tuple[float, dict]:
    """The threshold with its margin: `start` (the in-domain validation threshold) moved to the
    geometric middle between it and the `REFERENCE_QUANTILE` score of the references when that
    lies beyond it (scores are positive distances there), else to the arithmetic middle for
    scores of any sign; `start` itself where the references overlap the domains. Returns
    (threshold, a summary for the calibration record)."""
    ref_scores = ref_scores.float()
    near = float(ref_scores.quantile(REFERENCE_QUANTILE))
    if near > start:
        threshold = math.sqrt(start * near) if start > 0 else (start + near) / 2
    else:
        threshold = start
    return threshold, {
        "in_domain_threshold": round(start, 6), "n_references": int(ref_scores.numel()),
        "reference_near_score": round(near, 6),
        "reference_rejection": round(float((ref_scores > threshold).float().mean()), 4),
        "margin": round(threshold - start, 6),
    }


def resolve_references(spec: str | Path | None) -> list[list[dict]] | None:
    """`--references` default | none | FILE: the bundled reference prompts, none (no margin), or
    the user's JSONL of prompts (e.g. real traffic that no expert should take)."""
    if spec is None or str(spec) == "none":
        return None
    return reference_prompts(None if str(spec) == "default" else spec)


def reference_prompts(path: str | Path | None = None) -> list[list[dict]]:
    """The reference prompts of no domain as chat messages: `path` (JSONL of {"prompt": ...} or
    {"messages": [...]}, as `moa generate` reads) or the bundled `REFERENCES`."""
    from moa.data import read_prompts

    path = Path(path) if path is not None else REFERENCES
    try:
        with open(path, encoding="utf-8") as f:
            return [messages for messages, _ in read_prompts(f, str(path))]
    except OSError as e:
        raise MoAError(f"cannot read the fallback reference prompts {path}: {e.strerror}") from None


def first_per_domain(records: Sequence, n: int | None) -> list[int]:
    """Indices of the first n records of each domain (all when n is None)."""
    seen: dict[str, int] = {}
    out = []
    for i, r in enumerate(records):
        if n is None or seen.get(r.domain, 0) < n:
            seen[r.domain] = seen.get(r.domain, 0) + 1
            out.append(i)
    return out


def _labels(records: Sequence, domains: list[str], what: str) -> Tensor:
    if not records:
        raise MoAError(f"the fallback calibration needs {what} records")
    unknown = sorted({r.domain for r in records} - set(domains))
    if unknown:
        raise MoAError(f"the {what} records have domain(s) {', '.join(unknown)} that the model does not have "
                       f"(its domains: {', '.join(domains)})")
    return torch.tensor([domains.index(r.domain) for r in records])


def calibrate_checkpoint(moa_dir: str | Path, train_records: Sequence, valid_records: Sequence,
                         out: str | Path | None = None, *, method: str = "distance",
                         acceptance: float = DEFAULT_ACCEPTANCE, layers: Sequence[int] | None = None,
                         batch_size: int = 16, progress: bool = True, overwrite: bool = False,
                         max_train_per_domain: int | None = MAX_TRAIN_PER_DOMAIN,
                         references: Sequence | None = None) -> dict:
    """Calibrate the fallback of the checkpoint `moa_dir` and write it into `out` (default: in
    place): the checkpoint's files unchanged, plus the `fallback` block in moa_config.json and
    `fallback.safetensors`, written atomically (the new directory replaces the old in one rename).

    train_records / valid_records: `moa.data.read_records` records of the checkpoint's domains;
    references: prompts of no domain (`reference_prompts()`, or None: no margin).
    Only the routing part of the model is loaded (no LM head). Returns a summary: method,
    layer, threshold, acceptance, valid_acceptance, valid_routing_accuracy, n_train, n_valid,
    held_out_domain_rejection (distance), out.
    """
    import shutil

    from moa.checkpoint import CONFIG_FILE, MoAConfig, load_routing_part
    from moa.io import atomic_dir, atomic_write_json, check_out_dir, save_tensors
    from moa.model import MoAModel

    moa_dir = Path(moa_dir)
    MoAConfig.read(moa_dir)  # a readable MoA checkpoint, or a one-line error
    target = moa_dir if out is None else Path(out)
    in_place = target.resolve() == moa_dir.resolve()
    if not in_place:
        check_out_dir(target, overwrite=overwrite, protect=[moa_dir])
    model = load_routing_part(MoAModel, moa_dir)
    fb = calibrate(model, train_records, valid_records, method=method, acceptance=acceptance, layers=layers,
                   batch_size=batch_size, progress=progress, max_train_per_domain=max_train_per_domain,
                   references=references)
    raw = json.loads((moa_dir / CONFIG_FILE).read_text())  # as written: fields this moa does not know survive
    with atomic_dir(target) as tmp:
        for p in moa_dir.iterdir():
            if p.name in (CONFIG_FILE, FILE):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        save_tensors(tmp / FILE, fb.tensors())
        raw["fallback"] = fb.to_block()
        atomic_write_json(tmp / CONFIG_FILE, raw)
    return {"method": fb.method, "layer": fb.layer, "threshold": round(fb.threshold, 6),
            "acceptance": fb.acceptance, **fb.calibration, "out": str(target)}


def drop_calibration(model, why: str) -> bool:
    """Drop the model's fallback calibration because `why` (it was measured on other experts or
    routers), saying so on stderr. Returns whether there was one."""
    had = getattr(model, "fallback_calibration", None) is not None
    if had:
        print(f"moa: the out-of-domain fallback calibration is dropped ({why}); run `moa calibrate` on the "
              "result to calibrate it again", file=sys.stderr)
    model.fallback_calibration = model.fallback = None
    return had
