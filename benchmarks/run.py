"""Speed targets of moa, each a ratio against its baseline measured in this one process.

    python benchmarks/run.py --quick                  # a few minutes: 3 repeats, 16 new tokens
    python benchmarks/run.py --repeats 9 --out benchmarks/results.json

Shapes (the issue contract): the embedded SmolLM2-135M, 4 experts, r=8 on all 7 projections,
batch 8 x 128 tokens, float32. The experts are random PEFT LoRAs (`init_lora_weights=False`,
so they differ) written to a temp dir and assembled with `MoAModel.from_adapters`.

`--only decode` times KV-cached decode steps of 8 rows on 4 experts against the bare base;
`--only mfu` times stage-1 (PEFT single LoRA) and stage-2 training steps in fp32 and bf16
autocast and prints tokens/s, achieved GFLOP/s (FLOPs counted on the calls the step makes: a
frozen weight gets no gradient, so the frozen base's backward is its activations' gradient
only) and the ratio to this CPU's measured matmul rate at that dtype. Where the model has them,
`forward` and `decode` also time the MoA with its fused A projections switched off (`unfused`).

`--only dtype` compares a bfloat16 base against a float32 base (experts and routers float32 in
both): peak RSS of loading + scoring, scoring tokens/s, stage-1 and stage-2 step time,
generation tokens/s and the PPL of the demo test set, on the embedded model; with
`--shape qwen2.5-0.5b` on a randomly initialised model of Qwen2.5-0.5B's shape (config built
here, nothing downloaded; memory and speed only: batch 2 x 128).

    python benchmarks/run.py --only dtype --repeats 3 --threads 2
    python benchmarks/run.py --only dtype --shape qwen2.5-0.5b --repeats 3 --threads 2

Every target runs its variants interleaved (the order rotates every repeat) after one warm-up
call each, and reports the ratio of the minima, of the medians and of the maxima: this 2-core
machine is shared, so the minimum is the best estimate of the cost and the median shows how
noisy the run was. Peak RSS is measured in fresh subprocesses (one per variant).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOMAINS = ["finance", "medicine", "code", "math"]
PROMPTS = [  # two per domain; generation routes each to its domain's expert (see fit_routers)
    ("finance", "What is an exchange-traded fund?"),
    ("medicine", "What are the symptoms of anaemia?"),
    ("code", "Write a Python function that reverses a string."),
    ("math", "What is 17 times 23?"),
    ("finance", "Explain compound interest in two sentences."),
    ("medicine", "How does a vaccine train the immune system?"),
    ("code", "What does the SQL keyword JOIN do?"),
    ("math", "Solve 3x + 5 = 20 for x."),
]
BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16


# --------------------------------------------------------------------------- environment


def cpu_info() -> dict:
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


# --------------------------------------------------------------------------- models


def build_adapters(root: Path, n: int = 4) -> list[Path]:
    """n random PEFT LoRA adapters (r=8, alpha=16, all 7 projections) on the embedded base."""
    from peft import LoraConfig, get_peft_model

    from moa.base import load_base

    base, _ = load_base("smollm2-135m")
    dirs = []
    for e in range(n):
        torch.manual_seed(1000 + e)
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False,
                         task_type="CAUSAL_LM")
        pm = get_peft_model(base, cfg)
        pm.peft_config["default"].base_model_name_or_path = "smollm2-135m"
        pm.save_pretrained(root / DOMAINS[e])
        dirs.append(root / DOMAINS[e])
        base = pm.unload()
    return dirs


def peft_mixed_model(dirs: list[Path]):
    """A PeftModel with every adapter loaded, for PEFT's own mixed batches (`adapter_names`)."""
    from peft import PeftModel

    from moa.base import load_base

    base, _ = load_base("smollm2-135m")
    pm = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        pm.load_adapter(str(d), adapter_name=d.name)
    return pm.eval()


