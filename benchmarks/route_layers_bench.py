"""Early-exit routing: routing accuracy against K (the routers of the first K layers decide),
and what the routing part of the model costs, in one run.

    python benchmarks/route_layers_bench.py --moa /tmp/pg_demo/moa --data data/demo/test.jsonl

Accuracy: one routing pass of the whole model over every test prompt (chat template, as `moa
serve` renders it) gives every layer's router logits; the decision with K layers is the vote
(or router K alone: "last") of the first K of them. That is exactly what K-layer routing
computes, since the pass is causal in depth (tests/test_gateway.py checks that the K-layer
routing part decides as the full model with route_layers=K); the K-layer part is also loaded
and checked against it on the first batch here.
Cost: for every K in --ks (default 1, 2, 4, ... and all layers), the parameters kept by
`moa.checkpoint.load_routing_part` and its routing prompts/s on --time-prompts prompts (mixed
domains, batches of --batch-size, best of --rounds).
"""

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moa", required=True, help="a trained MoA checkpoint")
    ap.add_argument("--data", default="data/demo/test.jsonl", help="labelled JSONL (domain + messages)")
    ap.add_argument("--ks", default=None, help="comma-separated K values (default: 1,2,4,... and all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--time-prompts", type=int, default=64, help="prompts timed per K")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds per K (best is kept)")
    args = ap.parse_args()

    import torch

    from moa.checkpoint import MoAConfig, load_routing_part
    from moa.data import read_records
    from moa.generation import encode_prompts
    from moa.model import MoAModel
    from moa.router import decide

    cfg = MoAConfig.read(args.moa)
    L = cfg.base_signature["num_hidden_layers"]
    ks = [int(k) for k in args.ks.split(",")] if args.ks else sorted({*(2 ** i for i in range(L.bit_length()) if 2 ** i < L), L})
    records, _ = read_records(args.data)
    records = [r for r in records if r.domain in cfg.domains]
    labels = torch.tensor([cfg.domains.index(r.domain) for r in records])  # (N,)
    prompts = [r.prompt_messages for r in records]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    full = MoAModel.from_pretrained(args.moa)
    full_params = sum(p.numel() for p in full.parameters())
    print(f"{args.moa}: {len(records)} prompts of {len(cfg.domains)} domains from {args.data}; "
          f"{L} layers; full model {full_params / 1e6:.1f} M parameters; torch threads {torch.get_num_threads()}",
          flush=True)
    per_layer = []  # per batch: [(B, E)] * L
    with torch.inference_mode():
        for b in batches:
            ids, mask = encode_prompts(full, b)
            per_layer.append(full._route(ids, mask, mask.bool(), (mask.cumsum(-1) - 1).clamp(min=0), "vote")[2])
    # timing prompts: the domains interleaved
    groups = [[i for i in range(len(prompts)) if labels[i] == e] for e in range(len(cfg.domains))]
    order = [i for group in zip(*(g for g in groups if g)) for i in group]
    timed = [prompts[i] for i in order[: args.time_prompts]]
    timed_batches = [timed[i:i + args.batch_size] for i in range(0, len(timed), args.batch_size)]
    rows = []
    for K in ks:
        acc = {}
        for how in ("vote", "last"):
            picks = torch.cat([decide(logits[:K], how)[0] for logits in per_layer])
            acc[how] = (picks == labels).float().mean().item()
        part = load_routing_part(MoAModel, args.moa, K)
        kept = sum(p.numel() for p in part.parameters() if p.device.type != "meta")
        encoded = [encode_prompts(part, b) for b in timed_batches]
        with torch.inference_mode():
            ids, mask = encode_prompts(part, batches[0])
            assert torch.equal(part.route(ids, mask)[0], decide(per_layer[0][:K], "vote")[0]), "K-layer part differs"
            best = float("inf")
            for _ in range(args.rounds):
                start = time.perf_counter()
                for ids, mask in encoded:
                    part.route(ids, mask)
                best = min(best, time.perf_counter() - start)
        rows.append((K, acc["vote"], acc["last"], kept, len(timed) / best))
        print(f"K={K:3d}  vote {acc['vote']:.2%}  last {acc['last']:.2%}  params {kept / 1e6:7.1f} M "
              f"({kept / full_params:.0%})  routing {len(timed) / best:7.1f} prompts/s", flush=True)
    print("\n| K | accuracy (vote of K routers) | accuracy (router K alone) | parameters kept | routing prompts/s |")
    print("|---|---|---|---|---|")
    for K, v, last, kept, rate in rows:
        print(f"| {K}{' (all)' if K == L else ''} | {v:.1%} | {last:.1%} | {kept / 1e6:.1f} M "
              f"({kept / full_params:.0%}) | {rate:.1f} |")


if __name__ == "__main__":
    main()
