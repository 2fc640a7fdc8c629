"""`moa assemble`, `moa route` and `moa generate`: build an MoA checkpoint, measure its routing,
and generate with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moa.errors import MoAError

ROUTINGS = ["vote", "last", "layer"]


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing MoA checkpoint at --out")
    p.set_defaults(func=_cmd_assemble)

    p = sub.add_parser(
        "route",
        help="routing accuracy of an MoA checkpoint on labelled records",
        description="Route every record's prompt and compare the chosen expert with its domain label. "
                    "Writes JSON (accuracy, per_domain, confusion) and a confusion-matrix PNG next to it.",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--data", required=True, help="labelled JSONL records")
    p.add_argument("--routing", choices=ROUTINGS, default="vote", help="routing decision (default: vote)")
    p.add_argument("--out", required=True, help="report JSON path (the PNG goes next to it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--skip-invalid", action="store_true", help="skip bad JSONL lines instead of stopping")
    p.set_defaults(func=_cmd_route)

    p = sub.add_parser(
        "generate",
        help="generate a reply with automatic (or explicit) expert choice",
        description="Generate a reply to one user prompt. By default the routers choose the expert "
                    "(vote of all layer routers); --domain forces one.",
    )
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--domain", default=None, help="force this expert (explicit routing)")
    p.add_argument("--routing", choices=ROUTINGS, default="vote")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print a JSON object (text, domain, router_probs)")
    p.set_defaults(func=_cmd_generate)


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
    out = Path(args.out)
    if (out / "moa_config.json").exists() and not args.overwrite:
        raise MoAError(f"--out {out} already holds an MoA checkpoint; pass --overwrite to replace it")
    model = MoAModel.from_adapters(dirs, domains=domains, base=args.base)
    model.save_pretrained(out, provenance={"assembled_from": {d: str(p.resolve()) for d, p in zip(domains, dirs)}})
    print(json.dumps({"out": str(out), "domains": domains}))
    return 0


@torch.no_grad()
def route_records(model, examples, routing: str = "vote", batch_size: int = 16, progress: bool = True):
    """Route each example's prompt. Returns (predicted domain per example, probs (N, E) or None)."""
    from tqdm.auto import tqdm

    from moa.data import Example, collate

    prompts = [Example(e.input_ids[: e.prompt_len], [-100] * e.prompt_len, e.prompt_len, e.domain, e.index)
               for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    preds: list[str] = [""] * len(prompts)
    probs = torch.zeros(len(prompts), len(model.domains))
    with tqdm(total=len(prompts), desc=f"route ({routing})", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = collate([prompts[i] for i in idx], model.tokenizer.pad_token_id, padding_side="left")
            ids, probs_b = model.route(b["input_ids"], b["attention_mask"], routing=routing)
            for k, i in enumerate(idx):
                preds[i] = model.domains[int(ids[k])]
                if probs_b is not None:
                    probs[i] = probs_b[k].float()
            bar.update(len(idx))
    return preds, probs


def routing_report(labels: list[str], preds: list[str], domains: list[str]) -> dict:
    """accuracy, per_domain accuracy and confusion {true: {predicted: count}}."""
    confusion = {d: {p: 0 for p in domains} for d in sorted(set(labels), key=lambda d: (d not in domains, d))}
    for t, p in zip(labels, preds):
        confusion[t][p] = confusion[t].get(p, 0) + 1
    per = {d: (row.get(d, 0) / max(1, sum(row.values()))) for d, row in confusion.items()}
    acc = sum(t == p for t, p in zip(labels, preds)) / max(1, len(labels))
    return {"accuracy": acc, "per_domain": per, "confusion": confusion, "n": len(labels)}


def plot_confusion(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["confusion"])
    cols = list(next(iter(report["confusion"].values())).keys()) if rows else []
    m = torch.tensor([[report["confusion"][r].get(c, 0) for c in cols] for r in rows], dtype=torch.float)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.6 * len(rows)), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("routed to")
    ax.set_ylabel("domain label")
    ax.set_title(f"{title}: accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cmd_route(args) -> int:
    from moa.data import encode_records, read_records
    from moa.io import atomic_write_json
    from moa.model import MoAModel

    records, skipped = read_records(args.data, skip_invalid=args.skip_invalid)
    if skipped:
        print(f"moa: skipped {skipped} invalid line(s) in {args.data}", file=sys.stderr)
    model = MoAModel.from_pretrained(args.moa)
    examples, _ = encode_records(model.tokenizer, records, args.max_length)
    preds, _ = route_records(model, examples, args.routing, args.batch_size)
    report = routing_report([e.domain for e in examples], preds, list(model.domains))
    report["routing"] = args.routing
    out = Path(args.out)
    atomic_write_json(out, report)
    plot_confusion(report, out.with_suffix(".png"), f"routing ({args.routing})")
    print(json.dumps({"accuracy": round(report["accuracy"], 4), "per_domain": report["per_domain"]}))
    return 0


def _cmd_generate(args) -> int:
    from moa.model import MoAModel

    if not args.prompt.strip():
        raise MoAError("the prompt is empty")
    model = MoAModel.from_pretrained(args.moa)
    routing = "explicit" if args.domain else args.routing
    res = model.generate(
        [args.prompt], routing=routing, domains=[args.domain] if args.domain else None,
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
        top_p=args.top_p, seed=args.seed,
    )[0]
    if args.json:
        print(json.dumps({"text": res.text, "domain": res.domain, "router_probs": res.router_probs,
                          "routing": routing}))
    else:
        print(f"[{res.domain}] {res.text}")
    return 0
