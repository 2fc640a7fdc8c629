"""`moa export`: the experts as PEFT adapters, a merged transformers checkpoint, or for vLLM."""

from __future__ import annotations

import json
from pathlib import Path

from moa.cli.options import add_device_args
from moa.export import DTYPES, FORMATS

def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export experts as PEFT adapters, a merged transformers checkpoint, or for vLLM",
        description="Export a MoA checkpoint's experts for other tools. "
                    "peft: each expert as a PEFT LoRA adapter directory OUT/<domain>/. "
                    "merged: one domain's expert folded into the base weights (W + scaling * B @ A), "
                    "a plain transformers checkpoint with the tokenizer (needs --domain). "
                    "vllm: the adapters plus OUT/serve_vllm.sh (vllm serve ... --enable-lora "
                    "--lora-modules d=path ...) and OUT/README.md; there the client picks the domain "
                    "with \"model\": \"<domain>\" (no router; `moa serve` routes automatically).",
    )
    p.add_argument("--moa", required=True, help="the MoA checkpoint directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="peft, merged or vllm (see above)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--domain", default=None,
                   help="export only this domain's expert (required for --format merged)")
    p.add_argument("--base", default=None,
                   help="base model to merge into / record (default: the one the checkpoint records)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="merged only: dtype of the written weights (the merge itself runs in float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    add_device_args(p, dtype=False)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from moa.export import export_merged, export_peft, export_vllm, read_checkpoint

    if args.format == "merged":
        export_merged(args.moa, args.out, args.domain, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
        domains = [args.domain]
    elif args.format == "peft":
        domains = [p.name for p in export_peft(args.moa, args.out, args.domain, base=args.base,
                                               overwrite=args.overwrite)]
    else:
        export_vllm(args.moa, args.out, args.domain, base=args.base, overwrite=args.overwrite)
        domains = read_checkpoint(args.moa, args.base).select(args.domain)
    print(json.dumps({"format": args.format, "out": str(Path(args.out).resolve()), "domains": domains}))
    return 0
