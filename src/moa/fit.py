"""`moa fit`: the whole method on a user's labelled JSONL, with its baselines, under one budget.

    stage 1 (one expert per domain) -> assemble -> stage 2 (routers + experts, explicit routing)
    -> baselines (mixed-data LoRA, optionally MoE-LoRA, classifier + LoRAs, ablations)
    -> routing report and evaluation on --test -> RUN/metrics.json, RUN/report.md, plots

Budget policies (recorded in RUN/fit.json and the report):
- "equal": equal compute. Stage 1 takes `expert_steps` x domains steps in all (or `epochs` over
  each domain's data), split between the domains by data size ** `allocation`; stage 2 takes
  `stage2_steps` (default: `stage2_ratio` of stage 1); the mixed-data LoRA gets exactly MoA's
  total (seed + stage 1 + stage 2) at the same batch size.
- "converge": every system trains up to `max_epochs` over its data with validation every half
  epoch, stops after `patience` validations without a lower validation loss and keeps its best
  weights (the paper trained each expert to convergence).

Every stage records itself in RUN/fit.json when done; re-running the same command skips the done
stages and continues an interrupted one from its last checkpoint. `moa demo` is this pipeline on
the bundled data with a profile of fixed settings.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moa.errors import MoAError

BUDGETS = ("equal", "converge")
EXPERT_INITS = ("fresh", "seed")
DEFAULT_VALID_FRACTION = 0.2
"""Held out of each domain's records when a "converge" fit is given no validation file."""
STAGE2_MODES = ("joint", "routers")
SEED_SELECTS = ("domain", "overall")
BASELINES = ("mixed_lora", "moe_lora", "classifier_loras", "mixed_lora_wide")


@dataclass
class FitConfig:
    """The settings of one fit (the demo's profiles are FitConfigs)."""

    expert_steps: float | None = None
    """Mean stage-1 steps per domain (stage 1 takes round(expert_steps x domains) in all); None:
    `epochs` passes over each domain's records."""
    stage2_steps: int | None = None
    """Stage-2 steps; None: `stage2_ratio` x the stage-1 total."""
    batch_size: int = 8
    lr: float = 2e-3
    """The lr of one LoRA on all the data; with lr_scaling "tokens" each expert's is scaled from it."""
    stage2_lr: float = 1e-3
    router_lr: float = 3e-3
    eta: float = 0.1
    max_length: int = 512
    eval_per_domain: int | None = None
    """Test records per domain for PPL and routing (None: all)."""
    max_new_tokens: int = 64
    rank: int = 8
    alpha: float = 16.0
    generate_per_domain: int | None = 10
    """Of those, the records per domain with greedy generation (BLEU, ROUGE-L, exact match)."""
    ablations: bool = False
    """Also mixed_lora_wide, moe_lora, classifier_loras, moa_last, moa_layer, moa_no_router_loss
    (eta=0), moa_random_init, and a sweep of eta on the valid split."""
    eta_sweep: tuple = (0.1, 1.0, 10.0)
    lr_scaling: str = "tokens"
    """"tokens": each expert's lr follows the square-root rule for its label tokens per step
    (`moa.stages.token_lr_scales`); "none": every expert uses lr / stage2_lr as given."""
    seed_steps: int = 0
    """"equal" budget: steps of a shared seed LoRA on all the data that every expert starts from
    (0: none; with expert_init "seed": one epoch over all the data)."""
    expert_init: str = "seed"
    """"fresh": every expert starts from zero (the paper); "seed": every expert starts from a LoRA
    trained on all the data (under "converge" that is the mixed-data LoRA baseline itself), so an
    expert is the mixed LoRA specialised on its domain, keeping what the domains share."""
    seed_select: str = "overall"
    """expert_init "seed" under "converge": "overall": every expert starts from the mixed LoRA
    baseline itself (its lowest total validation loss); "domain": each from the mixed run's
    weights at the validation where *its domain's* loss was lowest (domains stop improving at
    different points of one run; measured worse: chosen on a domain's few validation records, the
    starting point itself is noisy, docs/RESULTS.md recipe search)."""
    seed_warmup: float = 0.0
    """expert_init "seed": epochs of each expert's data over which its lr warms up linearly (0:
    the trainer's 5% of its steps). A fresh Adam moves every weight by about the lr from the first
    step, whatever the gradient: a warm-up keeps the trained start from being shaken."""
    seed_lr_scale: float = 0.25
    """expert_init "seed": each expert's lr as a fraction of `lr` (before the per-expert lr
    rule). The experts continue a converged LoRA: at the full lr the first Adam steps jump away
    from it and the validation choice becomes noisy (recipe search: 0.25 beat 1.0 on two of three
    datasets and tied on the third)."""
    seed_interpolate: float = 0.5
    """expert_init "seed": each expert is written as seed + t x (trained - seed), every LoRA matrix
    averaged in weight space with the mixed LoRA it started from (1: the trained weights, kept in
    experts/<d>/trained either way). The trained weights are chosen on a domain's few validation
    records; halfway back keeps most of a real gain and bounds an overfit one (recipe search:
    below the mixed LoRA on 7 domains against 6, worst domain 1.020 against 1.057)."""
    seed_patience: int = 4
    """expert_init "seed" under "converge": validations without a lower loss before a seeded expert
    stops (the other trainings: `patience`). Its validation starts at its seed, a converged LoRA,
    so its first validations rarely beat it; a longer wait found later, lower losses on two
    domains of the recipe search and changed no other expert (round 4)."""
    stage2: str = "routers"
    """"joint": stage 2 trains routers and experts (the paper); "routers": the routers only, the
    experts stay as stage 1 left them (their best validation weights under "converge")."""
    router_epochs: float = 2.0
    """stage2 "routers": passes over the largest domain's records (balanced batches)."""
    fallback_acceptance: float = 1.0
    """Calibrate the out-of-domain fallback (`moa.fallback`) on the validation data so that this
    fraction of in-domain prompts keeps its expert (0: no fallback)."""
    fallback_references: str = "default"
    """Prompts of no domain for the fallback's margin and layer (`moa.fallback.resolve_references`):
    "default" (bundled), "none", or a JSONL file."""
    allocation: float = 1.0
    """Stage-1 steps of a domain proportional to (its records) ** allocation (1: the same epochs
    for every expert, as the mixed LoRA sees each domain)."""
    epochs: float = 2.0
    """Stage-1 passes over each domain's records when expert_steps is None."""
    stage2_ratio: float = 0.3
    """Stage-2 steps as a fraction of the stage-1 total when stage2_steps is None (the demo's
    quick profile: 24 of 80)."""
    budget: str = "converge"
    max_epochs: float = 4.0
    """converge: the most passes over its data a system may take."""
    patience: int = 2
    """converge: validations (every half epoch) without a lower validation loss before stopping."""
    baselines: tuple = ("mixed_lora",)
    validations: int = 4
    """"equal" budget: validations on the valid split during each training (0: none; the eta
    sweep still uses the valid split)."""

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise MoAError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.expert_init not in EXPERT_INITS:
            raise MoAError(f"--expert-init must be one of {', '.join(EXPERT_INITS)}, got {self.expert_init!r}")
        if self.seed_select not in SEED_SELECTS:
            raise MoAError(f"--seed-select must be one of {', '.join(SEED_SELECTS)}, got {self.seed_select!r}")
        if self.stage2 not in STAGE2_MODES:
            raise MoAError(f"--stage2 must be one of {', '.join(STAGE2_MODES)}, got {self.stage2!r}")
        if self.seed_steps < 0:
            raise MoAError(f"--seed-steps must be >= 0, got {self.seed_steps}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise MoAError(f"unknown baseline(s) {', '.join(unknown)} (choose from {', '.join(BASELINES)})")
        for name in ("batch_size", "max_length", "rank", "patience", "seed_patience"):
            if getattr(self, name) < 1:
                raise MoAError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "stage2_lr", "router_lr", "epochs", "max_epochs", "stage2_ratio", "router_epochs",
                     "seed_lr_scale"):
            if not getattr(self, name) > 0:
                raise MoAError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed_interpolate <= 1:
            raise MoAError(f"--seed-interpolate must be in [0, 1] (1: the trained weights), got {self.seed_interpolate}")
        if not self.seed_warmup >= 0:
            raise MoAError(f"--seed-warmup must be >= 0, got {self.seed_warmup}")
        if self.eta < 0:
            raise MoAError(f"eta must be >= 0, got {self.eta}")
        if not 0 <= self.fallback_acceptance <= 1:
            raise MoAError(f"--fallback-acceptance must be in [0, 1] (0: no fallback), got {self.fallback_acceptance}")


