"""`moa demo`: the whole MoA pipeline on the bundled data, end to end.

stage 1 (one expert per domain) -> assemble -> stage 2 (routers + experts, explicit routing)
-> the mixed-data single-LoRA baseline (as many steps as stage 1 + stage 2, same batch size)
-> routing report -> evaluation of base / single_lora / mixed_lora / moa -> report.md,
metrics.json and PNG plots under --out.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moa.errors import MoAError


@dataclass
class Profile:
    expert_steps: float
    """Mean stage-1 steps per domain: stage 1 takes round(expert_steps x number of domains) steps
    in all, shared between the domains by `allocation`."""
    stage2_steps: int
    batch_size: int
    lr: float
    stage2_lr: float
    router_lr: float
    eta: float
    max_length: int
    eval_per_domain: int | None
    """Test records per domain for PPL and routing (None: the whole test split)."""
    max_new_tokens: int
    rank: int = 8
    alpha: float = 16.0
    generate_per_domain: int | None = None
    """Of those, the records per domain with greedy generation (BLEU, ROUGE-L, exact match)."""
    ablations: bool = False
    """Full profile: also mixed_lora_wide, moe_lora, classifier_loras, moa_last, moa_layer,
    moa_no_router_loss (eta=0), moa_random_init, and a sweep of eta on the valid split."""
    eta_sweep: tuple = (0.1, 1.0, 10.0)
    lr_scaling: str = "none"
    """"tokens": lr and stage2_lr are the lrs of one LoRA on all the data, and each expert's is
    scaled by the square-root rule for its label tokens per step (`moa.stages.token_lr_scales`):
    in stage 1 by its tokens per row, in stage 2 also by its 1/E share of the balanced batch."""
    seed_steps: int = 0
    """Steps of a shared seed LoRA on all the training data (natural proportions) that every
    stage-1 expert starts from (0: experts start from the fresh LoRA init, as in the paper).
    They count in the mixed LoRA's budget: it gets seed + stage-1 + stage-2 steps."""
    allocation: float = 0.5
    """Stage-1 steps of a domain proportional to (its number of training records) ** allocation:
    0 gives every expert the same steps, 1 follows the data's own proportions (as the mixed
    LoRA does), 0.5 (the usual temperature for imbalanced multi-domain data) sits between."""


PROFILES = {
    # Sized for `make demo` on a 2-core CPU within 20 minutes. Every expert gets the same number
    # of epochs (steps in proportion to its data, as the mixed LoRA sees each domain), and its lr
    # follows the square-root rule for its label tokens per step (`lr_scaling`): an expert of
    # one-letter answers steps more carefully than one of paragraphs. Chosen on the valid split
    # (docs/RESULTS.md).
    "quick": Profile(expert_steps=16, stage2_steps=24, batch_size=4, lr=2e-3, stage2_lr=1e-3, router_lr=3e-3,
                     eta=0.1, max_length=192, eval_per_domain=None, generate_per_domain=10, max_new_tokens=40,
                     allocation=1.0, lr_scaling="tokens"),
    # The comparison of docs/RESULTS.md: all baselines and ablations, and the eta sweep.
    "full": Profile(expert_steps=24, stage2_steps=32, batch_size=4, lr=2e-3, stage2_lr=1e-3, router_lr=3e-3,
                    eta=0.1, max_length=256, eval_per_domain=None, generate_per_domain=10, max_new_tokens=40,
                    ablations=True, allocation=1.0, lr_scaling="tokens"),
}


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