def peft_train_model(adapter: Path):
    """A trainable single-LoRA PeftModel: what stage 1 (`moa train-expert`) trains."""
    from peft import PeftModel

    from moa.base import load_base

    base, _ = load_base("smollm2-135m")
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def train_batch(vocab: int, seed: int = 0) -> dict:
    """A mixed-domain batch of 8 x 128 tokens: a 64-token prompt, then 64 label tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (BATCH, SEQ), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    prompt = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    prompt[:, : SEQ // 2] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "prompt_mask": prompt, "domain_ids": torch.arange(BATCH) % len(DOMAINS),
            "global_tokens": int((labels[:, 1:] != -100).sum()), "global_rows": BATCH,
            "router_ids": torch.arange(BATCH) % len(DOMAINS), "global_router_rows": BATCH}


def fit_routers(moa, input_ids, attention_mask, domain_ids) -> None:
    """Set every layer's router so that vote routing picks `domain_ids` on these prompts.

    Least squares (exact here: 8 prompts, 577 unknowns) on the pooled inputs that every layer
    sees under explicit routing; with all routers right, layer-mode routing passes through the
    same hidden states, so each router sees what it was fitted on.
    """
    from moa.router import LayerRouter, RoutingState

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), moa.routing(RoutingState("explicit", domain_ids)):
        out = moa.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             output_hidden_states=True, use_cache=False)
    target = torch.nn.functional.one_hot(domain_ids, moa.num_experts).double() * 8.0 - 4.0  # (B, E)
    for i, router in enumerate(moa.routers):
        pooled = LayerRouter.pool(out.hidden_states[i], attention_mask.bool()).double()  # (B, H)
        X = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=torch.float64)], 1)  # (B, H + 1)
        sol = torch.linalg.lstsq(X, target, driver="gelsd").solution  # (H + 1, E)
        with torch.no_grad():
            router.weight.copy_(sol[:-1].T.float())
            router.bias.copy_(sol[-1].float())


# --------------------------------------------------------------------------- steps


def peft_loss(model, batch):
    """Stage 1's loss (moa.stages.train_expert): label positions only through the LM head."""
    from moa.trainer import causal_lm_loss_sum

    return causal_lm_loss_sum(model, batch) / batch["global_tokens"]


def stage2_loss(model, batch):
    """Stage 2's loss, exactly as `moa train` computes it (moa.stages.stage2_loss)."""
    from moa.stages import stage2_loss as loss_fn

    return loss_fn(model, batch, eta=1.0)[0]


class TrainStep:
    """One optimizer step as `moa.trainer.Trainer` runs it: loss, backward, clip, AdamW, zero."""

    def __init__(self, model, loss_fn, params, bf16: bool = False):
        self.model, self.loss_fn, self.params, self.bf16 = model, loss_fn, list(params), bf16
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.0)

    def __call__(self, batch) -> float:
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def decode_steps(model, ids, mask, steps: int, routing=None):
    """`steps` KV-cached decode steps of one batch after its prefill (greedy, as `generate` runs them).

    model: a transformers CausalLM (the base, or an MoA's `base_model`); routing: a context
    manager factory entered once around the prefill and the steps (`MoAModel.routing(state)`), as
    `moa.generation` does; None: the bare base. Returns the time of the steps alone (seconds).
    """
    import contextlib

    from moa.generation import cache_of

    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    keep = {"logits_to_keep": 1}
    with torch.inference_mode(), (routing() if routing else contextlib.nullcontext()):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        cache, nxt = cache_of(out), out.logits[:, -1].argmax(-1)  # (B,)
        step_pos, step_mask = pos[:, -1:], mask
        t0 = time.perf_counter()
        for _ in range(steps):
            step_pos = step_pos + 1  # (B, 1)
            step_mask = torch.cat([step_mask, step_mask.new_ones(len(ids), 1)], 1)  # (B, T + k)
            out = model(input_ids=nxt[:, None], attention_mask=step_mask, position_ids=step_pos,
                        past_key_values=cache, use_cache=True, **keep)
            cache, nxt = cache_of(out), out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t0


def unfused(moa, fn):
    """fn() with every LoRA A projection of `moa` run alone (the path before the fused A projections)."""
    moa.fuse_shared_inputs(False)
    try:
        return fn()
    finally:
        moa.fuse_shared_inputs(True)


