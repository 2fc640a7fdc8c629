"""What running the frozen projections on oneDNN (`moa.layers.frozen_linear`, MOA_CPU_GEMM) buys on
this CPU, and what the LoRA costs once both sides use the same GEMM.

SmolLM2-135M (the embedded model), float32, 4 random rank-8 experts on the 7 projections, rows
mixed over the 4 experts. In one process, interleaved (the order reversed every other repeat),
each case timed against the bare transformers base in the same repeat:

    ops      one layer's 7 projection shapes x 30 layers of distinct weights (so they come from
             memory, as in the model): F.linear (PyTorch's default GEMM) against oneDNN's linear,
             for the 8 rows of a decoded token and 1,024 rows of a forward
    forward  8 x 128 tokens: the bare base; MoA with no expert (its wrappers alone) and with mixed
             rows, each under MOA_CPU_GEMM=default and =onednn
    decode   one KV-cached step of 8 rows on 64 cached tokens (cache cropped back after each
             step), the same cases; MoA's rows in blocks of one expert, as `MoAModel.generate`
             decodes them

Prints minima, medians and the median over repeats of each case's time over the base's in the
same repeat ("paired"), then "lora": MoA mixed over MoA with no expert under the same GEMM.

    python benchmarks/cpu_gemm.py [--threads 2] [--repeats 20]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import crop, random_experts_moa
from moa.base import load_base
from moa.generation import cache_of
from moa.layers import cpu_gemm
from moa.router import RoutingState

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=20)
args = p.parse_args()
torch.set_num_threads(args.threads)
B, E, CACHED = 8, 4, 64


def interleaved(cases: dict, repeats: int) -> dict:
    times = {k: [] for k in cases}
    for f in cases.values():
        f()  # warm up
    for rep in range(repeats):
        items = list(cases.items())
        for k, f in items if rep % 2 == 0 else items[::-1]:
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def report(title: str, times: dict, base: str) -> None:
    print(title)
    for k, ts in times.items():
        paired = statistics.median(a / b for a, b in zip(ts, times[base]))
        print(f"  {k:22s} min {min(ts) * 1e3:8.2f} ms  median {statistics.median(ts) * 1e3:8.2f} ms  "
              f"paired / {base} {paired:.3f}")


# ---------------------------------------------------------------- the projections alone
shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
layers = [[torch.randn(o, i) for o, i in shapes] for _ in range(30)]
with torch.inference_mode():
    for rows in (B, 1024):
        xs = {i: torch.randn(rows, i) for i in (576, 1536)}

        def run(choice, xs=xs):
            def f():
                with cpu_gemm(choice):
                    for ws in layers:
                        for w in ws:
                            if choice == "default":
                                F.linear(xs[w.shape[1]], w)
                            else:
                                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, None, "none", [], "")
            return f

        report(f"ops: 30 layers x 7 projections, {rows} rows",
               interleaved({"F.linear": run("default"), "oneDNN": run("onednn")},
                           args.repeats if rows == B else max(4, args.repeats // 4)), "F.linear")
del layers

# ---------------------------------------------------------------- the model
base, tok = load_base("smollm2-135m")
base.eval()
moa = random_experts_moa(E, 8)
doms = moa.domains
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (B, 128), generator=g)
mask = torch.ones_like(ids)
mixed = [doms[i % E] for i in range(B)]
blocks = sorted(mixed)


def fwd_case(rows, choice):
    def f():
        with cpu_gemm(choice):
            moa(input_ids=ids, attention_mask=mask, domains=rows)
    return f


with torch.inference_mode():
    cases = {"base (transformers)": lambda: base(input_ids=ids, attention_mask=mask)}
    for choice in ("default", "onednn"):
        cases[f"moa none, {choice}"] = fwd_case([None] * B, choice)
        cases[f"moa mixed, {choice}"] = fwd_case(mixed, choice)
    t = interleaved(cases, max(4, args.repeats // 2))
    report("forward 8 x 128", t, "base (transformers)")
    for choice in ("default", "onednn"):
        print(f"  lora ({choice}): mixed / none, paired "
              f"{statistics.median(a / b for a, b in zip(t[f'moa mixed, {choice}'], t[f'moa none, {choice}'])):.3f}")

    # one decode step on a cache of CACHED tokens, cropped back after each step
    prompt = ids[:, :CACHED]
    step_ids = ids[:, CACHED:CACHED + 1]
    full_mask = torch.ones(B, CACHED + 1, dtype=torch.long)
    pos = torch.full((B, 1), CACHED)
    kw = moa._cache_kw
    base_cache = cache_of(base(input_ids=prompt, use_cache=True))
    moa_caches = {}
    for name, rows in (("none", [None] * B), ("blocks", blocks)):
        with moa.routing(RoutingState("explicit", moa.expert_ids_for(rows, None, B))):
            moa_caches[name] = (rows, cache_of(moa.base_model(input_ids=prompt, use_cache=True)))

    def base_step():
        base(input_ids=step_ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
             **{kw: base_cache}, logits_to_keep=1)
        crop(base_cache, CACHED)

    def moa_step(name, choice):
        rows, cache = moa_caches[name]
        state = RoutingState("explicit", moa.expert_ids_for(rows, None, B))  # one choice for every step, as in generate

        def f():
            with cpu_gemm(choice), moa.routing(state):
                moa.base_model(input_ids=step_ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                               **{kw: cache}, logits_to_keep=1)
            crop(cache, CACHED)
        return f

    cases = {"base (transformers)": base_step}
    for choice in ("default", "onednn"):
        cases[f"moa none, {choice}"] = moa_step("none", choice)
        cases[f"moa blocks, {choice}"] = moa_step("blocks", choice)
    t = interleaved(cases, args.repeats * 2)
    report(f"decode step, {B} rows on {CACHED} cached tokens", t, "base (transformers)")
    for choice in ("default", "onednn"):
        print(f"  lora ({choice}): blocks / none, paired "
              f"{statistics.median(a / b for a, b in zip(t[f'moa blocks, {choice}'], t[f'moa none, {choice}'])):.3f}")