def bundled_data_dir() -> Path:
    """data/demo of the source checkout (the package is installed editable from it)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "data" / "demo"
        if (cand / "train.jsonl").is_file():
            return cand
    raise MoAError("the bundled demo data (data/demo) was not found; pass --data DIR "
                   "or build it with `moa data build-demo --out data/demo`")


def run_demo(profile: str | Profile = "quick", out: str | Path = "runs/demo", data_dir: str | Path | None = None,
             base: str | None = None, overwrite: bool = True, seed: int = 0) -> dict:
    from moa.base import DEFAULT_BASE
    from moa.data import domains_of, read_records
    from moa.evaluate import format_table, run_eval
    from moa.model import MoAModel
    from moa.evaluate import plot_confusion, route_records, routing_report
    from moa.data import encode_records
    from moa.io import atomic_write_json, atomic_write_text
    from moa.stages import train_expert, train_mixture
    from moa.trainer import TrainConfig

    if isinstance(profile, Profile):
        p, profile = profile, "custom"
    elif profile in PROFILES:
        p = PROFILES[profile]
    else:
        raise MoAError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    base = base or DEFAULT_BASE
    data_dir = Path(data_dir) if data_dir else bundled_data_dir()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}
    train, _ = read_records(data_dir / "train.jsonl")
    domains = domains_of(train)
    say(f"demo ({profile}): {len(domains)} domains {domains}, {len(train)} training records, out={out}")

    def cfg(steps, lr):
        return TrainConfig(max_steps=steps, batch_size=p.batch_size, lr=lr, max_length=p.max_length, seed=seed)

    def check(summary: dict) -> dict:
        if summary.get("interrupted"):  # Ctrl-C: the run saved a checkpoint; stop the pipeline too
            raise KeyboardInterrupt
        return summary

    # Optional seed: one LoRA on all the data that every expert starts from (what the domains
    # share, such as the chat format and stopping after the answer, is learned once).
    seed_dir = None
    if p.seed_steps:
        t = time.time()
        seed_dir = out / "seed"
        check(train_expert(data=data_dir / "train.jsonl", domain=None, out=seed_dir, base=base, rank=p.rank,
                           alpha=p.alpha, cfg=cfg(p.seed_steps, p.lr), overwrite=overwrite, records=train))
        timings["seed"] = time.time() - t

    # Stage 1: one expert per domain.
    t = time.time()
    sizes = {d: sum(r.domain == d for r in train) for d in domains}
    expert_steps = allocate_steps(sizes, round(p.expert_steps * len(domains)), p.allocation)
    say("stage 1 steps per domain: " + ", ".join(f"{d} {n}" for d, n in expert_steps.items()))
    expert_dirs = {}
    for d in domains:
        expert_dirs[d] = out / "experts" / d
        check(train_expert(data=data_dir / "train.jsonl", domain=d, out=expert_dirs[d], base=base, rank=p.rank,
                           alpha=p.alpha, cfg=cfg(expert_steps[d], p.lr), overwrite=overwrite, records=train,
                           init_adapter=seed_dir, lr_scaling=p.lr_scaling))
    timings["stage1"] = time.time() - t

    # Assemble and stage 2.
    t = time.time()
    assembled = MoAModel.from_adapters([expert_dirs[d] for d in domains], domains=domains, base=base)
    assembled.save_pretrained(out / "moa_assembled", provenance={
        "assembled_from": {d: str(expert_dirs[d].resolve()) for d in domains}})
    check(train_mixture(moa_dir=out / "moa_assembled", data=data_dir / "train.jsonl", out=out / "moa",
                        eta=p.eta, router_lr=p.router_lr, cfg=cfg(p.stage2_steps, p.stage2_lr),
                        overwrite=overwrite, records=train, expert_lr_scaling=p.lr_scaling))
    timings["stage2"] = time.time() - t

    # Baseline: one LoRA on the mixed data, as many optimizer steps as (seed +) stage 1 + stage 2.
    t = time.time()
    mixed_steps = p.seed_steps + sum(expert_steps.values()) + p.stage2_steps
    check(train_expert(data=data_dir / "train.jsonl", domain=None, out=out / "mixed_lora", base=base, rank=p.rank,
                       alpha=p.alpha, cfg=cfg(mixed_steps, p.lr), overwrite=overwrite, records=train))
    timings["mixed_lora"] = time.time() - t

    extra, systems = {}, ["base", "single_lora", "mixed_lora", "moa"]
    if p.ablations:
        from moa.baselines import train_classifier, train_moe_lora

        t = time.time()
        for name, kw in (("moa_no_router_loss", {"eta": 0.0}), ("moa_random_init", {"init": "random"})):
            kw2 = {"eta": p.eta, **kw}
            check(train_mixture(moa_dir=out / "moa_assembled", data=data_dir / "train.jsonl", out=out / name,
                                router_lr=p.router_lr, overwrite=overwrite, records=train, desc=name,
                                expert_lr_scaling=p.lr_scaling,
                                cfg=cfg(p.stage2_steps, p.stage2_lr if "init" not in kw else p.lr), **kw2))
            extra[name] = str(out / name)
        # Parameter parity: one LoRA with rank x number of domains (same alpha / r scaling).
        wide = p.rank * len(domains)
        check(train_expert(data=data_dir / "train.jsonl", domain=None, out=out / "mixed_lora_wide", base=base,
                           rank=wide, alpha=p.alpha / p.rank * wide, cfg=cfg(mixed_steps, p.lr), overwrite=overwrite,
                           records=train))
        extra["mixed_lora_wide"] = str(out / "mixed_lora_wide")
        train_moe_lora(moa_dir=out / "moa_assembled", records=train, out=out / "moe_lora",
                       cfg=cfg(p.stage2_steps, p.stage2_lr), overwrite=overwrite)
        extra["moe_lora"] = str(out / "moe_lora")
        train_classifier(moa_dir=out / "moa_assembled", records=train, out=out / "classifier_loras", seed=seed)
        extra["classifier_loras"] = str(out / "classifier_loras")
        systems += ["moa_last", "moa_layer", *extra]
        timings["ablations"] = time.time() - t
        t = time.time()
        eta_runs = {p.eta: out / "moa", 0.0: out / "moa_no_router_loss"}
        for eta in p.eta_sweep:
            if eta not in eta_runs:
                eta_runs[eta] = out / f"moa_eta{eta:g}"
                check(train_mixture(moa_dir=out / "moa_assembled", data=data_dir / "train.jsonl", out=eta_runs[eta],
                                    eta=eta, router_lr=p.router_lr, cfg=cfg(p.stage2_steps, p.stage2_lr),
                                    overwrite=overwrite, records=train, desc=f"eta={eta:g}",
                                    expert_lr_scaling=p.lr_scaling))
        eta_sweep = sweep_report(eta_runs, data_dir / "valid.jsonl")
        timings["eta_sweep"] = time.time() - t

    # Routing report on the test split.
    t = time.time()
    test_path = data_dir / "test.jsonl"
    test, _ = read_records(test_path)
    moa = MoAModel.from_pretrained(out / "moa")
    examples, _ = encode_records(moa.tokenizer, test, 1024)
    preds, _ = route_records(moa, examples, "vote")
    route = routing_report([e.domain for e in examples], preds, list(moa.domains))
    atomic_write_json(out / "routing.json", route)
    plot_confusion(route, out / "routing_confusion.png", "MoA routing (vote), test split")
    del moa
    timings["routing"] = time.time() - t

    # Evaluation of every system.
    t = time.time()
    metrics = run_eval(out / "moa", test_path, out / "eval", systems, mixed_lora=out / "mixed_lora",
                       single_lora={d: expert_dirs[d] for d in domains}, extra=extra,
                       limit_per_domain=p.eval_per_domain, generate_limit_per_domain=p.generate_per_domain,
                       max_new_tokens=p.max_new_tokens, batch_size=8)
    timings["eval"] = time.time() - t
    timings["total"] = time.time() - t0
    metrics["routing_full_test"] = {"accuracy": route["accuracy"], "n": route["n"]}
    metrics["profile"] = {"name": profile, **asdict(p), "expert_steps_per_domain": expert_steps,
                          "mixed_lora_steps": mixed_steps}
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    if p.ablations:
        metrics["eta_sweep"] = eta_sweep
    atomic_write_json(out / "metrics.json", metrics)
    plot_all_losses(out, domains, out / "loss_curves.png", seed_dir)
    for f in (out / "eval").glob("metric_*.png"):
        (out / f.name).write_bytes(f.read_bytes())
    table = format_table(metrics)
    atomic_write_text(out / "report.md", render_report(metrics, route, table, profile, timings))
    print()
    print(table)
    print(f"\nrouting accuracy (vote, all {route['n']} test records): {route['accuracy']:.4f}")
    print(f"total time: {timings['total'] / 60:.1f} min; report: {out / 'report.md'}")
    return metrics


def sweep_report(runs: dict, valid_path: Path) -> dict:
    """Valid-split routing accuracy (vote) and mean per-domain PPL of each eta's checkpoint."""
    from moa.data import encode_records, read_records
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
            "mean_ppl": round(sum(v["ppl"] for v in ppl.values()) / len(ppl), 4),
            "ppl": {d: round(v["ppl"], 4) for d, v in ppl.items()},
        }
    best = min(report, key=lambda e: (-report[e]["routing_accuracy"], report[e]["mean_ppl"]))
    return {"runs": report, "best_eta": float(best), "criterion": "highest valid routing accuracy, then lowest mean PPL"}


