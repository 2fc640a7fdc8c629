"""Training commands. Stage 1: `moa train-expert` trains one PEFT LoRA on one domain's records.

The loop itself (accelerate, checkpoints, resume) is `moa.trainer`; this module decides what
is trained and what is written.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import torch

from moa.base import DEFAULT_BASE, base_reference, base_signature
from moa.data import IGNORE_INDEX
from moa.errors import MoAError

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_targets(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise MoAError("--targets must name at least one module, e.g. q_proj,v_proj")
    return targets


def load_training_records(path, domains: list[str] | None, skip_invalid: bool):
    from moa.data import read_records, select_domains

    records, skipped = read_records(path, skip_invalid=skip_invalid)
    if skipped:
        print(f"moa: skipped {skipped} invalid line(s) in {path}", file=sys.stderr)
    if domains is not None:
        records = select_domains(records, domains, path)
    return records


def encode_for_training(tok, records, max_length: int):
    from moa.data import encode_records

    examples, truncated = encode_records(tok, records, max_length)
    if truncated:
        print(f"moa: truncated {truncated} of {len(examples)} record(s) to --max-length {max_length} tokens",
              file=sys.stderr)
    empty = [e for e in examples if all(l == IGNORE_INDEX for l in e.labels[1:])]
    if len(empty) == len(examples):
        raise MoAError(f"no response token left after truncation to --max-length {max_length}")
    return examples


LR_SCALE_RANGE = (0.1, 10.0)


def label_tokens_per_row(examples) -> dict[str, float]:
    """Mean number of trained (label) tokens per row, per domain and over all rows ("*")."""
    sums: dict[str, list[int]] = {}
    for e in examples:
        n = sum(1 for l in e.labels[1:] if l != IGNORE_INDEX)
        s = sums.setdefault(e.domain, [0, 0])
        s[0] += n
        s[1] += 1
    out = {d: t / max(1, r) for d, (t, r) in sums.items()}
    rows = sum(r for _, r in sums.values())
    out["*"] = sum(t for t, _ in sums.values()) / max(1, rows)
    return out


def token_lr_scales(tokens_per_row: dict[str, float], row_share: dict[str, float]) -> dict[str, float]:
    """Learning-rate multipliers by the square-root rule for Adam: the noise of a gradient
    estimate falls with the number of tokens behind it, and Adam's best lr grows with the
    square root of that number. The reference is one LoRA on all the data (tokens_per_row["*"]
    per row, every row of the batch): a domain whose rows are `row_share` of each batch and
    carry tokens_per_row[d] label tokens gets sqrt(row_share * tokens_per_row[d] / tokens_per_row["*"]).
    Short answers (a letter, a number) get a smaller lr, long ones a larger; clipped to
    LR_SCALE_RANGE."""
    ref = tokens_per_row["*"]
    lo, hi = LR_SCALE_RANGE
    return {d: min(hi, max(lo, math.sqrt(share * tokens_per_row[d] / ref))) if ref > 0 else 1.0
            for d, share in row_share.items()}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- stage 1


def train_expert(
    *,
    data: str | Path,
    domain: str | None,
    out: str | Path,
    base: str = DEFAULT_BASE,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    targets: list[str] | None = None,
    cfg=None,
    resume: bool = False,
    overwrite: bool = False,
    skip_invalid: bool = False,
    records=None,
    init_adapter: str | Path | None = None,
    lr_scaling: str = "none",
    interpolate: float = 1.0,
) -> dict:
    """Train one LoRA expert on the records of `domain` and write a PEFT adapter to `out`.

    Returns a summary dict (steps, final loss, seconds). `records` may be passed instead of
    reading `data` again (used by the demo, which trains several experts from one file).
    `init_adapter`: start from this PEFT LoRA adapter's weights (same rank, alpha and target
    modules) instead of the fresh LoRA init, e.g. a shared seed LoRA trained on all domains.
    `lr_scaling="tokens"`: cfg.lr is the lr of one LoRA on all the records of `data`; this
    domain's expert uses it times `token_lr_scales` (fewer label tokens per row: smaller lr;
    the LoRA on all domains, domain None, is that reference and keeps cfg.lr).
    `interpolate` t (with `init_adapter`): the adapter written is init + t x (trained - init), in
    each LoRA matrix A and B (a weight-space average of the start and the trained weights, as in
    WiSE-FT); 1 writes the trained weights. The trained weights themselves are also kept, in
    OUT/trained/.
    """
    from peft import LoraConfig, get_peft_model

    from moa.base import load_base
    from moa.data import ShuffledSampler
    from moa.trainer import Trainer, TrainConfig, causal_lm_loss_sum, load_eval_examples, start_run, write_run_files

    cfg = cfg or TrainConfig()
    targets = targets or parse_targets(DEFAULT_TARGETS)
    if rank <= 0:
        raise MoAError(f"--rank must be positive, got {rank}")
    if alpha <= 0:
        raise MoAError(f"--alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise MoAError(f"--dropout must be in [0, 1), got {dropout}")
    if lr_scaling not in ("none", "tokens"):
        raise MoAError(f"--lr-scaling must be 'none' or 'tokens', got {lr_scaling!r}")
    if not 0 <= interpolate <= 1:
        raise MoAError(f"--interpolate must be in [0, 1] (1: the trained weights), got {interpolate}")
    if interpolate != 1 and init_adapter is None:
        raise MoAError("--interpolate needs --init-adapter: it averages the trained weights with those they started from")
    out = Path(out)
    run_config = {
        "stage": "expert", "domain": domain, "data": str(Path(data).resolve()) if data else None,
        "base": base_reference(base), "rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets,
        "train": _cfg_dict(cfg),
    }
    seed = None
    if init_adapter is not None:
        from moa.checkpoint import read_adapter

        seed = read_adapter(init_adapter)  # fail before anything is written
        if seed.r != rank or float(seed.alpha) != float(alpha):
            raise MoAError(f"--init-adapter {init_adapter} has rank {seed.r} and alpha {seed.alpha}; this run "
                           f"asks for rank {rank} and alpha {alpha} (pass the same --rank and --alpha)")
        seed_targets = sorted({path.rsplit(".", 1)[-1] for path in seed.weights})
        if seed_targets != sorted(set(targets)):
            raise MoAError(f"--init-adapter {init_adapter} does not adapt the same modules: it adapts "
                           f"{','.join(seed_targets)}, this run --targets {','.join(targets)}")
        run_config["init_adapter"] = str(Path(init_adapter).resolve())
    if lr_scaling == "tokens":
        run_config["lr_scaling"] = "tokens"
    if interpolate != 1:
        run_config["interpolate"] = interpolate
    # domain None: one LoRA on every record in natural proportions (the mixed-data baseline).
    if records is None and lr_scaling == "tokens" and domain is not None:
        records = load_training_records(data, None, skip_invalid)  # every domain: the lr rule's reference
    all_records = records
    if records is None:
        records = load_training_records(data, [domain] if domain else None, skip_invalid)
    elif domain is not None:
        records = [r for r in records if r.domain == domain]
        if not records:
            raise MoAError(f"no record of domain '{domain}'")
    start_run(out, run_config, resume=resume, overwrite=overwrite)

    torch.manual_seed(cfg.seed)
    model, tok = load_base(base)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    examples = encode_for_training(tok, records, cfg.max_length)
    if lr_scaling == "tokens" and domain is not None:
        from dataclasses import replace

        from moa.data import encode_records

        others, _ = encode_records(tok, [r for r in all_records if r.domain != domain], cfg.max_length)
        tpr = label_tokens_per_row([*examples, *others])  # this domain's rows are encoded already
        scale = token_lr_scales(tpr, {domain: 1.0})[domain]
        if is_main_process():
            print(f"moa: --lr-scaling tokens: {tpr[domain]:.1f} label tokens per '{domain}' row vs {tpr['*']:.1f} "
                  f"over all the data: lr {cfg.lr:g} x {scale:.3f} = {cfg.lr * scale:.3g}", file=sys.stderr)
        cfg = replace(cfg, lr=cfg.lr * scale)
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise MoAError(f"--targets {','.join(missing)} not found in the base model "
                       f"(linear modules: {', '.join(sorted(present))})")
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = base_reference(base)
    if seed is not None:
        load_lora_init(peft_model, seed)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    params = dict(peft_model.named_parameters())

    def state_fn():
        return {n: params[n].detach().clone() for n in names}

    def load_state_fn(t):
        with torch.no_grad():
            for n in names:
                params[n].copy_(t[n])

    def loss_fn(m, batch):
        lm = causal_lm_loss_sum(m, batch) / batch["global_tokens"]
        return lm, {"loss": lm.detach()}

    trainer = Trainer(
        model=peft_model, params=[params[n] for n in names], examples=examples,
        sampler=ShuffledSampler(len(examples), cfg.batch_size, cfg.seed), loss_fn=loss_fn, cfg=cfg, out=out,
        pad_id=tok.pad_token_id, state_fn=state_fn, load_state_fn=load_state_fn, desc=f"expert {domain or 'mixed'}",
        log_prefix=f"train-expert {domain or 'mixed'}: {len(examples)} records, ",
        eval_examples=load_eval_examples(cfg, tok, [domain] if domain else None),
        start_is_candidate=init_adapter is not None,
    )
    result = trainer.train(resume=resume)
    summary = {"domain": domain, "steps": result.steps, "interrupted": result.interrupted,
               "seconds": round(result.seconds, 1), "records": len(examples),
               "final_loss": result.log[-1]["loss"] if result.log else None}
    if result.best is not None:
        summary["best"] = result.best
        summary["stopped_early"] = result.stopped_early
    if trainer.best_by_domain:
        summary["best_by_domain"] = dict(trainer.best_by_domain)
    if result.interrupted:
        return summary
    if trainer.acc.is_main_process:
        info = {"domain": domain, "base": base_reference(base), "base_signature": base_signature(model.config),
                "train": run_config}
        final, final_info = trainer.acc.unwrap_model(trainer.model), info
        if interpolate != 1:
            save_adapter(final, out / TRAINED, {**info, "trained": True})
            interpolate_lora(final, seed, interpolate)
            # only OUT itself is interpolated: best_by_domain/ below holds trained weights
            final_info = {**info, "interpolated": {"t": interpolate, "init": run_config["init_adapter"],
                                                   "trained": TRAINED}}
            summary["interpolate"] = interpolate
        else:
            shutil.rmtree(out / TRAINED, ignore_errors=True)  # an earlier run's, in the same --out
        save_adapter(final, out, final_info)
        # --keep-best-per-domain: OUT/best_by_domain/<d>/, the weights of d's lowest validation loss
        for d, state in trainer.best_state_by_domain.items():
            trainer.load_state_fn(state)
            save_adapter(trainer.acc.unwrap_model(trainer.model), out / BEST_BY_DOMAIN / d,
                         {**info, "best_for_domain": d, "best": trainer.best_by_domain[d]})
        write_run_files(out, run_config, result.log, f"expert '{domain or 'mixed'}'")
    trainer.acc.wait_for_everyone()
    return summary


def load_lora_init(peft_model, src) -> None:
    """Copy the LoRA weights of `src` (a PEFT adapter read by `moa.checkpoint.read_adapter`, of the
    same rank and alpha) into `peft_model`'s fresh, trainable 'default' adapter; the two must
    adapt exactly the same modules with the same shapes, otherwise a MoAError says what differs."""
    adapter_dir = src.where
    mods = _lora_modules(peft_model)
    if set(src.weights) != set(mods):
        extra, missing = sorted(set(src.weights) - set(mods)), sorted(set(mods) - set(src.weights))
        raise MoAError(f"--init-adapter {adapter_dir} does not adapt the same modules: {len(extra)} only in "
                       f"the adapter (e.g. {extra[:2]}), {len(missing)} only in this run (e.g. {missing[:2]})")
    with torch.no_grad():
        for path, (a, b) in src.weights.items():
            la, lb = mods[path].lora_A["default"].weight, mods[path].lora_B["default"].weight
            if la.shape != a.shape or lb.shape != b.shape:
                raise MoAError(f"--init-adapter {adapter_dir}: {path} has shapes {tuple(a.shape)} / "
                               f"{tuple(b.shape)}, this base needs {tuple(la.shape)} / {tuple(lb.shape)}")
            la.copy_(a)
            lb.copy_(b)


def _lora_modules(peft_model) -> dict:
    """{module path as an adapter file names it: the LoRA layer} of `peft_model`'s 'default' adapter."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def interpolate_lora(peft_model, src, t: float) -> None:
    """In place: each LoRA matrix of `peft_model`'s 'default' adapter becomes src + t x (itself - src),
    src a PEFT adapter read by `moa.checkpoint.read_adapter` that it started from (`load_lora_init`)."""
    mods = _lora_modules(peft_model)
    with torch.no_grad():
        for path, (a, b) in src.weights.items():
            for w, w0 in ((mods[path].lora_A["default"].weight, a), (mods[path].lora_B["default"].weight, b)):
                w.copy_(torch.lerp(w0.to(w), w, t))


