"""`moa assemble`, `moa route`, `moa generate` and `moa chat`: build an MoA checkpoint, measure
its routing, and generate with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moa.cli.options import add_device_args, add_fallback_arg
from moa.errors import MoAError
from moa.fallback import DEFAULT_ACCEPTANCE
from moa.router import ROUTINGS


def register(sub) -> None:
    p = sub.add_parser(
        "assemble",
        help="build an MoA checkpoint from stage-1 PEFT adapters",
        description="Put stage-1 PEFT LoRA adapters side by side as the experts of one MoA checkpoint "
                    "(routers freshly initialised; train them with `moa train`).",
    )
    p.add_argument("--experts", nargs="+", required=True, metavar="DIR", help="PEFT adapter directories")
    p.add_argument("--out", required=True, help="output MoA checkpoint directory")
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapters)")
    p.add_argument("--domains", default=None, help="comma-separated domain names (default: the directory names)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_device_args(p)
    p.set_defaults(func=_cmd_assemble)

    p = sub.add_parser(
        "route",
        help="routing accuracy of an MoA checkpoint on labelled records",
        description="Route every record's prompt and compare the chosen expert with its domain label. "
                    "Writes JSON (accuracy, per_domain, confusion) and a confusion-matrix PNG next to it.",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--data", required=True, help="labelled JSONL records")
    p.add_argument("--routing", choices=ROUTINGS[1:], default="vote", help="routing decision")
    p.add_argument("--out", required=True, help="report JSON path (the PNG goes next to it)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts routed together")
    p.add_argument("--max-length", type=int, default=1024, help="truncate records to this many tokens")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad JSONL lines instead of stopping")
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_route)

    p = sub.add_parser(
        "calibrate",
        help="calibrate the out-of-domain fallback of an MoA checkpoint",
        description="Measure how far prompts lie from the domains and store a fallback threshold in the "
                    "checkpoint: under vote/last routing a prompt beyond it goes to the base model with no expert "
                    "(domain null). The domain centroids come from --train, the threshold from --valid so that "
                    "the fraction --acceptance of its prompts keep their expert. Writes the checkpoint in place "
                    "(or into --out): a 'fallback' block in moa_config.json plus fallback.safetensors. Prints a "
                    "JSON summary.",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--train", required=True, metavar="FILE", help="labelled training JSONL (the domain centroids)")
    p.add_argument("--valid", required=True, metavar="FILE", help="labelled validation JSONL (the threshold)")
    p.add_argument("--out", default=None, help="write the calibrated checkpoint here (default: --moa, in place)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--method", choices=["distance", "msp", "energy"], default="distance",
                   help="the score: distance (diagonal Mahalanobis distance of the pooled prompt to the nearest "
                        "domain centroid), msp (1 - the routers' top probability) or energy (-logsumexp of the "
                        "router logits); docs/RESULTS.md compares them")
    p.add_argument("--acceptance", type=float, default=DEFAULT_ACCEPTANCE,
                   help="fraction of the in-domain validation prompts the threshold keeps")
    p.add_argument("--layers", default=None, metavar="L,L,...",
                   help="distance: candidate layers whose pooled input is compared (the one that best rejects a "
                        "held-out domain is kept; ties: the deepest) (default: the layers at 40%%, 50%% and 60%% of the "
                        "depth)")
    p.add_argument("--references", default="default", metavar="default|none|FILE",
                   help="prompts of no domain (JSONL, as `moa generate` reads): among distance layers that tie on "
                        "held-out domains, the one that rejects them most is kept; where they lie beyond the in-domain "
                        "threshold, it moves to the middle of the gap (a margin for new in-domain prompts); "
                        "default: 100 bundled everyday questions; none: no margin")
    p.add_argument("--batch-size", type=int, default=16, help="prompts routed together")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad JSONL lines instead of stopping")
    add_device_args(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "generate",
        help="generate replies with automatic (or explicit) expert choice",
        description="Generate a reply to one user prompt, or to every prompt of a JSONL file (--input FILE, "
                    "'-' for stdin; lines {\"prompt\": ...} or {\"messages\": [...]}, an optional \"domain\" "
                    "forces that line's expert). By default the routers choose the expert (vote of all layer "
                    "routers); --domain forces one for every prompt. With --input the output is JSONL "
                    "(one object per prompt, in input order).",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the user's message (or use --input)")
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--input", default=None, metavar="FILE", help="JSONL prompts, '-' = stdin (default: none)")
    p.add_argument("--out", default=None, metavar="FILE", help="with --input: write the JSONL here, not to stdout")
    p.add_argument("--batch-size", type=int, default=8, help="with --input: prompts generated together")
    _add_decoding_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON object (text, domain, router_probs)")
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive multi-turn chat in the terminal, showing the expert of every turn",
        description="Chat with an MoA checkpoint. Every turn is routed on the whole conversation so far and "
                    "printed as '[domain] reply'. Commands: /domain NAME (force an expert), /domain auto, "
                    "/reset (forget the conversation), /quit (or Ctrl-D).",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--system", default=None, help="a system message that starts the conversation "
                   "(default: none)")
    _add_decoding_args(p)
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_chat)


def _add_decoding_args(p) -> None:
    p.add_argument("--domain", default=None, help="force this expert (explicit routing; default: the routers)")
    p.add_argument("--routing", choices=ROUTINGS[1:], default="vote", help="how the routers decide")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")


def _cmd_assemble(args) -> int:
    from moa.model import MoAModel

    dirs = [Path(d) for d in args.experts]
    for d in dirs:
        if not (d / "adapter_config.json").is_file():
            raise MoAError(f"{d} is not a PEFT adapter directory (no adapter_config.json)")
    domains = [x.strip() for x in args.domains.split(",")] if args.domains else [d.name for d in dirs]
    if len(domains) != len(dirs):
        raise MoAError(f"--domains names {len(domains)} domains for {len(dirs)} adapter directories")
    if len(set(domains)) != len(domains) or not all(domains):
        raise MoAError(f"domain names must be distinct and non-empty: {', '.join(domains)}")
    from moa.io import check_out_dir

    out = check_out_dir(args.out, overwrite=args.overwrite, protect=dirs)
    model = MoAModel.from_adapters(dirs, domains=domains, base=args.base)
    model.save_pretrained(out, provenance={"assembled_from": {d: str(p.resolve()) for d, p in zip(domains, dirs)}})
    print(json.dumps({"out": str(out), "domains": domains}))
    return 0


def _cmd_route(args) -> int:
    from moa.data import encode_records, read_records
    from moa.io import atomic_write_json
    from moa.evaluate import plot_confusion, route_records, routing_report

    records, skipped = read_records(args.data, skip_invalid=args.skip_invalid)
    if skipped:
        print(f"moa: skipped {skipped} invalid line(s) in {args.data}", file=sys.stderr)
    model = _load(args)
    examples, _ = encode_records(model.tokenizer, records, args.max_length)
    preds, _ = route_records(model, examples, args.routing, args.batch_size)
    report = routing_report([e.domain for e in examples], preds, list(model.domains))
    report["routing"] = args.routing
    report["fallback_threshold"] = None if model.fallback is None else model.fallback.threshold
    out = Path(args.out)
    atomic_write_json(out, report)
    plot_confusion(report, out.with_suffix(".png"), f"routing ({args.routing})")
    print(json.dumps({"accuracy": round(report["accuracy"], 4), "per_domain": report["per_domain"],
                      "fallback": round(report["fallback"], 4)}))
    return 0


def _load(args):
    """The checkpoint of --moa with its --fallback in force."""
    from moa.fallback import set_fallback
    from moa.model import MoAModel

    model = MoAModel.from_pretrained(args.moa)
    set_fallback(model, args.fallback)
    return model


def _cmd_calibrate(args) -> int:
    from moa.data import read_records
    from moa.fallback import calibrate_checkpoint, resolve_references

    if args.batch_size < 1:
        raise MoAError(f"--batch-size must be >= 1, got {args.batch_size}")
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise MoAError(f"--layers must be comma-separated layer numbers like 0,1,2, got {args.layers!r}") from None
    records = {}
    for name in ("train", "valid"):
        records[name], skipped = read_records(getattr(args, name), skip_invalid=args.skip_invalid)
        if skipped:
            print(f"moa: skipped {skipped} invalid line(s) in {getattr(args, name)}", file=sys.stderr)
    summary = calibrate_checkpoint(args.moa, records["train"], records["valid"], args.out, method=args.method,
                                   acceptance=args.acceptance, layers=layers, batch_size=args.batch_size,
                                   overwrite=args.overwrite, references=resolve_references(args.references))
    print(json.dumps(summary))
    return 0


def _decoding(args) -> dict:
    if args.max_new_tokens < 1:
        raise MoAError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed)


def _result_json(res, routing: str) -> dict:
    return {"text": res.text, "domain": res.domain, "router_probs": res.router_probs, "routing": routing,
            "fallback": _fell_back(res, routing), "finish_reason": res.finish_reason}


def _fell_back(res, routing: str) -> bool:
    """Routed, yet no expert: the out-of-domain fallback chose the base model."""
    return routing in ("vote", "last") and res.domain is None


def _label(res, routing: str) -> str:
    return "base (fallback)" if _fell_back(res, routing) else str(res.domain)


def _cmd_generate(args) -> int:
    if (args.prompt is None) == (args.input is None):
        raise MoAError("give one prompt or --input FILE (JSONL, '-' for stdin), not both and not neither")
    if args.prompt is not None and not args.prompt.strip():
        raise MoAError("the prompt is empty")
    if args.batch_size < 1:
        raise MoAError(f"--batch-size must be >= 1, got {args.batch_size}")
    decoding = _decoding(args)
    if args.input is not None:
        from moa.data import read_prompts

        if args.input == "-":
            prompts = read_prompts(sys.stdin, "stdin")
        else:
            path = Path(args.input)
            if not path.is_file():
                raise MoAError(f"--input {path}: no such file")
            with open(path, encoding="utf-8") as f:
                prompts = read_prompts(f, str(path))
    else:
        prompts = [([{"role": "user", "content": args.prompt}], None)]
    model = _load(args)
    for _, d in prompts:
        if d is not None:
            model.domain_index(d)  # an unknown domain fails before any generation
    if args.domain:
        model.domain_index(args.domain)
    results = _generate_all(model, prompts, args.domain, args.routing, args.batch_size, decoding)
    if args.input is None:
        res, routing = results[0]
        print(json.dumps(_result_json(res, routing)) if args.json else f"[{_label(res, routing)}] {res.text}")
        return 0
    lines = "".join(json.dumps({"index": i, **_result_json(res, routing)}) + "\n"
                    for i, (res, routing) in enumerate(results))
    if args.out:
        from moa.io import atomic_write_text

        atomic_write_text(args.out, lines)
    else:
        sys.stdout.write(lines)
    return 0


def _generate_all(model, prompts, domain, routing, batch_size, decoding) -> list:
    """[(GenerationResult, routing used)] in input order; prompts that force a domain (their own or
    --domain) are generated explicitly, the others with the routers, each group in batches."""
    from tqdm.auto import tqdm

    groups: dict[str | None, list[int]] = {}
    for i, (_, d) in enumerate(prompts):
        groups.setdefault(domain or d, []).append(i)
    out: list = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", disable=len(prompts) < 2, dynamic_ncols=True) as bar:
        for forced, idx in groups.items():
            how = "explicit" if forced else routing
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                res = model.generate([prompts[i][0] for i in chunk], routing=how,
                                     domains=[forced] * len(chunk) if forced else None, **decoding)
                for i, r in zip(chunk, res):
                    out[i] = (r, how)
                bar.update(len(chunk))
    return out


def _cmd_chat(args) -> int:
    decoding = _decoding(args)
    model = _load(args)
    forced = args.domain
    if forced:
        model.domain_index(forced)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    print(f"moa chat: experts {', '.join(model.domains)}; /domain NAME|auto, /reset, /quit", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = list(start)
            print("moa chat: conversation cleared", file=sys.stderr)
            continue
        if text.startswith("/domain"):
            name = text[len("/domain"):].strip()
            if name in ("", "auto"):
                forced = None
            elif name in model.domains:
                forced = name
            else:
                print(f"moa chat: unknown domain '{name}' (experts: {', '.join(model.domains)})", file=sys.stderr)
                continue
            print(f"moa chat: expert {forced or 'chosen by the routers'}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        res = model.generate([history], routing="explicit" if forced else args.routing,
                             domains=[forced] if forced else None, **decoding)[0]
        history.append({"role": "assistant", "content": res.text})
        print(f"[{_label(res, 'explicit' if forced else args.routing)}] {res.text}", flush=True)
    return 0
