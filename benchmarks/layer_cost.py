"""What MoA costs in one real decoder layer, against the bare base's same layer, paired.

    python benchmarks/layer_cost.py [--threads 2] [--repeats 100] [--rows 8] [--tokens 128] [--layer 5]

SmolLM2-135M (the embedded model), float32. One decoder layer runs as transformers calls it, on
random hidden states of rows x tokens, in these cases, interleaved (the order reversed every
other repeat):

- base: the bare model's layer;
- wrapped: the MoA model's layer with no routing (the wrappers alone);
- mixed: rows on 4 random rank-8 experts on the 7 projections, row i on expert i % 4 (per-row
  gathered weights);
- blocks: the same counts in blocks of one expert (0,0,1,1,...);
- single: every row on expert 0.

Prints each case's minimum and median, and the median over repeats of its ratio to the base run
beside it in the same repeat. Pairing cancels most of a shared VM's drift, which moves whole
forwards by 5% or more between repeats.
"""
import argparse
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model

from moa.base import load_base
from moa.layers import ExpertChoice, MoLoRALinear
from moa.model import MoAModel

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=100)
p.add_argument("--rows", type=int, default=8)
p.add_argument("--tokens", type=int, default=128)
p.add_argument("--layer", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(args.threads)

base, _ = load_base("smollm2-135m")
base.eval()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
with tempfile.TemporaryDirectory() as tmp:
    dirs = []
    for k in range(4):
        b, _ = load_base("smollm2-135m")
        torch.manual_seed(k)
        get_peft_model(b, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=targets)
                       ).save_pretrained(f"{tmp}/e{k}")
        dirs.append(f"{tmp}/e{k}")
    moa = MoAModel.from_adapters(dirs, domains=["a", "b", "c", "d"], base="smollm2-135m").eval()

bare = base.model.layers[args.layer]
wrapped = [m for m in moa.base_model.modules() if type(m) is type(bare)][args.layer]
modules = [m for m in wrapped.modules() if isinstance(m, MoLoRALinear)]
B, T = args.rows, args.tokens
x = torch.randn(B, T, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
positions = torch.arange(T)[None].expand(B, T)
embeddings = base.model.rotary_emb(x, positions)
index = {"mixed": [i % 4 for i in range(B)], "blocks": sorted(i % 4 for i in range(B)), "single": [0] * B}


def run(case: str) -> float:
    choice = ExpertChoice.of(torch.tensor(index[case])) if case in index else None
    for m in modules:
        m.slot.set_choice(choice)
    layer = bare if case == "base" else wrapped
    t = time.perf_counter()
    layer(x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
    return time.perf_counter() - t


cases = ["base", "wrapped", *index]
times = {k: [] for k in cases}
with torch.inference_mode():
    for k in cases:
        run(k)
    for rep in range(args.repeats):
        for k in (cases if rep % 2 else reversed(cases)):
            times[k].append(run(k))
print(f"layer {args.layer}, {B} x {T} rows, {torch.get_num_threads()} threads, {args.repeats} repeats, float32")
for k in cases:
    paired = statistics.median(a / b for a, b in zip(times[k], times["base"]))
    print(f"{k:8s} min {min(times[k]) * 1e3:7.2f} ms  median {statistics.median(times[k]) * 1e3:7.2f} ms  "
          f"paired ratio to base {paired:.3f}")