TRAINED = "trained"
"""train-expert --interpolate: OUT/trained/ holds the trained weights (OUT itself the interpolation)."""

BEST_BY_DOMAIN = "best_by_domain"
"""train-expert --keep-best-per-domain: OUT/best_by_domain/<domain>/ holds a PEFT adapter per domain."""


def save_adapter(peft_model, out: Path, info: dict) -> None:
    """Write the PEFT adapter files into `out` atomically (each file: temp + fsync + rename)."""
    from moa.io import atomic_dir, atomic_write_json

    staging = out / ".adapter-staging"
    with atomic_dir(staging) as tmp:
        peft_model.save_pretrained(str(tmp))
    for f in sorted(staging.iterdir()):
        if f.is_file():
            os.replace(f, out / f.name)
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out / "moa_adapter.json", info)


def _cfg_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


# --------------------------------------------------------------------------- stage 2


def stage2_loss(m, batch: dict, *, eta: float, train_routers: bool = True,
                router_loss_to_experts: bool = True) -> tuple[torch.Tensor, dict]:
    """The stage-2 loss of one micro-batch: LM loss + eta * router loss, and the metrics logged.

    `m` is the MoAModel (possibly wrapped for data parallelism); every row uses its label's
    expert (explicit routing). Sums are divided by the global batch's token / row counts.
    """
    from moa.losses import label_nll
    from moa.router import router_hits, router_loss

    dom = batch["domain_ids"]
    # The vocabulary projection runs on the label positions only, as in stage 1 (logits_to_keep=1
    # skips it in the model; the frozen head is applied here outside any DDP wrapper).
    o = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], domain_ids=dom,
          prompt_mask=batch["prompt_mask"], routing="explicit", return_router_logits=train_routers,
          router_loss_to_experts=router_loss_to_experts, output_hidden_states=True, logits_to_keep=1)
    head = getattr(m, "module", m).base_model.get_output_embeddings()
    lm = label_nll(batch["labels"], hidden=o.hidden_states[-1], head=head)[0].sum() / batch["global_tokens"]
    if not train_routers:
        return lm, {"loss": lm.detach(), "lm_loss": lm.detach()}
    # The router loss of the rows whose whole prompt the routers saw, over the global batch's count.
    target, n = batch["router_ids"], batch["global_router_rows"]
    rl = router_loss(o.router_logits, target, reduction="sum") / n
    correct = router_hits(o.router_logits, target)
    loss = lm + eta * rl if eta > 0 else lm + 0.0 * rl
    metrics = {"loss": loss.detach(), "lm_loss": lm.detach(), "router_loss": rl.detach(),
               "router_acc": sum(correct).float() / (len(correct) * n)}
    for i, c in enumerate(correct):
        metrics[f"router_acc_l{i}"] = c.float() / n
    return loss, metrics


