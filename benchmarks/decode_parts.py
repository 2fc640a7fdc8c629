"""Where the KV-cached decode step's time over the bare base goes: one step of 8 rows (64 cached
tokens) of SmolLM2-135M with 4 random rank-8 experts on 7 projections, float32, timed against the
bare base step, interleaved, cache cropped back after each step. Rows routed:

    none    every row on no expert (the MoA's wrapped projections alone)
    single  every row on expert 0 (one LoRA: plain matmuls)
    mixed   rows on experts 0,1,2,3,0,1,2,3 (the issue's case: per-row gathered weights)
    blocks  rows on experts 0,0,1,1,2,2,3,3 (the same rows in the order `MoAModel.generate` decodes
            them: batched matmuls over blocks of one expert, each expert's weights read once)

then the LoRA matmuls of one such step alone, over 30 layers of distinct weights (so they come from
memory, as in the model): per-row gathered A/B (`bmm` / `baddbmm_`), all experts under a row
mask (`mm` / `addmm_`), and blocks of rows per expert (`bmm` / `baddbmm_` over E blocks).

    python benchmarks/decode_parts.py [--threads 2] [--repeats 40]
"""
import argparse
import time

import torch

from common import crop as crop_to, random_experts_moa
from moa.base import load_base
from moa.router import RoutingState

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=40)
args = p.parse_args()
torch.set_num_threads(args.threads)
B, E, r, CACHED = 8, 4, 8, 64

base, _ = load_base("smollm2-135m")
base.eval()
moa = random_experts_moa(E, r)
ids = torch.randint(100, 40000, (B, CACHED))
step = torch.randint(100, 40000, (B, 1))
mask = torch.ones(B, CACHED + 1, dtype=torch.long)
pos = torch.full((B, 1), CACHED)


def crop(cache):
    crop_to(cache, CACHED)


def timed(model, cache, state=None):
    crop(cache)
    t = time.perf_counter()
    if state is None:
        model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    else:
        with moa.routing(state):
            model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
    return time.perf_counter() - t


with torch.inference_mode():
    base_cache = base(input_ids=ids, use_cache=True).past_key_values
    for name, rows in (("none", [-1] * B), ("single", [0] * B), ("mixed", [k % E for k in range(B)]),
                       ("blocks", [k * E // B for k in range(B)])):
        state = RoutingState("explicit", torch.tensor(rows))
        with moa.routing(state):
            cache = moa.base_model(input_ids=ids, use_cache=True).past_key_values
        for _ in range(3):
            timed(base, base_cache), timed(moa.base_model, cache, state)
        tb, tm = [], []
        for rep in range(args.repeats):
            pair = [(tb, lambda: timed(base, base_cache)), (tm, lambda: timed(moa.base_model, cache, state))]
            for out, f in (pair if rep % 2 == 0 else pair[::-1]):
                out.append(f())
        med = lambda v: sorted(v)[len(v) // 2]
        print(f"{name:6s} base {min(tb)*1e3:6.2f} ms  moa {min(tm)*1e3:6.2f} ms  ratio of minima "
              f"{min(tm)/min(tb):.3f}  of medians {med(tm)/med(tb):.3f}", flush=True)

    # the LoRA matmuls of one step alone, 30 layers of distinct weights
    L = 30
    groups = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]
    index = torch.tensor([k % E for k in range(B)])
    layers = []
    for _ in range(L):
        for din, outs in groups:
            R = r * len(outs)
            A = torch.randn(E, R, din)
            Bt = [torch.randn(E, r, o) for o in outs]
            own = (index[:, None] == torch.arange(E)).repeat_interleave(R, 1).float()  # (B, E*R)
            layers.append((din, outs, A.index_select(0, index).contiguous(), [b.index_select(0, index).contiguous() for b in Bt],
                           A.reshape(E * R, din).t().contiguous(), [b.reshape(E * r, -1) for b in Bt], own, A, Bt))
    xs = {d: torch.randn(B, 1, d) for d in (576, 1536)}
    ys = {o: torch.randn(B, 1, o) for o in (576, 192, 1536)}

    def gathered():
        for din, outs, Ag, Bg, *_ in layers:
            h = torch.bmm(xs[din], Ag.transpose(1, 2))
            for k, o in enumerate(outs):
                ys[o].baddbmm_(h[..., k * r:(k + 1) * r], Bg[k])

    def dense():
        # Times the ops and their shapes only: the column slices do not follow the expert-major
        # layout of Ad, so the values are not a model's (the timing does not depend on them).
        for din, outs, _, _, Ad, Bd, own, _, _ in layers:
            h = torch.mm(xs[din].view(B, din), Ad).mul_(own)
            for k, o in enumerate(outs):
                ys[o].view(B, o).addmm_(h[:, k * E * r:(k + 1) * E * r], Bd[k])

    def blocks():  # rows in blocks of one expert (B // E rows each): each expert's weights read once
        for din, outs, *_, A, Bt in layers:
            h = torch.bmm(xs[din].view(E, B // E, din), A.transpose(1, 2))
            for k, o in enumerate(outs):
                ys[o].view(E, B // E, o).baddbmm_(h[..., k * r:(k + 1) * r], Bt[k])

    for name, f in (("gathered", gathered), ("dense", dense), ("blocks", blocks)):
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        print(f"LoRA ops alone, {name:8s}: min {min(ts)*1e3:.2f} ms, median {sorted(ts)[len(ts)//2]*1e3:.2f} ms per step")
