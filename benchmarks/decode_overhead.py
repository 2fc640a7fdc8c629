"""The fixed cost per decode step of MoA's wrapped projections and LoRA ops, apart from memory
traffic: one KV-cached step of 8 rows on a tiny random Llama with as many layers as SmolLM2-135M
(30) but 64-wide, so its matmuls cost next to nothing and what remains is Python and per-op
dispatch. The machine's speed drifts on a shared VM, so compare the excess as a fraction of the
base step of the same run (medians of interleaved steps); it moves far less from run to run than
the real model's step ratio, so it shows what a change to the wrappers saves. Rows routed as in
`decode_parts.py`:

    none    every row on no expert (the wrapped projections alone)
    single  every row on expert 0
    mixed   rows on experts 0,1,2,3,0,1,2,3 (per-row gathered weights)
    blocks  rows on experts 0,0,1,1,2,2,3,3 (the order `MoAModel.generate` decodes them in)

    python benchmarks/decode_overhead.py [--layers 30] [--repeats 200] [--threads 1]

Prints each step's median and its excess over the bare base's step: in ms, per layer, and as a
fraction of the base step.
"""
import argparse
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from moa.model import MoAModel
from moa.router import RoutingState
from moa.testing import make_tiny_base

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--layers", type=int, default=30)
p.add_argument("--repeats", type=int, default=200)
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)
B, E, CACHED = 8, 4, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

tmp = tempfile.mkdtemp()
base_dir = make_tiny_base(f"{tmp}/base", num_layers=args.layers)
base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
dirs = []
for k in range(E):
    torch.manual_seed(k)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS))
    peft.save_pretrained(f"{tmp}/e{k}")
    dirs.append(f"{tmp}/e{k}")
moa = MoAModel.from_adapters(dirs, domains=[f"d{k}" for k in range(E)], base=str(base_dir)).eval()
V = base.config.vocab_size
ids, step = torch.randint(0, V, (B, CACHED)), torch.randint(0, V, (B, 1))
mask, pos = torch.ones(B, CACHED + 1, dtype=torch.long), torch.full((B, 1), CACHED)


def timed(model, cache, state):
    extra = cache.get_seq_length() - CACHED
    if extra > 0:
        cache.crop(-extra)
    kwargs = dict(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
    t = time.perf_counter()
    if state is None:
        model(**kwargs)
    else:
        with moa.routing(state):
            model(**kwargs)
    return time.perf_counter() - t


with torch.inference_mode():
    cases = {"base": (base, base(input_ids=ids, use_cache=True).past_key_values, None)}
    for name, rows in (("none", [-1] * B), ("single", [0] * B), ("mixed", [k % E for k in range(B)]),
                       ("blocks", [k * E // B for k in range(B)])):
        state = RoutingState("explicit", torch.tensor(rows))
        with moa.routing(state):
            cases[name] = (moa.base_model, moa.base_model(input_ids=ids, use_cache=True).past_key_values, state)
    times = {name: [] for name in cases}
    for rep in range(args.repeats):
        order = list(cases.items())
        for name, case in (order if rep % 2 == 0 else order[::-1]):
            times[name].append(timed(*case))
    base_ms = statistics.median(times["base"]) * 1e3
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"{name:6s} step {ms:6.2f} ms  over the base {ms - base_ms:+5.2f} ms "
              f"({(ms - base_ms) / args.layers * 1e3:+5.0f} us per layer, {(ms - base_ms) / base_ms:+.3f} of the base step)",
              flush=True)
