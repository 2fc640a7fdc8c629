"""`moa judge` and the judge options of `moa eval` (the judging itself is `moa.judge`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from moa.errors import MoAError


def add_endpoint_args(p, prefix: str = "") -> None:
    """The judge endpoint's options; `prefix` ("judge-") names them apart inside `moa eval`."""
    g = p.add_argument_group("judge")
    dest = prefix.replace("-", "_")
    if prefix:
        g.add_argument("--judge-url", default=None, metavar="URL",
                       help="also judge the generations with an LLM behind this OpenAI-compatible base URL "
                            "(e.g. https://api.openai.com/v1); results under OUT/judge")
    else:
        g.add_argument("--judge-url", required=True, metavar="URL",
                       help="OpenAI-compatible base URL of the judge, e.g. https://api.openai.com/v1 or a "
                            "`moa serve` at http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", required=not prefix, default=None, metavar="NAME",
                   help="the judge model's name at that endpoint (e.g. gpt-4o)")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default: OPENAI_API_KEY; unset: no key sent)")
    g.add_argument(f"--{prefix}mode", dest=f"{dest}mode", choices=["pairwise", "single"], default="pairwise",
                   help="pairwise: A vs B, both orders, a win only when both agree (default); "
                        "single: each answer rated 1-10")
    g.add_argument(f"--{prefix}template", dest=f"{dest}template", default=None, metavar="FILE",
                   help="prompt template with {question} {reference} {domain} and {answer_a} {answer_b} "
                        "(pairwise) or {answer} (single); default: the ones shipped in moa/judge_templates/")
    g.add_argument(f"--{prefix}concurrency", dest=f"{dest}concurrency", type=int, default=4, metavar="N",
                   help="requests in flight at once (default: 4)")
    g.add_argument(f"--{prefix}max-retries", dest=f"{dest}max_retries", type=int, default=5, metavar="N",
                   help="retries of a request answered 429 or 5xx, with exponential backoff (default: 5)")
    g.add_argument(f"--{prefix}retry-backoff", dest=f"{dest}retry_backoff", type=float, default=1.0, metavar="S",
                   help="seconds before the first retry, doubled each time (default: 1)")
    g.add_argument(f"--{prefix}max-tokens", dest=f"{dest}max_tokens", type=int, default=512, metavar="N",
                   help="longest verdict, in tokens (default: 512)")
    g.add_argument(f"--{prefix}timeout", dest=f"{dest}timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for one answer (default: 120)")


def _endpoint_kwargs(args, prefix: str = "") -> dict:
    var = args.judge_api_key_env
    key = os.environ.get(var) or None
    return {
        "url": args.judge_url, "model": args.judge_model, "api_key": key,
        "key_hint": f"${var} is not set" if key is None else f"the key in ${var} was refused",
        "mode": getattr(args, f"{prefix}mode"), "template": getattr(args, f"{prefix}template"),
        "concurrency": getattr(args, f"{prefix}concurrency"), "max_retries": getattr(args, f"{prefix}max_retries"),
        "backoff_s": getattr(args, f"{prefix}retry_backoff"), "max_tokens": getattr(args, f"{prefix}max_tokens"),
        "timeout_s": getattr(args, f"{prefix}timeout"),
    }


def register(sub) -> None:
    p = sub.add_parser(
        "judge",
        help="LLM-as-judge over moa eval's generations: pairwise win/tie/loss or 1-10 ratings",
        description="Judge the answers in a generations.jsonl (written by `moa eval`) with an LLM behind any "
                    "OpenAI-compatible endpoint. The judge sees the reference answer. Pairwise: every pair is "
                    "judged in both orders and counts as a win only when both agree; an unparseable verdict "
                    "is asked for once more, then recorded as invalid (a tie). Writes OUT/judgments.jsonl and "
                    "OUT/summary.json; judgments are cached in OUT, so a re-run sends no request.",
    )
    p.add_argument("--generations", required=True, metavar="FILE", help="generations.jsonl from `moa eval`")
    p.add_argument("--a", required=True, metavar="SYSTEM", help="the system judged (e.g. moa)")
    p.add_argument("--b", default=None, metavar="SYSTEM",
                   help="the system it is judged against (pairwise; e.g. mixed_lora); in single mode also rated")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (also holds the cache)")
    add_endpoint_args(p)
    p.set_defaults(func=_cmd_judge)


def _cmd_judge(args) -> int:
    from moa.judge import format_summary, run_judge

    summary = run_judge(generations=args.generations, a=args.a, b=args.b, out=args.out, **_endpoint_kwargs(args))
    print(format_summary(summary))
    print(f"moa: wrote {Path(args.out) / 'summary.json'}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- moa eval --judge-url


def add_eval_judge_args(p) -> None:
    add_endpoint_args(p, prefix="judge-")
    p.add_argument("--judge-a", default="moa", metavar="SYSTEM", help="system judged (default: moa)")
    p.add_argument("--judge-b", default=None, metavar="SYSTEM",
                   help="system it is judged against (default: mixed_lora if evaluated, else the first other system)")


def check_eval_judge_args(args) -> None:
    """Fail on bad judge options before the (long) evaluation runs."""
    from moa.judge import check_url, load_template

    if not args.judge_url:
        return
    if not args.judge_model:
        raise MoAError("--judge-url needs --judge-model NAME")
    check_url(args.judge_url)
    load_template(args.judge_mode, args.judge_template)


def judge_after_eval(args, metrics: dict) -> dict | None:
    """Judge OUT/generations.jsonl of the eval that just ran; results under OUT/judge."""
    from moa.judge import format_summary, run_judge

    if not args.judge_url:
        return None
    systems = list(metrics["systems"])
    a = args.judge_a
    b = args.judge_b or ("mixed_lora" if "mixed_lora" in systems and a != "mixed_lora" else
                         next((s for s in systems if s != a), None))
    if a not in systems or (b is None and args.judge_mode == "pairwise"):
        raise MoAError(f"--judge-a {a} / --judge-b {b}: judging needs them among the evaluated systems "
                       f"({', '.join(systems)})")
    summary = run_judge(generations=Path(args.out) / "generations.jsonl", a=a, b=b, out=Path(args.out) / "judge",
                        **_endpoint_kwargs(args, prefix="judge_"))
    print(format_summary(summary))
    return summary
