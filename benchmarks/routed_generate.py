"""Routed generation against generation told the domains, on a trained MoA checkpoint: what the
routing prefill costs, and how many prompts it had to run again.

    python benchmarks/routed_generate.py MOA_DIR [--data data/demo/test.jsonl] [--prompts 32]
        [--new-tokens 40] [--repeats 3] [--threads 2]

The prompts: the shortest `--prompts` of the first 10 records per domain of `--data`, shortest
first, as `moa eval` generates them. Per repeat, in alternating order: `generate` with vote routing,
and `generate` told the domains that vote chose (its prefill runs once). Also prints how many
prompts had a layer whose router disagreed with the vote: `moa.generation.prefill` runs those
again with the decided expert.
"""
import argparse
import time
from pathlib import Path

import torch

from moa.data import encode_records, read_records
from moa.evaluate import first_per_domain
from moa.generation import encode_prompts
from moa.model import MoAModel

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("moa_dir", type=Path)
p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo" / "test.jsonl")
p.add_argument("--prompts", type=int, default=32)
p.add_argument("--new-tokens", type=int, default=40)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)

model = MoAModel.from_pretrained(args.moa_dir).eval()
records, _ = read_records(args.data)
examples, _ = encode_records(model.tokenizer, records, 1024)
chosen = sorted(first_per_domain(records, 10), key=lambda i: examples[i].prompt_len)[: args.prompts]
prompts = [records[i].prompt_messages for i in chosen]

with torch.inference_mode():
    ids, mask = encode_prompts(model, prompts)
    out = model(input_ids=ids, attention_mask=mask, prompt_mask=mask.bool(), routing="layer", logits_to_keep=1)
    decided, _ = model.decide(out.router_logits, "vote")
    per_layer = torch.stack([lg.argmax(-1) for lg in out.router_logits])  # (L, B)
disagree = (per_layer != decided).any(0)
domains = model.domain_names(decided)
print(f"{len(prompts)} prompts, {args.new_tokens} new tokens, {torch.get_num_threads()} threads; prompts with a "
      f"layer that disagrees with the vote: {int(disagree.sum())} (layers: "
      f"{(per_layer != decided).sum(1).nonzero().squeeze(1).tolist()})", flush=True)

runs = {"vote": lambda: model.generate(prompts, routing="vote", max_new_tokens=args.new_tokens, ignore_eos=True),
        "told": lambda: model.generate(prompts, domains=domains, max_new_tokens=args.new_tokens, ignore_eos=True)}
times = {k: [] for k in runs}
runs["vote"]()
for r in range(args.repeats):
    for name, run in (runs.items() if r % 2 == 0 else reversed(runs.items())):
        t = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(f"{name}: min {min(ts):.2f} s, all {', '.join(f'{t:.2f}' for t in ts)}")
print(f"vote / told, ratio of minima: {min(times['vote']) / min(times['told']):.3f}")
