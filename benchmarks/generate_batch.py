"""Greedy generation time against the number of prompts generated together: 32 chat prompts, 40
new tokens each, the bare base (transformers `generate`), float32, interleaved repeats. The reason
`moa eval` generates 32 prompts at a time (`--generate-batch-size`) while it scores 8.

    python benchmarks/generate_batch.py [--threads 2] [--repeats 2]
"""
import argparse
import time

import torch

from moa.base import load_base

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
base, tok = load_base("smollm2-135m")
base.eval()
tok.padding_side = "left"
prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a short note number {i} about the weather "
                                     "in a city and its people."}], add_generation_prompt=True, tokenize=False)
           for i in range(32)]


def run(batch: int, new: int = 40) -> float:
    t = time.perf_counter()
    for s in range(0, len(prompts), batch):
        enc = tok(prompts[s : s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        base.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t


with torch.inference_mode():
    run(8, 2)
    for rep in range(args.repeats):
        sizes = (8, 16, 32) if rep % 2 == 0 else (32, 16, 8)
        print("  ".join(f"{b} at a time: {run(b):.1f} s" for b in sizes), flush=True)