# --------------------------------------------------------------------------- FLOPs and MFU


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This CPU's measured matmul rate at `dtype` (GFLOP/s): the best of `repeats` n x n x n products."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (and oneDNN's kernel choice)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_flops(model, loss_fn, batch) -> tuple[float, float]:
    """(forward FLOPs, backward FLOPs) of one training step's loss, counted on the calls it makes.

    Every matmul of the forward costs 2*m*n*k. Backward: a weight matrix that trains needs its
    gradient (the same cost again); an input that needs a gradient gets one (again the same cost);
    a frozen weight gets no gradient, so a frozen base layer costs 1x its forward in backward (only
    the activations' gradient), not 2x -- and nothing where its input needs no gradient (the first
    q/k/v after the frozen embedding). Attention: QK^T and PV (4*B*T^2*d forward, causal or not:
    what the kernel computes), 2x that in backward. The router and elementwise ops are left out.
    """
    from torch import nn

    from moa.layers import MoLoRALinear

    fwd, bwd = [0.0], [0.0]

    def linear_hook(mod, args, out):
        x = args[0]
        f = 2.0 * x.numel() / mod.in_features * mod.in_features * mod.out_features
        fwd[0] += f
        bwd[0] += f * (int(x.requires_grad) + int(mod.weight.requires_grad))

    def lora_hook(mod, args, out):
        x = args[0]
        n = x.numel() / mod.in_features  # tokens
        base = 2.0 * n * mod.in_features * mod.out_features
        fwd[0] += base
        bwd[0] += base * int(x.requires_grad)
        if mod.ranks and mod.slot.choice is not None and mod.slot.choice.single != -1:
            r = max(mod.ranks)
            fwd[0] += 2.0 * n * r * (mod.in_features + mod.out_features)
            # dB and d(h) on the out side; dA, and dx when x needs it, on the in side
            bwd[0] += 2.0 * n * r * (2 * mod.out_features + (1 + int(x.requires_grad)) * mod.in_features)

    def attn_hook(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        cfg = model_config
        d = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        f = 4.0 * h.shape[0] * h.shape[1] ** 2 * d
        fwd[0] += f
        bwd[0] += 2 * f

    base_model = getattr(model, "base_model", model)
    model_config = base_model.config.get_text_config()
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, MoLoRALinear)}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, MoLoRALinear):
            handles.append(m.register_forward_hook(lora_hook))
        elif isinstance(m, nn.Linear) and id(m) not in wrapped:
            handles.append(m.register_forward_hook(linear_hook))
        elif name.endswith("self_attn"):
            handles.append(m.register_forward_hook(attn_hook, with_kwargs=True))
    try:
        model.train()
        loss_fn(model, batch)  # not backpropagated: the graph is dropped
    finally:
        for h in handles:
            h.remove()
    return fwd[0], bwd[0]


def mfu_rows(moa, adapters: list[Path], batch: dict, repeats: int) -> list[dict]:
    """Stage 1 (PEFT single LoRA) and stage 2 (MoA) steps in fp32 and bf16 autocast: tokens/s,
    achieved GFLOP/s and their ratio to this CPU's matmul peak at the step's dtype."""
    from moa.trainer import bf16_supported

    peft_t = peft_train_model(adapters[0])
    moa.set_trainable(experts=True, routers=True)
    steps = {}
    for dtype in ("fp32", "bf16"):
        if dtype == "bf16" and not bf16_supported():
            print("  mfu: no native bf16 here, bf16 skipped")
            continue
        steps[f"stage1 {dtype}"] = TrainStep(peft_t, peft_loss, [p for p in peft_t.parameters() if p.requires_grad],
                                             bf16=dtype == "bf16")
        steps[f"stage2 {dtype}"] = TrainStep(moa, stage2_loss, moa.trainable_parameters(), bf16=dtype == "bf16")
    flops = {"stage1": train_flops(peft_t, peft_loss, batch), "stage2": train_flops(moa, stage2_loss, batch)}
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16) if bf16_supported() else None}
    print("  matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items() if v), flush=True)
    t = interleave({k: (lambda s=s: s(batch)) for k, s in steps.items()}, repeats, "mfu")
    tokens = int(batch["attention_mask"].sum())
    rows = []
    for name, times in t.items():
        stage, dtype = name.split()
        f, b = flops[stage]
        best = min(times)
        achieved = (f + b) / best / 1e9
        peak = peaks[dtype]
        rows.append({"target": f"MFU {name}", "min": achieved / peak, "median": (f + b) / statistics.median(times) / 1e9 / peak,
                     "max": (f + b) / max(times) / 1e9 / peak, "limit": "info", "pass": True,
                     "note": f"{tokens / best:.0f} tok/s, {achieved:.1f} GFLOP/s of {peak:.0f} peak; "
                             f"{(f + b) / 1e9:.0f} GFLOP/step (fwd {f / 1e9:.0f}, bwd {b / 1e9:.0f})",
                     "tokens_per_s": tokens / best, "gflops": achieved, "peak_gflops": peak,
                     "step_gflop": (f + b) / 1e9})
    moa.set_trainable(experts=False, routers=False)
    del peft_t, steps
    gc.collect()
    return rows


# --------------------------------------------------------------------------- measuring


def interleave(fns: dict[str, Callable[[], object]], repeats: int, label: str,
               warmup: bool = True, timer: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each fn: one warm-up call each, then `repeats` rounds in rotating order.

    timer: each fn returns the seconds of the part to measure itself (e.g. decode steps without
    their prefill) instead of being timed whole.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names if warmup else []:
        fns[n]()
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            gc.collect()
            t0 = time.perf_counter()
            took = fns[n]()
            times[n].append(took if timer else time.perf_counter() - t0)
        print(f"  {label} {rep + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
              flush=True)
    return times


def ratio_row(name: str, num: list[float], den: list[float], limit: float, note: str = "",
              higher_is_better: bool = False) -> dict:
    """Ratios of minima, medians, maxima of num/den (or den/num for a throughput ratio)."""
    stats = [min, statistics.median, max]
    if higher_is_better:  # throughput = work / time: ratio of throughputs = den_time / num_time
        vals = [f(den) / f(num) for f in stats]
        ok = vals[0] >= limit
    else:
        vals = [f(num) / f(den) for f in stats]
        ok = vals[0] <= limit
    return {"target": name, "min": vals[0], "median": vals[1], "max": vals[2],
            "limit": ("≥ " if higher_is_better else "≤ ") + f"{limit:g}", "pass": ok, "note": note,
            "num_s": {"min": min(num), "median": statistics.median(num)},
            "den_s": {"min": min(den), "median": statistics.median(den)}}


# --------------------------------------------------------------------------- peak RSS (subprocess)


def rss_child(kind: str, adapters: list[Path], steps: int) -> None:
    """Run `steps` training steps of one kind in this fresh process; print peak RSS (MiB) as JSON."""
    from moa.base import load_base

    torch.manual_seed(0)
    batch = train_batch(49152)
    if kind == "stage2":
        from moa.model import MoAModel

        model = MoAModel.from_adapters(adapters)
        model.set_trainable(experts=True, routers=True)
        step = TrainStep(model, stage2_loss, model.trainable_parameters())
    else:
        model = peft_train_model(adapters[0])
        step = TrainStep(model, peft_loss, [p for p in model.parameters() if p.requires_grad])
    del load_base
    gc.collect()
    load_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; includes loading
    # Loading the checkpoint has its own transient peak, the same for both kinds; reset the
    # high-water mark (Linux: "5" > /proc/self/clear_refs) so that only training is measured.
    reset = _reset_peak_rss()
    for _ in range(steps):
        step(batch)
    peak_kib = _vm_hwm_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "peak_rss_mib": peak_kib / 1024, "load_peak_rss_mib": load_peak_kib / 1024,
                      "training_only": reset}))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _vm_hwm_kib() is not None
    except OSError:
        return False


