"""`moa eval`: per-domain PPL, BLEU, ROUGE-L, exact match and routing accuracy of MoA and baselines."""

from __future__ import annotations

from moa.cli.options import add_device_args, add_fallback_arg
from moa.errors import MoAError
from moa.cli.judge import add_eval_judge_args
from moa.evaluate import DEFAULT_SYSTEMS, GENERATE_BATCH_SIZE
from moa.router import ROUTINGS

def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="per-domain PPL, BLEU, ROUGE-L, exact match and routing accuracy of MoA and baselines",
        description="Evaluate systems on a labelled test set and write metrics.json, generations.jsonl "
                    "and per-metric bar plots. Text metrics use greedy generation.",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--data", required=True, help="labelled test JSONL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS,
                   help="systems to evaluate: base single_lora mixed_lora moa moa_last moa_layer moa_explicit "
                        "or NAME=DIR (an MoA checkpoint or PEFT adapter)")
    p.add_argument("--routing", choices=ROUTINGS[1:], default="vote", help="routing of the 'moa' system")
    p.add_argument("--mixed-lora", default=None, help="PEFT adapter trained on the mixed data (system mixed_lora)")
    p.add_argument("--single-lora", default=None,
                   help="directory with one stage-1 adapter per domain (DIR/<domain>/); default: the MoA's provenance")
    p.add_argument("--limit", type=int, default=None, help="at most N records per domain")
    p.add_argument("--generate-limit", type=int, default=None,
                   help="generate (BLEU, ROUGE-L, exact match) for the first N records per domain only; "
                        "PPL and routing still use every record")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per record")
    p.add_argument("--batch-size", type=int, default=8, help="records scored together")
    p.add_argument("--generate-batch-size", type=int, default=GENERATE_BATCH_SIZE,
                   help="prompts generated together (greedy decoding reads the weights once per step "
                        "for all of them)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (PPL and routing only)")
    add_eval_judge_args(p)
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from moa.cli.judge import check_eval_judge_args, judge_after_eval
    from moa.evaluate import format_table, run_eval

    check_eval_judge_args(args)
    if args.judge_url and args.no_generate:
        raise MoAError("--judge-url judges the generations; it cannot be used with --no-generate")
    systems, extra = [], {}
    for s in args.systems:
        if "=" in s:
            name, path = s.split("=", 1)
            extra[name] = path
            systems.append(name)
        else:
            systems.append(s)
    metrics = run_eval(args.moa, args.data, args.out, systems, routing=args.routing, mixed_lora=args.mixed_lora,
                       single_lora=args.single_lora, extra=extra, limit_per_domain=args.limit,
                       generate_limit_per_domain=args.generate_limit, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, generate=not args.no_generate,
                       fallback=args.fallback, generate_batch_size=args.generate_batch_size)
    print(format_table(metrics))
    judge_after_eval(args, metrics)
    return 0
