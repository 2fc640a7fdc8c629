"""One point of the demo's hyperparameter search, scored on the valid split (never on test).

Trains the stage-1 experts (steps shared by size ** allocation), assembles, runs stage 2 and,
unless --no-mixed, the mixed-data LoRA with as many steps, then prints valid-split PPL per
domain of single_lora, mixed_lora and moa (vote routing) and writes OUT/valid_metrics.json.

    python scripts/tune_demo.py --lr-scaling --allocation 1 --stage2-lr 1e-3 --out runs/tune/a   # the quick profile
    python scripts/tune_demo.py --stage2-lr 4e-4 --allocation 0.5 --out runs/tune/b --mixed-from runs/tune/a/mixed_lora

The table in docs/RESULTS.md ("How the quick profile's settings were chosen") came from these
runs (eta 0.1, the mixed LoRA of one run reused by the others with --mixed-from).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moa.data import domains_of, read_records
from moa.demo import bundled_data_dir
from moa.fit import allocate_steps
from moa.evaluate import run_eval
from moa.model import MoAModel
from moa.stages import train_expert, train_mixture
from moa.trainer import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="directory with train/valid.jsonl (default: data/demo)")
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=2e-3, help="stage-1 (and mixed LoRA) lr")
    p.add_argument("--stage2-lr", type=float, default=4e-4, help="stage-2 expert lr (the reference lr with --lr-scaling)")
    p.add_argument("--router-lr", type=float, default=3e-3)
    p.add_argument("--allocation", type=float, default=0.5, help="stage-1 steps ~ domain size ** this")
    p.add_argument("--stage1-steps", type=int, default=80, help="stage-1 steps over all domains")
    p.add_argument("--stage2-steps", type=int, default=24)
    p.add_argument("--seed-steps", type=int, default=0,
                   help="first train a seed LoRA on all domains for this many steps and start every expert "
                        "from it (counted in the mixed LoRA's steps)")
    p.add_argument("--eta", type=float, default=0.1)
    p.add_argument("--detach-router-inputs", action="store_true")
    p.add_argument("--lr-scaling", action="store_true",
                   help="token square-root lr scaling in stage 1 and stage 2 (--stage2-lr is then the reference lr)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--mixed-from", default=None, help="reuse this mixed LoRA (same lr and total steps)")
    p.add_argument("--no-mixed", action="store_true")
    args = p.parse_args()

    data = Path(args.data) if args.data else bundled_data_dir()
    out = Path(args.out)
    train, _ = read_records(data / "train.jsonl")
    domains = domains_of(train)
    steps = allocate_steps({d: sum(r.domain == d for r in train) for d in domains}, args.stage1_steps,
                           args.allocation)
    print("stage-1 steps:", steps, flush=True)

    def cfg(n, lr):
        return TrainConfig(max_steps=n, batch_size=args.batch_size, lr=lr, max_length=args.max_length, seed=0)

    t0 = time.time()
    seed = None
    if args.seed_steps:
        seed = out / "seed"
        train_expert(data=data / "train.jsonl", domain=None, out=seed, rank=8, alpha=16.0,
                     cfg=cfg(args.seed_steps, args.lr), overwrite=True, records=train)
    experts = {d: out / "experts" / d for d in domains}
    for d in domains:
        train_expert(data=data / "train.jsonl", domain=d, out=experts[d], rank=8, alpha=16.0,
                     cfg=cfg(steps[d], args.lr), overwrite=True, records=train, init_adapter=seed,
                     lr_scaling="tokens" if args.lr_scaling else "none")
    MoAModel.from_adapters([experts[d] for d in domains], domains=domains).save_pretrained(
        out / "moa_assembled", provenance={"assembled_from": {d: str(experts[d].resolve()) for d in domains}})
    train_mixture(moa_dir=out / "moa_assembled", data=data / "train.jsonl", out=out / "moa", eta=args.eta,
                  router_lr=args.router_lr, cfg=cfg(args.stage2_steps, args.stage2_lr), overwrite=True,
                  router_loss_to_experts=not args.detach_router_inputs,
                  expert_lr_scaling="tokens" if args.lr_scaling else "none",
                  records=train)
    mixed = Path(args.mixed_from) if args.mixed_from else None
    if mixed is None and not args.no_mixed:
        mixed = out / "mixed_lora"
        train_expert(data=data / "train.jsonl", domain=None, out=mixed, rank=8, alpha=16.0,
                     cfg=cfg(args.seed_steps + args.stage1_steps + args.stage2_steps, args.lr), overwrite=True, records=train)
    print(f"trained in {time.time() - t0:.0f} s", flush=True)
    systems = ["single_lora", "moa"] + (["mixed_lora"] if mixed else [])
    m = run_eval(out / "moa", data / "valid.jsonl", out / "valid_eval", systems, mixed_lora=mixed,
                 single_lora=experts, generate=False, progress=False)
    table = {s: {d: m["systems"][s][d]["ppl"] for d in m["domains"]} for s in m["systems"]}
    for s, row in table.items():
        print(s, json.dumps(row))
    if "mixed_lora" in table:
        wins = [d for d in m["domains"] if table["moa"][d] < table["mixed_lora"][d]]
        print(f"MoA below mixed_lora on {len(wins)}/{len(m['domains'])}: {', '.join(wins)}")
    (out / "valid_metrics.json").write_text(json.dumps({"args": vars(args), "stage1_steps": steps, "ppl": table,
                                                         "routing_accuracy": m["systems"]["moa"]["routing_accuracy"]},
                                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
