"""`moa score`: per-record log-likelihood of the responses and per-domain perplexity."""

from __future__ import annotations

import json
import sys

from moa.cli.options import add_device_args, add_fallback_arg
from moa.base import DEFAULT_BASE
from moa.errors import MoAError
from moa.router import ROUTINGS

def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="log-likelihood of each record's response; per-domain perplexity",
        description="Score each record's assistant response (sum of token log-probabilities) under the "
                    "base model, a PEFT adapter, or an MoA checkpoint. Writes one JSON line per record "
                    "and prints the per-domain perplexity as JSON.",
    )
    p.add_argument("--data", required=True, help="JSONL file to score")
    p.add_argument("--out", required=True, help="output JSONL (one line per scored record)")
    p.add_argument("--base", default=None, help=f"base model (default: {DEFAULT_BASE}, or the MoA checkpoint's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply to the base")
    src.add_argument("--moa", default=None, help="an MoA checkpoint directory")
    p.add_argument("--routing", default="vote", choices=ROUTINGS,
                   help="with --moa: how the expert is chosen (explicit uses each record's domain label)")
    p.add_argument("--domain", default=None, help="score only the records of this domain (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="records scored together")
    p.add_argument("--max-length", type=int, default=1024, help="truncate records to this many tokens")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad JSONL lines instead of stopping")
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_score)


def _cmd_score(args) -> int:
    from moa.data import encode_records, read_records, select_domains
    from moa.io import atomic_write_text
    from moa.scoring import causal_lm_forward, load_peft_adapter, moa_forward, score_examples, summarize

    if args.batch_size <= 0:
        raise MoAError(f"--batch-size must be positive, got {args.batch_size}")
    records, skipped = read_records(args.data, skip_invalid=args.skip_invalid)
    if skipped:
        print(f"moa: skipped {skipped} invalid line(s) in {args.data}", file=sys.stderr)
    if args.domain:
        records = select_domains(records, [args.domain], args.data)
    if args.moa:
        forward, tok = moa_forward(args.moa, args.routing, args.base, args.fallback)
    else:
        from moa.base import load_base

        from moa.layers import use_cpu_gemm

        model, tok = load_base(args.base or DEFAULT_BASE)
        use_cpu_gemm(model)  # oneDNN at float32 CPU inference, as MoA checkpoints score
        if args.adapter:
            model = load_peft_adapter(model, args.adapter)
        forward = causal_lm_forward(model)
    examples, truncated = encode_records(tok, records, args.max_length)
    if truncated:
        print(f"moa: truncated {truncated} record(s) to --max-length {args.max_length}", file=sys.stderr)
    rows = score_examples(forward, examples, tok.pad_token_id, args.batch_size)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(summarize(rows)))
    return 0