def allocate_steps(sizes: dict[str, int], total: int, alpha: float) -> dict[str, int]:
    """Split `total` optimizer steps between domains proportionally to size ** alpha.

    Largest-remainder rounding, so the steps add up to `total` exactly; every domain gets at
    least one step. sizes: records per domain (all > 0).
    """
    if not sizes:
        raise MoAError("no domains to allocate steps to")
    if total < len(sizes):
        raise MoAError(f"{total} steps cannot give each of the {len(sizes)} domains one")
    if alpha < 0:
        raise MoAError(f"the allocation exponent must be >= 0, got {alpha}")
    weights = {d: float(n) ** alpha for d, n in sizes.items()}
    norm = sum(weights.values())
    spare = total - len(sizes)  # one step each first, the rest by weight
    exact = {d: spare * w / norm for d, w in weights.items()}
    steps = {d: 1 + int(x) for d, x in exact.items()}
    left = total - sum(steps.values())
    for d in sorted(exact, key=lambda d: (-(exact[d] - int(exact[d])), list(sizes).index(d)))[:left]:
        steps[d] += 1
    return steps


def split_valid(records, fraction: float, seed: int = 0):
    """(train, valid): `fraction` of each domain's records (at least one where it has two or more)
    held out, chosen with a seeded shuffle so the split is the same on every run."""
    if not 0 < fraction < 1:
        raise MoAError(f"--valid-fraction must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    train, valid = [], []
    by_domain: dict[str, list] = {}
    for r in records:
        by_domain.setdefault(r.domain, []).append(r)
    for rows in by_domain.values():
        idx = list(range(len(rows)))
        rng.shuffle(idx)
        k = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held = set(idx[:k])
        valid += [r for i, r in enumerate(rows) if i in held]
        train += [r for i, r in enumerate(rows) if i not in held]
    return train, valid


def say(msg: str) -> None:
    print(f"moa: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the run


class _State:
    """RUN/fit.json: the plan and the stages done (with their summaries), written atomically.

    The same plan continues where it stopped; another plan needs --overwrite, which clears RUN
    first (its trainings' checkpoints must not be resumed by a different plan)."""

    def __init__(self, out: Path, plan: dict, *, overwrite: bool, inputs: list):
        import shutil

        from moa.io import check_out_dir

        self.path = out / "fit.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else None
        if old is not None and old.get("plan") == plan:
            self.data = old
        else:
            if old is not None and not overwrite:
                raise MoAError(f"--out {out} holds a fit with other settings or data (its fit.json differs); "
                               "use a new --out or --overwrite")
            check_out_dir(out, overwrite=overwrite, protect=inputs)
            if out.is_dir():
                shutil.rmtree(out)
            self.data = {"plan": plan, "stages": {}}
        self.save()

    def done(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def record(self, name: str, summary: dict) -> None:
        self.data["stages"][name] = summary
        self.save()

    def save(self) -> None:
        from moa.io import atomic_write_json

        atomic_write_json(self.path, self.data)


def run_fit(data: str | Path, out: str | Path, cfg: FitConfig | None = None, *, valid: str | Path | None = None,
            valid_fraction: float | None = None, test: str | Path | None = None, base: str | None = None,
            seed: int = 0, overwrite: bool = False, label: str = "fit") -> dict:
    """Run the whole method and its baselines on `data`; see the module docstring. Returns the
    fit summary (and the test metrics under "metrics" when `test` is given)."""
    from moa.base import DEFAULT_BASE
    from moa.data import domains_of, read_records
    from moa.io import atomic_write_text

    cfg = cfg or FitConfig()
    base = base or DEFAULT_BASE
    out = Path(out)
    if valid is not None and valid_fraction is not None:
        raise MoAError("give --valid FILE or --valid-fraction F, not both")
    records, _ = read_records(data)
    if cfg.budget == "converge" and valid is None and valid_fraction is None:
        valid_fraction = DEFAULT_VALID_FRACTION
        say(f"{label}: no --valid FILE: {valid_fraction:g} of each domain's records are held out for validation "
            "(--valid-fraction)")
    if valid_fraction is not None:
        records, valid_records = split_valid(records, valid_fraction, seed)
    else:
        valid_records = read_records(valid)[0] if valid else None
    domains = domains_of(records)
    if valid_records is not None:
        unknown = sorted({r.domain for r in valid_records} - set(domains))
        if unknown:
            raise MoAError(f"the validation data has domain(s) {', '.join(unknown)} with no training record")
    if cfg.fallback_acceptance:
        from moa.fallback import resolve_references

        resolve_references(cfg.fallback_references)  # a bad file fails now, not after the trainings
    test_records = read_records(test)[0] if test else None
    if test_records is not None:
        unknown = sorted({r.domain for r in test_records} - set(domains))
        if unknown:
            raise MoAError(f"{test}: domain(s) {', '.join(unknown)} have no training record")
    sizes = {d: sum(r.domain == d for r in records) for d in domains}
    plan = _plan(cfg, sizes)
    if cfg.budget == "converge" and not valid_records:
        raise MoAError("--budget converge stops each training at its best validation loss: "
                       "the validation data is empty")
    inputs = [p for p in (data, valid, test) if p]
    state = _State(out, {"data": str(Path(data).resolve()), "valid": str(Path(valid).resolve()) if valid else None,
                         "valid_fraction": valid_fraction, "test": str(Path(test).resolve()) if test else None,
                         "base": str(base), "seed": seed, "config": _jsonable(asdict(cfg)), "steps": plan},
                   overwrite=overwrite, inputs=inputs)
    t0 = time.time()
    # The exact splits this fit trains and validates on, for the record and for the trainings.
    split_dir = out / "data"
    atomic_write_text(split_dir / "train.jsonl", "".join(_record_line(r) for r in records))
    valid_path = None
    if valid_records:
        valid_path = split_dir / "valid.jsonl"
        atomic_write_text(valid_path, "".join(_record_line(r) for r in valid_records))
    train_path = split_dir / "train.jsonl"
    say(f"{label}: {len(domains)} domains {domains}, {len(records)} training records"
        f"{f', {len(valid_records)} validation' if valid_records else ''}; budget {cfg.budget}; out={out}")

    runner = _Runner(cfg, out, base, seed, train_path, records, valid_path, state, valid_records)
    systems, extra = runner.run(domains, plan)
    summary = {"domains": domains, "records": sizes, "budget": cfg.budget, "config": _jsonable(asdict(cfg)), "steps": plan,
               "stages": state.data["stages"], "seconds": round(time.time() - t0, 1)}
    metrics = None
    if test_records is not None:
        metrics = runner.evaluate(Path(test), domains, systems, extra)
        summary["metrics"] = metrics
    atomic_write_text(out / "report.md", render_report(summary, metrics, label))
    runner.plot_losses(domains)
    say(f"{label}: done in {(time.time() - t0) / 60:.1f} min; report: {out / 'report.md'}")
    return summary


def _plan(cfg: FitConfig, sizes: dict[str, int]) -> dict:
    """The optimizer steps of every training, by the budget policy (caps under "converge")."""
    per_epoch = {d: max(1, math.ceil(n / cfg.batch_size)) for d, n in sizes.items()}
    total_epoch = max(1, math.ceil(sum(sizes.values()) / cfg.batch_size))
    # Routers alone: a fixed number of balanced passes (their loss is not the validation loss).
    routers = max(1, math.ceil(cfg.router_epochs * max(per_epoch.values())))
    if cfg.budget == "converge":
        experts = {d: max(1, math.ceil(cfg.max_epochs * s)) for d, s in per_epoch.items()}
        # Stage 2 sees every domain in a balanced batch: an epoch of the largest domain's share.
        stage2 = max(1, math.ceil(cfg.max_epochs * max(per_epoch.values()))) if cfg.stage2 == "joint" else routers
        mixed = max(1, math.ceil(cfg.max_epochs * total_epoch))
        # expert_init "seed": the seed is the mixed-data LoRA baseline, trained once.
        return {"experts": experts, "stage2": stage2, "mixed_lora": mixed,
                "seed": "mixed_lora" if cfg.expert_init == "seed" else cfg.seed_steps,
                "eval_every": {"experts": {d: max(1, s // 2) for d, s in per_epoch.items()},
                               "stage2": max(1, max(per_epoch.values()) // 2), "mixed_lora": max(1, total_epoch // 2)}}
    if cfg.expert_steps is not None:
        experts = allocate_steps(sizes, round(cfg.expert_steps * len(sizes)), cfg.allocation)
    else:
        total = max(len(sizes), round(cfg.epochs * sum(per_epoch.values())))
        experts = allocate_steps(sizes, total, cfg.allocation)
    stage1 = sum(experts.values())
    if cfg.stage2_steps is not None:
        stage2 = cfg.stage2_steps
    else:
        stage2 = max(1, round(cfg.stage2_ratio * stage1)) if cfg.stage2 == "joint" else routers
    seed = cfg.seed_steps or (total_epoch if cfg.expert_init == "seed" else 0)
    return {"experts": experts, "stage2": stage2, "mixed_lora": seed + stage1 + stage2,
            "seed": seed, "eval_every": None}


def _resumable(run_dir: Path | None) -> bool:
    """Whether a training of an earlier, interrupted run left a checkpoint to continue from."""
    from moa.trainer import newest_checkpoint

    return run_dir is not None and newest_checkpoint(Path(run_dir)) is not None


def _record_line(r) -> str:
    return json.dumps({"domain": r.domain, "messages": r.messages}, ensure_ascii=False) + "\n"


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


class _Runner:
    """Runs the stages of one fit in order, each once (see _State)."""

    def __init__(self, cfg: FitConfig, out: Path, base: str, seed: int, train_path: Path, records,
                 valid_path: Path | None, state: _State,
                 valid_records=None):
        self.cfg, self.out, self.base, self.seed = cfg, out, base, seed
        self.train_path, self.records, self.valid_path, self.state = train_path, records, valid_path, state
        self.valid_records = valid_records
        self.timings: dict[str, float] = {}

    def train_cfg(self, steps: int, lr: float, eval_every: int | None = None, select: bool = True,
                  per_domain: bool = False, warmup_steps: int | None = None, patience: int | None = None):
        """select=False: validate for the record only, neither keep the best weights nor stop
        early (a training whose validation loss is not what it optimizes: routers alone)."""
        from moa.trainer import TrainConfig

        c = self.cfg
        converge = c.budget == "converge" and select
        validate = self.valid_path is not None and (c.budget == "converge" or c.validations > 0)
        if c.budget == "converge" and eval_every:
            every = eval_every
        else:
            every = max(1, steps // max(1, c.validations)) if validate else 0
        return TrainConfig(
            max_steps=steps, batch_size=c.batch_size, lr=lr, max_length=c.max_length, seed=self.seed,
            save_every=max(10, steps // 4),  # what a re-run continues from
            eval_data=str(self.valid_path) if validate else None, eval_every=every,
            keep_best=converge, early_stopping_patience=(patience or c.patience) if converge else 0,
            keep_best_per_domain=per_domain and validate,
            **({"warmup_ratio": min(0.5, warmup_steps / steps)} if warmup_steps else {}),
        )

    def stage(self, name: str, fn) -> dict:
        done = self.state.done(name)
        if done is not None:
            say(f"{name}: done in an earlier run, skipped")
            return done
        t = time.time()
        summary = fn()
        if summary.get("interrupted"):  # Ctrl-C: the run saved a checkpoint; stop the pipeline too
            raise KeyboardInterrupt
        summary = {**summary, "wall_s": round(time.time() - t, 1)}
        self.timings[name] = time.time() - t
        self.state.record(name, _jsonable(summary))
        return summary

    def run(self, domains: list[str], plan: dict) -> tuple[list[str], dict]:
        from moa.stages import BEST_BY_DOMAIN, train_expert, train_mixture

        c, out = self.cfg, self.out
        every = plan.get("eval_every") or {}
        bdir = out / "baselines"
        wanted = set(c.baselines) | ({"mixed_lora_wide", "moe_lora", "classifier_loras"} if c.ablations else set())

        seeds_per_domain = plan.get("seed") == "mixed_lora" and c.seed_select == "domain"

        def mixed_lora():
            return self.stage("mixed_lora", lambda: train_expert(
                data=self.train_path, domain=None, out=bdir / "mixed_lora", base=self.base, rank=c.rank,
                alpha=c.alpha, cfg=self.train_cfg(plan["mixed_lora"], c.lr, every.get("mixed_lora"),
                                                  per_domain=seeds_per_domain),
                resume=_resumable(bdir / "mixed_lora"), overwrite=True, records=self.records))

        seed_dir = None
        if plan.get("seed") == "mixed_lora":  # converge + expert_init "seed": the baseline is the seed
            say("seed: the mixed-data LoRA baseline (every expert starts from it)")
            mixed_lora()
            seed_dir = bdir / "mixed_lora"
            wanted.add("mixed_lora")
        elif plan.get("seed"):
            seed_dir = out / "seed"
            self.stage("seed", lambda: train_expert(
                data=self.train_path, domain=None, out=seed_dir, base=self.base, rank=c.rank, alpha=c.alpha,
                cfg=self.train_cfg(plan["seed"], c.lr), resume=_resumable(seed_dir), overwrite=True,
                records=self.records))
        expert_dirs = {d: out / "experts" / d for d in domains}
        seeded = seed_dir is not None and c.expert_init == "seed"  # (not --seed-steps with fresh experts)
        expert_lr = c.lr * (c.seed_lr_scale if seeded else 1.0)
        say("stage 1 steps per domain: " + ", ".join(f"{d} {n}" for d, n in plan["experts"].items()))
        def init_of(d: str) -> Path | None:
            """The seed of d's expert: its domain's best weights of the mixed run (seed_select
            "domain"), else the seed itself."""
            if seed_dir is None or not seeds_per_domain:
                return seed_dir
            own = seed_dir / BEST_BY_DOMAIN / d
            return own if (own / "adapter_model.safetensors").is_file() else seed_dir

        sizes = {d: sum(r.domain == d for r in self.records) for d in domains}

        def warmup_of(d: str) -> int | None:
            if not seeded or not c.seed_warmup:
                return None
            return max(1, math.ceil(c.seed_warmup * sizes[d] / c.batch_size))

        if seeds_per_domain:
            best = (self.state.done("mixed_lora") or {}).get("best_by_domain") or {}
            say("seeds: each expert starts from the mixed-data LoRA at its domain's lowest validation loss: "
                + ", ".join(f"{d} step {b['step']}" for d, b in best.items()))
        for d in domains:
            self.stage(f"expert:{d}", lambda d=d: train_expert(
                data=self.train_path, domain=d, out=expert_dirs[d], base=self.base, rank=c.rank, alpha=c.alpha,
                cfg=self.train_cfg(plan["experts"][d], expert_lr, (every.get("experts") or {}).get(d),
                                   warmup_steps=warmup_of(d), patience=c.seed_patience if seeded else None),
                resume=_resumable(expert_dirs[d]), overwrite=True, records=self.records, init_adapter=init_of(d),
                lr_scaling=c.lr_scaling, interpolate=c.seed_interpolate if seeded else 1.0))

        def assemble():
            from moa.model import MoAModel

            m = MoAModel.from_adapters([expert_dirs[d] for d in domains], domains=domains, base=self.base)
            m.save_pretrained(out / "moa_assembled", provenance={
                "assembled_from": {d: str(expert_dirs[d].resolve()) for d in domains}})
            return {"domains": domains}

        self.stage("assemble", assemble)
        routers_only = c.stage2 == "routers"
        stage2_cfg = self.train_cfg(plan["stage2"], c.stage2_lr, every.get("stage2"), select=not routers_only)
        self.stage("stage2", lambda: train_mixture(
            moa_dir=out / "moa_assembled", data=self.train_path, out=out / "moa", eta=c.eta, router_lr=c.router_lr,
            cfg=stage2_cfg, resume=_resumable(out / "moa"), overwrite=True, records=self.records,
            expert_lr_scaling=c.lr_scaling, router_only=routers_only))

        if c.fallback_acceptance and self.valid_path is not None:
            self.stage("fallback", self.calibrate)
        systems, extra = ["base", "single_lora", "moa"], {}
        if "mixed_lora" in wanted:
            if seed_dir != bdir / "mixed_lora":  # else trained above, as the seed
                mixed_lora()
            systems.insert(2, "mixed_lora")
        if "mixed_lora_wide" in wanted:  # parameter parity: rank x domains, same alpha / r
            wide = c.rank * len(domains)
            self.stage("mixed_lora_wide", lambda: train_expert(
                data=self.train_path, domain=None, out=bdir / "mixed_lora_wide", base=self.base, rank=wide,
                alpha=c.alpha / c.rank * wide, cfg=self.train_cfg(plan["mixed_lora"], c.lr, every.get("mixed_lora")),
                resume=_resumable(bdir / "mixed_lora_wide"), overwrite=True, records=self.records))
            extra["mixed_lora_wide"] = str(bdir / "mixed_lora_wide")
        if "moe_lora" in wanted:
            from moa.baselines import train_moe_lora

            self.stage("moe_lora", lambda: train_moe_lora(
                moa_dir=out / "moa_assembled", records=self.records, out=bdir / "moe_lora", cfg=stage2_cfg,
                overwrite=True))
            extra["moe_lora"] = str(bdir / "moe_lora")
        if "classifier_loras" in wanted:
            from moa.baselines import train_classifier

            self.stage("classifier_loras", lambda: train_classifier(
                moa_dir=out / "moa_assembled", records=self.records, out=bdir / "classifier_loras", seed=self.seed))
            extra["classifier_loras"] = str(bdir / "classifier_loras")
        if c.ablations:
            for name, kw in (("moa_no_router_loss", {"eta": 0.0}), ("moa_random_init", {"init": "random"})):
                lr = c.stage2_lr if "init" not in kw else c.lr
                self.stage(name, lambda name=name, kw=kw, lr=lr: train_mixture(
                    moa_dir=out / "moa_assembled", data=self.train_path, out=out / "ablations" / name,
                    router_lr=c.router_lr, overwrite=True, resume=_resumable(out / "ablations" / name),
                    records=self.records, desc=name,
                    expert_lr_scaling=c.lr_scaling, cfg=self.train_cfg(plan["stage2"], lr),
                    **{"eta": c.eta, **kw}))
                extra[name] = str(out / "ablations" / name)
            systems += ["moa_last", "moa_layer"]
            if self.valid_path is not None:
                self.eta_sweep(plan)
        systems += list(extra)
        return systems, extra

    def calibrate(self) -> dict:
        """The out-of-domain fallback of RUN/moa: centroids on the training prompts, threshold on
        the validation prompts (in place; see moa.fallback)."""
        from moa.fallback import calibrate_checkpoint, resolve_references

        summary = calibrate_checkpoint(self.out / "moa", self.records, self.valid_records,
                                       acceptance=self.cfg.fallback_acceptance,
                                       references=resolve_references(self.cfg.fallback_references))
        margin = (f" (in-domain {summary['in_domain_threshold']:g} + a margin toward the reference prompts, "
                  f"{summary['reference_rejection']:.0%} of which it rejects)" if summary.get("margin") else "")
        say(f"fallback: {summary['method']} at layer {summary.get('layer')}, threshold {summary['threshold']:g}{margin}, "
            f"keeps {summary.get('valid_acceptance')} of the validation prompts")
        return summary

    def eta_sweep(self, plan: dict) -> None:
        from moa.stages import train_mixture

        c, out = self.cfg, self.out
        runs = {c.eta: out / "moa", 0.0: out / "ablations" / "moa_no_router_loss"}
        for eta in c.eta_sweep:
            if eta not in runs:
                runs[eta] = out / "ablations" / f"moa_eta{eta:g}"
                self.stage(f"eta={eta:g}", lambda eta=eta: train_mixture(
                    moa_dir=out / "moa_assembled", data=self.train_path, out=runs[eta], eta=eta,
                    router_lr=c.router_lr, cfg=self.train_cfg(plan["stage2"], c.stage2_lr), overwrite=True,
                    resume=_resumable(runs[eta]), records=self.records, desc=f"eta={eta:g}",
                    expert_lr_scaling=c.lr_scaling))
        self.stage("eta_sweep", lambda: sweep_report(runs, self.valid_path))

    def evaluate(self, test_path: Path, domains: list[str], systems: list[str], extra: dict) -> dict:
        from moa.data import encode_records, read_records
        from moa.evaluate import plot_confusion, route_records, routing_report, run_eval
        from moa.io import atomic_write_json
        from moa.model import MoAModel

        c, out = self.cfg, self.out
        test, _ = read_records(test_path)
        t = time.time()
        routed: dict = {}
        metrics = run_eval(out / "moa", test_path, out / "eval", systems,
                           mixed_lora=out / "baselines" / "mixed_lora" if "mixed_lora" in systems else None,
                           single_lora={d: out / "experts" / d for d in domains}, extra=extra,
                           limit_per_domain=c.eval_per_domain, generate_limit_per_domain=c.generate_per_domain,
                           max_new_tokens=c.max_new_tokens, batch_size=8, routed=routed)
        self.timings["eval"] = time.time() - t
        t = time.time()
        if "moa" in routed and c.eval_per_domain is None:
            # the moa system's scoring routed every test record (vote, with the fallback): no pass of its own
            preds, labels, names = routed["moa"], [r.domain for r in test], list(metrics["domains"])
        else:
            moa = MoAModel.from_pretrained(out / "moa")
            examples, _ = encode_records(moa.tokenizer, test, 1024)
            preds, _ = route_records(moa, examples, "vote")
            labels, names = [e.domain for e in examples], list(moa.domains)
            del moa
        route = routing_report(labels, preds, names)
        atomic_write_json(out / "routing.json", route)
        plot_confusion(route, out / "routing_confusion.png", "MoA routing (vote), test split")
        self.timings["routing"] = time.time() - t
        metrics["routing_full_test"] = {"accuracy": route["accuracy"], "n": route["n"],
                                        "fallback": route.get("fallback", 0.0)}
        if "eta_sweep" in self.state.data["stages"]:
            metrics["eta_sweep"] = self.state.data["stages"]["eta_sweep"]
        atomic_write_json(out / "metrics.json", metrics)
        for f in (out / "eval").glob("metric_*.png"):
            (out / f.name).write_bytes(f.read_bytes())
        return metrics

    def plot_losses(self, domains) -> None:
        seed = self.state.data["plan"]["steps"].get("seed")
        seed_dir = (self.out / "baselines" / "mixed_lora") if seed == "mixed_lora" else (self.out / "seed" if seed else None)
        plot_all_losses(self.out, domains, self.out / "loss_curves.png", seed_dir)


def sweep_report(runs: dict, valid_path: Path) -> dict:
    """Valid-split routing accuracy (vote) and mean per-domain PPL of each eta's checkpoint."""
    from moa.data import encode_records, read_records
    from moa.evaluate import PPL_DECIMALS
    from moa.model import MoAModel
    from moa.scoring import moa_forward, score_examples, summarize

    valid, _ = read_records(valid_path)
    report = {}
    for eta, path in sorted(runs.items()):
        model = MoAModel.from_pretrained(path)
        examples, _ = encode_records(model.tokenizer, valid, 1024)
        fwd, tok = moa_forward(model, "vote")
        rows = score_examples(fwd, examples, tok.pad_token_id, 8, desc=f"valid eta={eta:g}")
        ppl = summarize(rows)
        report[f"{eta:g}"] = {
            "routing_accuracy": round(sum(r["domain_routed"] == r["domain"] for r in rows) / len(rows), 4),
            "mean_ppl": round(sum(v["ppl"] for v in ppl.values()) / len(ppl), PPL_DECIMALS),
            "ppl": {d: round(v["ppl"], PPL_DECIMALS) for d, v in ppl.items()},
        }
    best = min(report, key=lambda e: (-report[e]["routing_accuracy"], report[e]["mean_ppl"]))
    return {"runs": report, "best_eta": float(best), "criterion": "highest valid routing accuracy, then lowest mean PPL"}


# --------------------------------------------------------------------------- report


def plot_all_losses(out: Path, domains, path: Path, seed_dir: Path | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    seed = _log(seed_dir) if seed_dir else []
    if seed:  # the experts continue from the seed LoRA: its steps come first
        axes[0].plot([r["step"] for r in seed], [r["loss"] for r in seed], label="seed (all domains)",
                     lw=1, color="gray", ls="--")
    for d in domains:
        log = _log(out / "experts" / d)
        axes[0].plot([len(seed) + r["step"] for r in log], [r["loss"] for r in log], label=d, lw=1)
    axes[0].set_title("stage 1: expert LM loss" + (" (after the seed)" if seed else ""))
    log = _log(out / "moa")
    axes[1].plot([r["step"] for r in log], [r["lm_loss"] for r in log], label="LM loss", lw=1)
    axes[1].plot([r["step"] for r in log], [r["router_loss"] for r in log], label="router loss", lw=1)
    axes[1].plot([r["step"] for r in log], [r["router_acc"] for r in log], label="router acc", lw=1)
    axes[1].set_title("stage 2: mixture")
    log = _log(out / "baselines" / "mixed_lora")
    axes[2].plot([r["step"] for r in log], [r["loss"] for r in log], lw=1, color="gray")
    axes[2].set_title("baseline: mixed-data LoRA")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _log(d: Path) -> list[dict]:
    f = d / "train_log.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []


def training_table(summary: dict) -> list[str]:
    """Per training: steps, epochs per domain, records seen, wall time, validation and convergence."""
    sizes, batch = summary["records"], summary["stages"]
    cfg = summary.get("config") or {}
    b = cfg.get("batch_size")
    rows = ["| training | steps | epochs | records seen | wall | best val loss (step) | converged |",
            "|---|---|---|---|---|---|---|"]
    total = sum(sizes.values())
    for name, s in batch.items():
        if "steps" not in s:
            continue
        n = sizes.get(name.split(":", 1)[1], total) if name.startswith("expert:") else total
        seen = s["steps"] * b if b else None
        epochs = f"{seen / n:.2f}" if seen else "–"
        best = s.get("best")
        val = f"{best['val_loss']:.4f} ({best['step']})" if best else "–"
        if name == "stage2" and cfg.get("stage2") == "routers":  # the experts are fixed: so is the LM loss
            rows.append(f"| {name} (routers only) | {s['steps']} | {epochs} | {seen if seen else '–'} | "
                        f"{s.get('wall_s', 0) / 60:.1f} min | – | fixed passes (--router-epochs) |")
            continue
        if best is None:
            conv = "unknown (no validation)"
        elif s.get("stopped_early"):
            conv = "yes (stopped early)"
        else:
            conv = "yes (best before the end)" if best["step"] < s["steps"] else "no (still improving)"
        rows.append(f"| {name} | {s['steps']} | {epochs} | {seen if seen else '–'} | {s.get('wall_s', 0) / 60:.1f} min "
                    f"| {val} | {conv} |")
    return rows


def kept_seed(summary: dict, domains: list[str]) -> list[str]:
    """The domains whose expert, started from the mixed-data LoRA (expert_init "seed" under
    "converge"), kept its weights: best validation at step 0."""
    if summary.get("steps", {}).get("seed") != "mixed_lora":
        return []
    stages = summary.get("stages", {})
    return [d for d in domains if ((stages.get(f"expert:{d}") or {}).get("best") or {}).get("step") == 0]


def render_report(summary: dict, metrics: dict | None, label: str) -> str:
    from moa.evaluate import format_table

    domains = summary["domains"]
    lines = [f"# moa {label} report", "",
             f"Domains: {', '.join(f'{d} ({n} records)' for d, n in summary['records'].items())}.",
             f"Budget policy: **{summary['budget']}**. " + _budget_line(summary), ""]
    lines += ["## Trainings", "", *training_table(summary), ""]
    fb = summary["stages"].get("fallback")
    if fb:
        margin = (f" The threshold ({fb['threshold']:g}) lies a margin beyond the largest in-domain score "
                  f"({fb['in_domain_threshold']:g}), toward the {fb['n_references']} reference prompts of no domain, "
                  f"{fb['reference_rejection']:.0%} of which it sends to the base model."
                  if fb.get("margin") else
                  f" The {fb['n_references']} reference prompts of no domain overlap the domains (no margin); "
                  f"{fb['reference_rejection']:.0%} of them go to the base model." if "n_references" in fb else "")
        lines += [f"Out-of-domain fallback: {fb['method']} at layer {fb.get('layer')}, calibrated to keep "
                  f"{fb['acceptance']:.0%} of the in-domain validation prompts (kept: {fb.get('valid_acceptance') or 0:.1%})."
                  f"{margin} "
                  "Under vote/last routing a prompt beyond it goes to the base model with no expert; "
                  "`--fallback off` on the serving commands switches it off.", ""]
    if metrics is not None:
        s = metrics["systems"]
        rt = metrics["routing_full_test"]
        lines += ["## Results on the test split", "", format_table(metrics), "",
                  f"Routing accuracy (vote): **{rt['accuracy']:.4f}** on {rt['n']} records"
                  + (f"; {100 * rt['fallback']:.1f}% fell back to the base model (counted as wrong)."
                     if rt.get("fallback") else "."), ""]
        if "moa" in s and "mixed_lora" in s:
            better = [d for d in domains if s["moa"][d]["ppl"] < s["mixed_lora"][d]["ppl"]]
            lines.append(f"MoA PPL below the mixed-data LoRA on {len(better)}/{len(domains)} domains"
                         f"{': ' + ', '.join(better) if better else ''}. MoA vs the mixed-data LoRA per domain: "
                         + ", ".join(f"{d} {_percent(s['moa'][d]['ppl'] / s['mixed_lora'][d]['ppl'] - 1)}"
                                     for d in domains) + ".")
            kept = kept_seed(summary, domains)
            if kept:
                lines.append(f"The expert of {', '.join(kept)} kept the mixed-data LoRA's weights (no step beat them "
                             "on its validation records): there MoA and the mixed LoRA are the same model, and their "
                             "PPLs differ only by the arithmetic of the two code paths (up to ~2% in bf16; equal in "
                             "float32).")
            lines.append(deploy_advice(s, domains))
        if "moa" in s and "single_lora" in s:
            gaps = {d: s["moa"][d]["ppl"] / s["single_lora"][d]["ppl"] - 1 for d in domains}
            lines.append("MoA PPL vs single-LoRA per domain: " +
                         ", ".join(f"{d} {_percent(g)}" for d, g in gaps.items()) + ".")
        if "eta_sweep" in metrics:
            sw = metrics["eta_sweep"]
            lines += ["", "## eta sweep (valid split)", "", "| eta | routing acc | mean PPL |", "|---|---|---|"]
            lines += [f"| {e} | {v['routing_accuracy']:.4f} | {v['mean_ppl']:.3f} |" for e, v in sw["runs"].items()]
            lines += ["", f"Best: eta = {sw['best_eta']:g} ({sw['criterion']})."]
        lines += ["", "## Plots", "", "![loss curves](loss_curves.png)", "",
                  "![routing confusion](routing_confusion.png)", "", "![PPL per domain](metric_ppl.png)", ""]
    lines += [f"Training time: {summary['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def _percent(change: float) -> str:
    """A relative change as a signed percentage, with the digits a change near zero needs to show."""
    digits = 1 if abs(change) >= 0.001 or change == 0 else 4
    return f"{100 * change:+.{digits}f}%"


def deploy_advice(systems: dict, domains: list[str]) -> str:
    """Which model to deploy, from the test PPLs: MoA where it wins on most domains."""
    wins = sum(systems["moa"][d]["ppl"] < systems["mixed_lora"][d]["ppl"] for d in domains)
    if wins * 2 > len(domains):
        return (f"Deploy **MoA** (`moa serve --moa RUN/moa`): it is better than one LoRA on the mixed data on "
                f"{wins} of {len(domains)} domains.")
    return (f"Deploy the **mixed-data LoRA** (RUN/baselines/mixed_lora): MoA wins on only {wins} of "
            f"{len(domains)} domains here, as expected with tiny or closely related domains, where one LoRA "
            f"gains from the other domains' data.")


def _budget_line(summary: dict) -> str:
    st = summary["steps"]
    stage1 = sum(st["experts"].values())
    cap = " (caps; each stops at its best validation loss)" if summary["budget"] == "converge" else ""
    if st.get("seed") == "mixed_lora":
        t = (summary.get("config") or {}).get("seed_interpolate", 1.0)
        back = (f" Each expert is written as the mixed LoRA + {t:g} x (its trained weights - the mixed LoRA), "
                "every LoRA matrix averaged in weight space; the trained weights are in experts/<domain>/trained."
                if t != 1 else "")
        return (f"Optimizer steps{cap}: mixed-data LoRA {st['mixed_lora']}; MoA starts every expert from it, "
                f"then stage 1 {stage1} + stage 2 {st['stage2']}.{back}")
    parts = ([f"seed LoRA {st['seed']}"] if st.get("seed") else []) + [f"stage 1 {stage1}", f"stage 2 {st['stage2']}"]
    return (f"Optimizer steps{cap}: MoA {' + '.join(parts)} = {(st.get('seed') or 0) + stage1 + st['stage2']}; "
            f"mixed-data LoRA {st['mixed_lora']}.")
