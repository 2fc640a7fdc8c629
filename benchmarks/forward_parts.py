"""What the LoRA ops of a mixed forward add to one decoder layer's base projections, op by op.

    python benchmarks/forward_parts.py [--threads 2] [--repeats 40] [--rows 8] [--tokens 128]

SmolLM2-135M's shapes (hidden 576, MLP 1536, k/v 192), float32, random weights: the 7 base
projections of one layer (`F.linear`), alone and with the LoRA as `moa.layers` runs it for rows
on per-row gathered experts of rank 8: the A side as one batched matmul per group of modules that
read one input (q/k/v rank 24, o 8, gate/up 16, down 8), the B side as one in-place `baddbmm_`
per module, added into the base's output. "A" runs only the A side (the B side's inputs
precomputed), "B" only the B side. "B first" / "A+B first" run the B side first, as a `bmm` of its
own, and let the base's matmul accumulate into it (`addmm_`, as `moa.layers` runs rows that are all
routed). Minima and medians of interleaved repeats, as ratios to the base projections.
"""
import argparse
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=40)
p.add_argument("--rows", type=int, default=8)
p.add_argument("--tokens", type=int, default=128)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
B, T, r = args.rows, args.tokens, 8
shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
groups = [(576, [0, 1, 2]), (576, [3]), (576, [4, 5]), (1536, [6])]  # (in, modules sharing the input)
xs = {i: torch.randn(B, T, i) for i in (576, 1536)}
Ws = [torch.randn(o, i) * 0.02 for i, o in shapes]
Bts = [torch.randn(B, r, o) for _, o in shapes]  # (B, r, out): each row's scaled B^T
As = [torch.randn(B, r * len(mem), i).transpose(1, 2) for i, mem in groups]  # (B, in, R) views, as cached
H = [torch.bmm(xs[i], A) for (i, _), A in zip(groups, As)]


def layer(a: bool, b: bool, first: bool = False) -> None:
    for g, ((i, mem), A) in enumerate(zip(groups, As)):
        h = torch.bmm(xs[i], A) if a else H[g]  # (B, T, R)
        for k, m in enumerate(mem):
            x = xs[shapes[m][0]]
            if b and first:
                y = torch.bmm(h[..., r * k:r * (k + 1)], Bts[m])  # (B, T, out)
                y.view(-1, y.shape[-1]).addmm_(x.view(-1, x.shape[-1]), Ws[m].t())
                continue
            y = F.linear(x, Ws[m])  # (B, T, out)
            if b:
                y.baddbmm_(h[..., r * k:r * (k + 1)], Bts[m])


cases = {"base": (0, 0), "A": (1, 0), "B": (0, 1), "A+B": (1, 1), "B first": (0, 1, 1), "A+B first": (1, 1, 1)}
times = {k: [] for k in cases}
with torch.inference_mode():
    for case in cases.values():
        layer(*case)
    for rep in range(args.repeats):
        for name, case in (cases.items() if rep % 2 else reversed(cases.items())):
            t = time.perf_counter()
            layer(*case)
            times[name].append(time.perf_counter() - t)
lo = {k: min(v) for k, v in times.items()}
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(f"{B} x {T} rows, {torch.get_num_threads()} threads, {args.repeats} repeats")
for k in cases:
    print(f"{k:9s} min {lo[k] * 1e3:7.2f} ms ({lo[k] / lo['base']:.3f})  median {med[k] * 1e3:7.2f} ms "
          f"({med[k] / med['base']:.3f})")