def train_mixture(
    *,
    moa_dir: str | Path,
    data: str | Path,
    out: str | Path,
    eta: float = 0.1,
    init: str = "experts",
    router_only: bool = False,
    router_lr: float = 1e-3,
    cfg=None,
    resume: bool = False,
    overwrite: bool = False,
    skip_invalid: bool = False,
    base: str | None = None,
    records=None,
    model=None,
    experts_trainable: bool | list[str] | None = None,
    train_routers: bool = True,
    router_loss_to_experts: bool = True,
    expert_lr_scaling: str = "none",
    lora_dropout: float = 0.0,
    checkpoint_eta: float | None = None,
    desc: str = "stage 2",
    length_window: int = 1,
) -> dict:
    """Stage 2: train routers and experts jointly on domain-balanced mixed batches.

    Every row goes through its own label's expert in every layer (explicit routing) in one
    forward; loss = LM loss + eta * mean over layers of router cross-entropy. Writes a complete
    MoA checkpoint to `out`. `model` may be given instead of loading `moa_dir` (add-expert uses
    it); `experts_trainable` overrides which experts train (default: all, none if router_only).
    `expert_lr_scaling="tokens"`: cfg.lr is the lr of one LoRA on all the data; each expert's
    updates use it times `token_lr_scales` for its share of the domain-balanced batch (1/E of
    the rows) and its label tokens per row.
    `lora_dropout`: dropout on the experts' input while training. `checkpoint_eta`: the eta the
    written checkpoint records (default `eta`; a router re-fit keeps the checkpoint's own).
    `length_window` W > 1: the balanced batches of every W steps are regrouped by length
    (`moa.data.LengthGroupedSampler`: less padding; each domain's share holds per W steps).
    """
    from moa.data import DomainBalancedSampler, LengthGroupedSampler
    from moa.model import MoAModel
    from moa.trainer import Trainer, TrainConfig, load_eval_examples, start_run, write_run_files

    cfg = cfg or TrainConfig(lr=1e-4)
    if init not in ("experts", "random"):
        raise MoAError(f"--init must be 'experts' or 'random', got {init!r}")
    if eta < 0:
        raise MoAError(f"--eta must be >= 0, got {eta}")
    if not 0 <= lora_dropout < 1:
        raise MoAError(f"--lora-dropout must be in [0, 1), got {lora_dropout}")
    if expert_lr_scaling not in ("none", "tokens"):
        raise MoAError(f"--expert-lr-scaling must be 'none' or 'tokens', got {expert_lr_scaling!r}")
    if isinstance(length_window, bool) or not isinstance(length_window, int) or length_window < 1:
        raise MoAError(f"--length-window must be a whole number of batches >= 1, got {length_window!r}")
    out = Path(out)
    if model is None:
        model = MoAModel.from_pretrained(moa_dir, base=base)
    from moa.fallback import drop_calibration

    drop_calibration(model, "training changes the routers and experts it was measured on")
    domains = list(model.domains)
    if records is None:
        records = load_training_records(data, None, skip_invalid)
    unknown = sorted({r.domain for r in records} - set(domains))
    if unknown:
        raise MoAError(f"{data}: unknown domain(s) {', '.join(unknown)} (the model's domains: {', '.join(domains)})")
    missing = [d for d in domains if not any(r.domain == d for r in records)]
    if missing and train_routers:
        raise MoAError(f"{data}: no record of domain(s) {', '.join(missing)}; stage 2 samples every domain")
    run_config = {
        "stage": "mixture", "moa": str(Path(moa_dir).resolve()) if moa_dir else None,
        "data": str(Path(data).resolve()) if data else None, "domains": domains, "eta": eta, "init": init,
        "router_only": router_only, "router_lr": router_lr, "lora_dropout": lora_dropout, "train": _cfg_dict(cfg),
    }
    if not router_loss_to_experts:
        run_config["router_loss_to_experts"] = False
    if expert_lr_scaling != "none":
        run_config["expert_lr_scaling"] = expert_lr_scaling
    if length_window > 1:
        run_config["length_window"] = length_window
    start_run(out, run_config, resume=resume, overwrite=overwrite)
    torch.manual_seed(cfg.seed)
    if init == "random":
        model.reset_experts(seed=cfg.seed)
    if experts_trainable is None:
        experts_trainable = not router_only
    model.set_trainable(experts=experts_trainable, routers=train_routers)
    model.set_lora_dropout(lora_dropout)
    model.eta = eta if checkpoint_eta is None else checkpoint_eta
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # with the routing replay; never on base_model directly
        model.base_model.enable_input_require_grads()
    tok = model.tokenizer
    examples = encode_for_training(tok, records, cfg.max_length)
    index = {d: k for k, d in enumerate(domains)}
    sampler = DomainBalancedSampler([index[e.domain] for e in examples], cfg.batch_size, cfg.seed)
    if length_window > 1:
        sampler = LengthGroupedSampler(sampler, [len(e.input_ids) for e in examples], length_window, cfg.seed,
                                       domain_of=[index[e.domain] for e in examples])
    eta = eta if train_routers else 0.0

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    router_params, expert_params = model.split_trainable()
    groups = [{"params": router_params, "lr": router_lr}] if router_params else []
    if expert_params:
        groups.append({"params": expert_params, "lr": cfg.lr})
    params = dict(named)

    def state_fn():
        return {n: p.detach().clone() for n, p in params.items()}

    def load_state_fn(t):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(t[n])

    def loss_fn(m, batch):
        return stage2_loss(m, batch, eta=eta, train_routers=train_routers,
                           router_loss_to_experts=router_loss_to_experts)

    update_scales = []
    if expert_lr_scaling == "tokens" and expert_params:
        tpr = label_tokens_per_row(examples)
        scales = token_lr_scales(tpr, {d: 1.0 / len(domains) for d in domains if d in tpr})
        if is_main_process():
            print(f"moa: --expert-lr-scaling tokens: expert lr = {cfg.lr:g} x " +
                  ", ".join(f"{d} {s:.3f}" for d, s in scales.items()), file=sys.stderr)
        per_expert = torch.tensor([scales.get(d, 1.0) for d in domains], dtype=torch.float32)  # (E,)
        for mod in model.lora_modules.values():
            for p in (mod.lora_A, mod.lora_B):  # (E, r, in) / (E, out, r)
                update_scales.append((p, per_expert.view(-1, 1, 1)))

    trainer = Trainer(
        model=model, params=groups, examples=examples, sampler=sampler, loss_fn=loss_fn, cfg=cfg, out=out,
        pad_id=tok.pad_token_id, domains=domains, state_fn=state_fn, load_state_fn=load_state_fn, desc=desc,
        update_scales=update_scales,
        log_prefix=f"{desc}: {len(domains)} domains, {len(examples)} records, ",
        # validated on the domains it trains on (retrain-expert trains one)
        eval_examples=load_eval_examples(cfg, tok, [d for d in domains if any(e.domain == d for e in examples)]),
    )
    result = trainer.train(resume=resume)
    summary = {"steps": result.steps, "interrupted": result.interrupted, "seconds": round(result.seconds, 1),
               "domains": domains}
    if result.best is not None:
        summary["best"] = result.best
        summary["stopped_early"] = result.stopped_early
    if result.log:
        last = result.log[-min(10, len(result.log)):]
        summary["final_lm_loss"] = round(sum(r["lm_loss"] for r in last) / len(last), 4)
        if train_routers:
            summary["final_router_acc"] = round(sum(r["router_acc"] for r in last) / len(last), 4)
    if result.interrupted:
        return summary
    model.set_trainable(experts=False, routers=False)
    model.set_lora_dropout(0.0)
    if trainer.acc.is_main_process:
        provenance = {"stage2": run_config, "summary": summary}
        stage1 = model.provenance.get("assembled_from")
        if init == "experts" and stage1 and set(stage1) == set(domains):
            provenance["assembled_from"] = stage1  # `moa eval`'s single_lora baseline finds them here
        publish_checkpoint(model, out, provenance)
        write_run_files(out, run_config, result.log, desc)
    trainer.acc.wait_for_everyone()
    return summary


def publish_checkpoint(model, out: Path, provenance: dict) -> None:
    """Write the MoA checkpoint files into `out` (which also holds logs and checkpoints):
    saved complete into a staging dir first, so a failed write leaves any old checkpoint intact."""
    from moa.io import atomic_dir

    out = Path(out)
    staging = out / ".moa-staging"
    with atomic_dir(staging) as tmp:
        model.save_pretrained(tmp, provenance=provenance)
    # Experts and routers first, config last: a checkpoint is loadable once its config is new.
    for name in sorted(p.name for p in staging.iterdir()):
        if name == "moa_config.json":
            continue
        src, dst = staging / name, out / name
        if dst.is_dir():
            old = out / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    os.replace(staging / "moa_config.json", out / "moa_config.json")
    shutil.rmtree(staging, ignore_errors=True)