def _vm_hwm_kib() -> int | None:
    """Peak resident set size of this process since start or the last reset (KiB), from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_rss(kind: str, adapters: list[Path], steps: int) -> float:
    cmd = [sys.executable, __file__, "--rss-child", kind, "--rss-steps", str(steps),
           "--adapters", *map(str, adapters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if not res["training_only"]:
        print(f"  ({kind}: peak RSS includes loading; /proc/self/clear_refs is not available here)")
    return res["peak_rss_mib"]


# --------------------------------------------------------------------------- bf16 base vs float32 base

QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              tie_word_embeddings=True, rope_theta=1000000.0)
"""Qwen2.5-0.5B's architecture (its config.json), initialised at random here."""


def dtype_model(shape: str, dtype: torch.dtype, adapters: list[Path] | None):
    """An MoA with 4 experts (r=8, all 7 projections) whose frozen base is in `dtype`."""
    from moa.model import MoAModel

    if shape == "smollm2-135m":
        return MoAModel.from_adapters(adapters, dtype=dtype)
    from transformers import AutoModelForCausalLM, Qwen2Config

    from moa.checkpoint import Adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN05), dtype=dtype)  # built in dtype, no fp32 copy
    moa = MoAModel(base, None, base="qwen2.5-0.5b-shape", target_modules=TARGETS)
    g = torch.Generator().manual_seed(1)
    for d in DOMAINS:
        weights = {path: (torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5,
                          torch.randn(m.out_features, RANK, generator=g) * 0.01)
                   for path, m in moa.lora_modules.items()}
        moa.add_expert(d, Adapter("random", RANK, ALPHA, False, None, weights), check_base=False)
    return moa


def dtype_batch(shape: str, vocab: int, rows: int) -> dict:
    """The first `rows` rows of `train_batch` (a shared 2-core machine: keep each step short)."""
    b = {k: (v[:rows] if torch.is_tensor(v) else v) for k, v in train_batch(vocab).items()}
    b["global_tokens"] = int((b["labels"][:, 1:] != -100).sum())
    b["global_rows"] = b["global_router_rows"] = rows
    return b


def score_nll(moa, batch) -> torch.Tensor:
    from moa.losses import label_nll

    with torch.no_grad():
        out = moa(batch["input_ids"], batch["attention_mask"], domain_ids=batch["domain_ids"])
        return label_nll(batch["labels"], logits=out.logits)[0]


def rss_dtype_child(shape: str, dtype: str, adapters: list[Path], rows: int) -> None:
    """Load the model with a `dtype` base and score one batch in this fresh process; peak RSS (MiB)."""
    model = dtype_model(shape, getattr(torch, dtype), adapters)
    score_nll(model, dtype_batch(shape, model.base_model.config.vocab_size, rows))
    print(json.dumps({"peak_rss_mib": _vm_hwm_kib() / 1024}))


