"""A check of Performance II's targets that shares no code with benchmarks/run.py: only the
public API (`MoAModel.from_adapters`, `MoAModel.__call__`, `MoAModel.generate`) against the bare
base's transformers `forward` / `generate`. MoA: 4 random rank-8 experts on 7 projections, rows
mixed over the 4 experts (explicit domains), float32, ratios of minima over interleaved repeats
(alternate repeats run in reverse order).

    python benchmarks/independent_check.py [THREADS=2] [REPEATS=7]

forward: 8 x 128 random tokens; decode step: (generate 33 tokens - generate 1 token) / 32, 8
rows, KV cache (both sides pay their own prefill once); generate: tokens/s of 33 tokens.
"paired": the median over repeats of MoA's time over the base's in the same repeat.
"""
import sys, time, tempfile, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
from peft import LoraConfig, get_peft_model
from moa.base import load_base
from moa.model import MoAModel

base, tok = load_base("smollm2-135m")
base.eval()
tmp = tempfile.mkdtemp()
dirs = []
for k in range(4):
    b, _ = load_base("smollm2-135m")
    torch.manual_seed(k)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(b, cfg).save_pretrained(f"{tmp}/e{k}"); dirs.append(f"{tmp}/e{k}")
doms = ["a", "b", "c", "d"]
moa = MoAModel.from_adapters(dirs, domains=doms, base="smollm2-135m").eval()
print("dtype", next(base.parameters()).dtype, next(moa.base_model.parameters()).dtype, "threads", torch.get_num_threads())
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (8, 128), generator=g)
mask = torch.ones_like(ids)
rows = [doms[i % 4] for i in range(8)]
prompts = [f"Write a short note number {i} about the weather in a city." for i in range(8)]

def t_fwd_base():
    t = time.perf_counter(); base(input_ids=ids, attention_mask=mask); return time.perf_counter() - t
def t_fwd_moa():
    t = time.perf_counter(); moa(input_ids=ids, attention_mask=mask, domains=rows); return time.perf_counter() - t
enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                              tokenize=False)
tok.padding_side = "left"
bt = tok(enc, return_tensors="pt", padding=True, add_special_tokens=False)
def t_gen_base(n):
    t = time.perf_counter()
    base.generate(**bt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t
def t_gen_moa(n):
    t = time.perf_counter(); moa.generate(prompts, domains=rows, max_new_tokens=n, ignore_eos=True); return time.perf_counter() - t

res = {k: [] for k in ("fwd_base", "fwd_moa", "g1_base", "g33_base", "g1_moa", "g33_moa")}
with torch.inference_mode():
    for f in (t_fwd_base, t_fwd_moa): f()
    t_gen_base(2); t_gen_moa(2)
    for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 7):
        order = [("fwd_base", t_fwd_base), ("fwd_moa", t_fwd_moa), ("g1_base", lambda: t_gen_base(1)),
                 ("g33_base", lambda: t_gen_base(33)), ("g1_moa", lambda: t_gen_moa(1)), ("g33_moa", lambda: t_gen_moa(33))]
        if r % 2: order = order[::-1]
        for k, f in order: res[k].append(f())
import statistics
# Paired: each repeat's MoA time over the base's in the same repeat, median over repeats (robust
# to a shared VM's drift, which moves whole runs by 5% or more).
pair_fwd = statistics.median(a / b for a, b in zip(res["fwd_moa"], res["fwd_base"]))
pair_step = statistics.median((m33 - m1) / (b33 - b1) for m33, m1, b33, b1 in
                              zip(res["g33_moa"], res["g1_moa"], res["g33_base"], res["g1_base"]))
m = {k: min(v) for k, v in res.items()}
med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
step_b, step_m = (m["g33_base"] - m["g1_base"]) / 32, (m["g33_moa"] - m["g1_moa"]) / 32
print(f"forward 8x128: base {m['fwd_base']*1e3:.1f} ms, moa {m['fwd_moa']*1e3:.1f} ms, ratio of minima {m['fwd_moa']/m['fwd_base']:.3f} (medians {med['fwd_moa']/med['fwd_base']:.3f}, paired {pair_fwd:.3f})")
print(f"decode step (8 rows): base {step_b*1e3:.1f} ms, moa {step_m*1e3:.1f} ms, ratio {step_m/step_b:.3f} "
      f"(medians {((med['g33_moa']-med['g1_moa'])/(med['g33_base']-med['g1_base'])):.3f}, paired {pair_step:.3f})")
print(f"generate 33 tokens: tokens/s ratio moa/base {m['g33_base']/m['g33_moa']:.3f}")