def say(msg: str) -> None:
    print(f"moa: {msg}", file=sys.stderr, flush=True)


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
    log = _log(out / "mixed_lora")
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


def render_report(metrics: dict, route: dict, table: str, profile: str, timings: dict) -> str:
    domains = metrics["domains"]
    s = metrics["systems"]
    lines = [f"# moa demo report ({profile} profile)", "",
             f"Domains: {', '.join(domains)}. PPL on {_per_domain(metrics['profile']['eval_per_domain'])} test "
             f"records per domain, generation metrics on {_per_domain(metrics['profile']['generate_per_domain'])}; "
             f"routing on all {route['n']} test records.", "",
             _budget_line(metrics["profile"]), "",
             "## Results", "", table, "",
             f"Routing accuracy (vote, full test split): **{route['accuracy']:.4f}**", ""]
    if "moa" in s and "mixed_lora" in s:
        better = [d for d in domains if s["moa"][d]["ppl"] < s["mixed_lora"][d]["ppl"]]
        lines.append(f"MoA PPL below the mixed-data LoRA on {len(better)}/{len(domains)} domains"
                     f"{': ' + ', '.join(better) if better else ''}.")
    if "moa" in s and "single_lora" in s:
        gaps = {d: s["moa"][d]["ppl"] / s["single_lora"][d]["ppl"] - 1 for d in domains}
        lines.append("MoA PPL vs single-LoRA per domain: " +
                     ", ".join(f"{d} {100 * g:+.1f}%" for d, g in gaps.items()) + ".")
    if "eta_sweep" in metrics:
        sw = metrics["eta_sweep"]
        lines += ["", "## eta sweep (valid split)", "", "| eta | routing acc | mean PPL |", "|---|---|---|"]
        lines += [f"| {e} | {v['routing_accuracy']:.4f} | {v['mean_ppl']:.3f} |" for e, v in sw["runs"].items()]
        lines += ["", f"Best: eta = {sw['best_eta']:g} ({sw['criterion']})."]
    lines += ["", "## Plots", "", "![loss curves](loss_curves.png)", "",
              "![routing confusion](routing_confusion.png)", "", "![PPL per domain](metric_ppl.png)", "",
              "![exact match](metric_exact_match.png)", "", "## Time", "",
              ", ".join(f"{k}: {v / 60:.1f} min" for k, v in timings.items()), ""]
    return "\n".join(lines)


def _budget_line(prof: dict) -> str:
    seed = prof.get("seed_steps") or 0
    stage1 = sum(prof["expert_steps_per_domain"].values())
    parts = ([f"seed LoRA {seed}"] if seed else []) + [f"stage 1 {stage1}", f"stage 2 {prof['stage2_steps']}"]
    return (f"Optimizer steps (batch {prof['batch_size']}): MoA {' + '.join(parts)} = "
            f"{seed + stage1 + prof['stage2_steps']}; mixed-data LoRA {prof['mixed_lora_steps']}.")


def _per_domain(n: int | None) -> str:
    return "all" if n is None else f"up to {n}"