def measure_dtype_rss(shape: str, dtype: str, adapters: list[Path], rows: int) -> float:
    cmd = [sys.executable, __file__, "--rss-child", f"dtype:{shape}:{dtype}:{rows}", "--adapters", *map(str, adapters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def demo_test_ppl(model, per_domain: int = 10) -> dict:
    """PPL of the first `per_domain` records of each domain of data/demo/test.jsonl: the base
    alone and the MoA with each record's own expert (explicit routing)."""
    from moa.data import encode_records, read_records
    from moa.scoring import causal_lm_forward, moa_forward, score_examples

    records, _ = read_records(Path(__file__).resolve().parents[1] / "data" / "demo" / "test.jsonl")
    seen: dict[str, int] = {}
    chosen = []
    for r in records:
        if seen.get(r.domain, 0) < per_domain:
            seen[r.domain] = seen.get(r.domain, 0) + 1
            chosen.append(r)
    examples, _ = encode_records(model.tokenizer, chosen, 256)
    names = list(seen)
    # the demo's domains are not the benchmark's: give demo domain k the benchmark's expert k
    for ex in examples:
        ex.domain = DOMAINS[names.index(ex.domain) % len(DOMAINS)]
    out = {}
    for name, fwd in (("base", causal_lm_forward(model.base_model)), ("moa", moa_forward(model, "explicit")[0])):
        rows = score_examples(fwd, examples, model.tokenizer.pad_token_id, 8, progress=False)
        out[name] = math.exp(-sum(r["logprob"] for r in rows) / sum(r["tokens"] for r in rows))
    return out


DTYPE_TARGETS = ("score", "stage2", "stage1", "generate", "ppl", "rss")


def dtype_rows(shape: str, adapters: list[Path] | None, repeats: int, new_tokens: int, rows: int,
               targets: set[str] = set(DTYPE_TARGETS)) -> list[dict]:
    """bf16 base against float32 base, one process, interleaved; `targets`: a subset of DTYPE_TARGETS."""
    from moa.device import bf16_native

    out_rows = []
    print(f"dtype: {shape}, bf16 base vs float32 base (experts, routers float32); native bf16 here: "
          f"{bf16_native('cpu')}", flush=True)
    fp32 = dtype_model(shape, torch.float32, adapters)
    bf16 = dtype_model(shape, torch.bfloat16, adapters)
    batch = dtype_batch(shape, fp32.base_model.config.vocab_size, rows)
    tokens = int(batch["attention_mask"].sum())
    nll32, nll16 = score_nll(fp32, batch).mean(), score_nll(bf16, batch).mean()
    print(f"  mean NLL of the benchmark batch: fp32 base {float(nll32):.4f}, bf16 base {float(nll16):.4f} "
          f"({100 * float((nll16 - nll32) / nll32):+.2f}%)")

    if "score" in targets:
        t = interleave({"bf16": lambda: score_nll(bf16, batch), "fp32": lambda: score_nll(fp32, batch)}, repeats,
                       "score")
        out_rows.append(ratio_row(f"[{shape}] scoring tokens/s: bf16 base / fp32 base", t["bf16"], t["fp32"], 1.0,
                                  f"{tokens} tokens per batch; fp32 {tokens / min(t['fp32']):.0f} tok/s, "
                                  f"bf16 {tokens / min(t['bf16']):.0f} tok/s", higher_is_better=True))

    if "stage2" in targets:
        for m in (fp32, bf16):
            m.set_trainable(experts=True, routers=True)
        # As the Trainer runs them: a bf16 base autocasts, a float32 one (--no-bf16) does not.
        steps = {"bf16 base": TrainStep(bf16, stage2_loss, bf16.trainable_parameters(), bf16=True),
                 "fp32 base": TrainStep(fp32, stage2_loss, fp32.trainable_parameters(), bf16=False)}
        t = interleave({k: (lambda s=s: s(batch)) for k, s in steps.items()}, repeats, "stage 2")
        out_rows.append(ratio_row(f"[{shape}] stage-2 step: bf16 base / fp32 base", t["bf16 base"], t["fp32 base"],
                                  1.0, f"{tokens} tokens; fp32 {min(t['fp32 base']):.2f}s, "
                                       f"bf16 {min(t['bf16 base']):.2f}s"))
        for m in (fp32, bf16):
            m.set_trainable(experts=False, routers=False)
        del steps
        gc.collect()

    if shape == "smollm2-135m" and "stage1" in targets:
        from moa.device import placement

        with placement("cpu", "bfloat16"):
            p16 = peft_train_model(adapters[0])
        p32 = peft_train_model(adapters[0])
        s1 = {"bf16 base": TrainStep(p16, peft_loss, [p for p in p16.parameters() if p.requires_grad], bf16=True),
              "fp32 base": TrainStep(p32, peft_loss, [p for p in p32.parameters() if p.requires_grad])}
        t = interleave({k: (lambda s=s: s(batch)) for k, s in s1.items()}, repeats, "stage 1")
        out_rows.append(ratio_row(f"[{shape}] stage-1 step: bf16 base / fp32 base", t["bf16 base"], t["fp32 base"],
                              1.0, f"PEFT single LoRA; fp32 {min(t['fp32 base']):.2f}s, "
                                   f"bf16 {min(t['bf16 base']):.2f}s"))
        del s1, p16, p32
        gc.collect()

    if shape == "smollm2-135m" and "generate" in targets:
        prompts = [text for _, text in PROMPTS]
        from moa import generation

        real_eos_ids = generation._eos_ids
        generation._eos_ids = lambda model: torch.tensor([-1])  # exactly new_tokens per row on both sides
        doms = [d for d, _ in PROMPTS]
        t = interleave({n: (lambda m=m: m.generate(prompts, domains=doms, max_new_tokens=new_tokens))
                        for n, m in (("bf16", bf16), ("fp32", fp32))}, repeats, "generate")
        generation._eos_ids = real_eos_ids
        n_tok = len(prompts) * new_tokens
        out_rows.append(ratio_row(f"[{shape}] generation tokens/s: bf16 base / fp32 base", t["bf16"], t["fp32"], 1.0,
                              f"8 prompts x {new_tokens}; fp32 {n_tok / min(t['fp32']):.1f} tok/s, "
                              f"bf16 {n_tok / min(t['bf16']):.1f} tok/s", higher_is_better=True))
    if shape == "smollm2-135m" and "ppl" in targets:
        ppl32, ppl16 = demo_test_ppl(fp32), demo_test_ppl(bf16)
        for k in ("base", "moa"):
            rel = ppl16[k] / ppl32[k]
            out_rows.append({"target": f"[{shape}] demo test PPL ({k}): bf16 / fp32", "min": rel, "median": rel,
                         "max": rel, "limit": "1 ± 0.01", "pass": abs(rel - 1) <= 0.01,
                         "note": f"fp32 {ppl32[k]:.4f}, bf16 {ppl16[k]:.4f}; 10 records per demo domain"})

    fp32 = bf16 = None  # release both models before the RSS subprocesses
    gc.collect()
    if "rss" not in targets:
        return out_rows
    r32 = measure_dtype_rss(shape, "float32", adapters or [], rows)
    r16 = measure_dtype_rss(shape, "bfloat16", adapters or [], rows)
    print(f"  peak RSS of loading + scoring one batch: fp32 base {r32:.0f} MiB, bf16 base {r16:.0f} MiB")
    out_rows.append(ratio_row(f"[{shape}] peak RSS load + score: bf16 base / fp32 base", [r16], [r32], 0.6,
                          f"{r16:.0f} / {r32:.0f} MiB, fresh subprocesses"))
    return out_rows


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repeats, 16 new tokens, 2 RSS steps")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per target (default 9; quick 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per prompt (default 64; quick 16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of: forward, decode, train, mfu, bf16, generate, rss, dtype "
                        "(default: all but dtype)")
    p.add_argument("--dtype-targets", default=",".join(DTYPE_TARGETS),
                   help="comma-separated subset of the dtype comparison: " + ", ".join(DTYPE_TARGETS))
    p.add_argument("--rows", type=int, default=None,
                   help="batch rows of the dtype comparison (default: 8 for smollm2-135m, 1 for qwen2.5-0.5b)")
    p.add_argument("--shape", choices=["smollm2-135m", "qwen2.5-0.5b"], default="smollm2-135m",
                   help="model of the dtype comparison (qwen2.5-0.5b: random weights, its shape)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--adapters", nargs="*", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child and args.rss_child.startswith("dtype:"):
        _, shape, dtype, rows = args.rss_child.split(":")
        rss_dtype_child(shape, dtype, [Path(a) for a in args.adapters], int(rows))
        return 0
    if args.rss_child:
        rss_child(args.rss_child, [Path(a) for a in args.adapters], args.rss_steps)
        return 0
    import transformers

    from moa.base import load_base
    from moa.model import MoAModel
    from moa.trainer import bf16_supported, resolve_bf16

    repeats = args.repeats or (3 if args.quick else 9)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    rss_steps = 2 if args.quick else 3
    parts = set((args.only or "forward,decode,generate,train,mfu,bf16,rss").split(","))
    cpu = cpu_info()
    env = {"cpu": cpu, "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "bf16_supported": bf16_supported(),
           "trainer_auto_bf16": resolve_bf16(None), "repeats": repeats, "new_tokens": new_tokens}
    print(f"cpu: {cpu['model']} ({cpu['cores']} cores, avx512_bf16={cpu['avx512_bf16']}, amx_bf16={cpu['amx_bf16']})")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"repeats={repeats}, new tokens={new_tokens}")
    rows: list[dict] = []
    targets = set(args.dtype_targets.split(","))

    if parts == {"dtype"} and args.shape != "smollm2-135m":
        rows += dtype_rows(args.shape, None, repeats, new_tokens, args.rows or 1, targets)
        parts = set()

    with tempfile.TemporaryDirectory(prefix="moa-bench-") as tmp:
        adapters = build_adapters(Path(tmp)) if parts else []
        if "dtype" in parts:
            rows += dtype_rows(args.shape, adapters, repeats, new_tokens, args.rows or BATCH, targets)
            parts.discard("dtype")
        if not parts:
            adapters = []
        moa = MoAModel.from_adapters(adapters) if parts else None
        tok = moa.tokenizer if parts else None
        batch = train_batch(moa.base_model.config.vocab_size if parts else 49152)
        ids, mask, dom = batch["input_ids"], batch["attention_mask"], batch["domain_ids"]

        if parts & {"forward", "generate", "decode"}:
            base, _ = load_base("smollm2-135m")
        fusable = hasattr(moa, "fuse_shared_inputs")  # not in checkouts before the fused A projections
        if "forward" in parts:
            peft = peft_mixed_model(adapters)
            names = [DOMAINS[i] for i in dom.tolist()]
            print(f"forward: batch {BATCH} x {SEQ}, experts per row {dom.tolist()}", flush=True)

            @torch.no_grad()
            def f_base():
                return base(input_ids=ids, attention_mask=mask).logits

            @torch.no_grad()
            def f_moa():
                return moa(ids, mask, domain_ids=dom).logits

            @torch.no_grad()
            def f_peft():
                return peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits

            with torch.no_grad():  # same function on both sides: PEFT's mixed batch == MoA's
                torch.testing.assert_close(f_moa(), f_peft(), rtol=1e-3, atol=1e-3)
            fns = {"base": f_base, "moa": f_moa, "peft": f_peft}
            if fusable:
                fns["unfused"] = lambda: unfused(moa, f_moa)
            t = interleave(fns, repeats, "forward")
            rows.append(ratio_row("mixed forward: MoA / base", t["moa"], t["base"], 1.05,
                                  "explicit routing, 4 experts in the batch"))
            if fusable:
                rows.append(ratio_row("mixed forward: MoA fused A / unfused", t["moa"], t["unfused"], 1.0,
                                      "q/k/v and gate/up A projections as one matmul each, or each alone"))
            rows.append(ratio_row("mixed forward: MoA / PEFT adapter_names", t["moa"], t["peft"], 0.85,
                                  "PeftModel with 4 adapters"))
            del peft
            gc.collect()

        if "generate" in parts:
            prompts = [text for _, text in PROMPTS]
            want = torch.tensor([DOMAINS.index(d) for d, _ in PROMPTS])
            from moa.generation import encode_prompts

            p_ids, p_mask = encode_prompts(moa, prompts)  # (8, T) left padded, chat template
            fit_routers(moa, p_ids, p_mask, want)
            routed, _ = moa.route(p_ids, p_mask, "vote")
            print(f"generate: 8 prompts x {new_tokens} new tokens; vote routing chose {routed.tolist()} "
                  f"(wanted {want.tolist()})", flush=True)
            # Both sides produce exactly new_tokens tokens per row: HF via min_new_tokens; MoA by
            # making no token an end-of-turn token for this benchmark.
            from moa import generation

            real_eos_ids = generation._eos_ids
            generation._eos_ids = lambda model: torch.tensor([-1])
            pad = tok.pad_token_id

            def g_base():
                out = base.generate(input_ids=p_ids, attention_mask=p_mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
                assert out.shape[1] == p_ids.shape[1] + new_tokens
                return out

            def g_moa():
                res = moa.generate(prompts, routing="vote", max_new_tokens=new_tokens)
                assert all(r.completion_tokens == new_tokens for r in res)
                return res

            t = interleave({"base": g_base, "moa": g_moa}, repeats, "generate")
            rows.append(ratio_row("routed generation tokens/s: MoA vote / base HF generate", t["moa"], t["base"],
                                  0.9, f"8 prompts, 4 experts, {new_tokens} new tokens, greedy",
                                  higher_is_better=True))
            tps = BATCH * new_tokens
            print(f"  tokens/s: base {tps / min(t['base']):.1f}, MoA {tps / min(t['moa']):.1f} (best runs)")
            generation._eos_ids = real_eos_ids

        if "decode" in parts:
            from moa.generation import encode_prompts
            from moa.router import RoutingState

            p_ids, p_mask = encode_prompts(moa, [text for _, text in PROMPTS])  # (8, T) left padded
            experts = torch.tensor([DOMAINS.index(d) for d, _ in PROMPTS])  # (8,) 4 experts mixed
            n = 32
            print(f"decode: {len(PROMPTS)} rows, {n} KV-cached steps after a {p_ids.shape[1]}-token prefill, "
                  f"experts per row {experts.tolist()}", flush=True)
            def d_moa():
                return decode_steps(moa.base_model, p_ids, p_mask, n,
                                    lambda: moa.routing(RoutingState("explicit", experts)))

            fns = {"base": lambda: decode_steps(base, p_ids, p_mask, n), "moa": d_moa}
            if fusable:
                fns["unfused"] = lambda: unfused(moa, d_moa)
            t = interleave(fns, repeats, "decode", timer=True)
            rows.append(ratio_row("decode step: MoA / base", t["moa"], t["base"], 1.08,
                                  f"8 rows, 4 experts, KV cache; base {1000 * min(t['base']) / n:.1f} ms/step, "
                                  f"MoA {1000 * min(t['moa']) / n:.1f} ms/step"))
            if fusable:
                rows.append(ratio_row("decode step: MoA fused A / unfused", t["moa"], t["unfused"], 1.0,
                                      f"unfused {1000 * min(t['unfused']) / n:.1f} ms/step"))

        if parts & {"forward", "generate", "decode"}:
            del base
            gc.collect()

        if parts & {"train", "bf16"}:
            moa.set_trainable(experts=True, routers=True)
            s_fp32 = TrainStep(moa, stage2_loss, moa.trainable_parameters())
        if "train" in parts:
            peft_t = peft_train_model(adapters[0])
            s_peft = TrainStep(peft_t, peft_loss, [p for p in peft_t.parameters() if p.requires_grad])
            print(f"train: stage 2 ({sum(p.numel() for p in s_fp32.params) / 1e6:.2f}M trainable) vs PEFT "
                  f"single LoRA ({sum(p.numel() for p in s_peft.params) / 1e6:.2f}M)", flush=True)
            t = interleave({"stage2": lambda: s_fp32(batch), "peft": lambda: s_peft(batch)}, repeats, "train")
            rows.append(ratio_row("train step: stage 2 / PEFT single LoRA", t["stage2"], t["peft"], 1.05,
                                  "mixed batch, explicit routing, router loss, backward, AdamW"))
            del peft_t, s_peft
            gc.collect()
        if "bf16" in parts:
            s_bf16 = TrainStep(moa, stage2_loss, moa.trainable_parameters(), bf16=True)
            s_bf16.opt = s_fp32.opt
            if bf16_supported():
                t = interleave({"bf16": lambda: s_bf16(batch), "fp32": lambda: s_fp32(batch)}, repeats, "bf16")
            else:  # emulated bf16 matmuls: minutes per step, and the ratio is far from 1 either way
                n = 1 if args.quick else 2
                print(f"  no bf16 hardware here: {n} round(s) without warm-up (each bf16 step takes minutes)")
                t = interleave({"bf16": lambda: s_bf16(batch), "fp32": lambda: s_fp32(batch)}, n, "bf16",
                               warmup=False)
            auto = "bf16" if resolve_bf16(None) else "fp32"
            rows.append(ratio_row("train step: bf16 autocast / fp32", t["bf16"], t["fp32"], 0.45,
                                  f"target for AVX-512 bf16 CPUs; this CPU bf16={bf16_supported()}, "
                                  f"trainer auto mode picks {auto}"))

        if "mfu" in parts:
            print("mfu: stage 1 (PEFT single LoRA) and stage 2 steps, fp32 and bf16 autocast", flush=True)
            rows += mfu_rows(moa, adapters, batch, repeats)

        if "rss" in parts:
            print(f"rss: {rss_steps} training steps per subprocess", flush=True)
            single = measure_rss("single", adapters, rss_steps)
            stage2 = measure_rss("stage2", adapters, rss_steps)
            print(f"  peak RSS: single LoRA {single:.0f} MiB, stage 2 {stage2:.0f} MiB")
            rows.append(ratio_row("peak RSS: stage 2 / single LoRA training", [stage2], [single], 1.3,
                                  f"{stage2:.0f} / {single:.0f} MiB, separate subprocesses"))

    print()
    print(f"{'target':58s} {'min':>7s} {'median':>7s} {'max':>7s}  {'limit':>7s}  pass")
    for r in rows:
        print(f"{r['target']:58s} {r['min']:7.3f} {r['median']:7.3f} {r['max']:7.3f}  {r['limit']:>7s}  "
              f"{'yes' if r['pass'] else 'NO'}   {r['note']}")
    print("(times: ratio of seconds; tokens/s: ratio of throughputs; pass is judged on the minima)")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
