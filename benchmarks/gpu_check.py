"""MoA on an accelerator: the same results as on the CPU, and Performance II's ratios there.

    python benchmarks/gpu_check.py --base DIR [--random-weights] [--device cuda] [--repeats 9] [--out F.json]

DIR is a base model directory (config.json + tokenizer, with or without weights). With
`--random-weights` only its config and tokenizer are read and the weights are random (seed 0):
the architecture, and therefore the speed, are the real model's; nothing is downloaded. It is
how this runs where the weights cannot travel (the device machine of this project).

1. **equivalence**: 4 random rank-8 PEFT experts on 7 projections, assembled on the CPU and on
   DEVICE (float32). MoA logits of 8 rows mixed over the experts: the largest difference
   relative to the logits' largest magnitude, and how many next-token argmaxes agree. Routed
   greedy generation (explicit domains): how many of the 8 replies are the same text.
2. **speed** on DEVICE, float32 and bfloat16 weights (experts float32, as `moa` loads them):
   forward 8 x 128, KV-cached decode step of 8 rows ((generate 33 - generate 1) / 32 tokens),
   `generate` tokens/s; MoA over the bare transformers base, ratios of minima over interleaved
   repeats (the order reverses every other repeat), synchronised on the device.
3. **stage-2 training** on DEVICE: `moa train` on --data (default data/demo/train.jsonl), batch
   8, `--length-split 1` and `8`, float32 and bf16 autocast: tokens/s of real tokens, the mean of
   the training log's steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import random_expert_dirs

PROMPTS = [f"Write a short note number {i} about the weather in a city." for i in range(8)]
DOMAINS = ["a", "b", "c", "d"]
ROWS = [DOMAINS[i % 4] for i in range(8)]


def random_base(src: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def equivalence(base: Path, experts: list[Path], device: torch.device) -> dict:
    from moa.model import MoAModel

    ref = MoAModel.from_adapters(experts, domains=DOMAINS, base=base, device="cpu", dtype="float32").eval()
    dev = MoAModel.from_adapters(experts, domains=DOMAINS, base=base, device=device, dtype="float32").eval()
    g = torch.Generator().manual_seed(0)
    vocab = ref.base_model.config.vocab_size
    ids = torch.randint(0, vocab, (8, 128), generator=g)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        a = ref(input_ids=ids, attention_mask=mask, domains=ROWS).logits.float()
        b = dev(input_ids=ids, attention_mask=mask, domains=ROWS).logits.float().cpu()
        gen_a = [r.text for r in ref.generate(PROMPTS, domains=ROWS, max_new_tokens=16)]
        gen_b = [r.text for r in dev.generate(PROMPTS, domains=ROWS, max_new_tokens=16)]
    return {"max_abs_diff_over_max_abs_logit": float((a - b).abs().max() / a.abs().max()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "replies_identical": sum(x == y for x, y in zip(gen_a, gen_b)), "replies": len(gen_a)}


def speed(base: Path, experts: list[Path], device: torch.device, dtype: str, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa.model import MoAModel

    tdtype = getattr(torch, dtype)
    # As moa loads it (moa.base): no Hub kernels, which would also need the network on a GPU.
    bare = AutoModelForCausalLM.from_pretrained(base, dtype=tdtype, use_kernels=False).to(device).eval()
    tok = AutoTokenizer.from_pretrained(base)
    moa = MoAModel.from_adapters(experts, domains=DOMAINS, base=base, device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, bare.config.vocab_size, (8, 128), generator=g).to(device)
    mask = torch.ones_like(ids)
    enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in PROMPTS], add_generation_prompt=True,
                                  tokenize=False)
    tok.padding_side = "left"
    bt = tok(enc, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def timed(fn):
        def run():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - t
        return run

    cases = {
        "fwd_base": timed(lambda: bare(input_ids=ids, attention_mask=mask)),
        "fwd_moa": timed(lambda: moa(input_ids=ids, attention_mask=mask, domains=ROWS)),
    }
    for n in (1, 33):
        cases[f"g{n}_base"] = timed(lambda n=n: bare.generate(**bt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                            pad_token_id=tok.pad_token_id))
        cases[f"g{n}_moa"] = timed(lambda n=n: moa.generate(PROMPTS, domains=ROWS, max_new_tokens=n, ignore_eos=True))
    res = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        for r in range(repeats):
            order = list(cases.items())
            for k, fn in (order[::-1] if r % 2 else order):
                res[k].append(fn())
    m = {k: min(v) for k, v in res.items()}
    med = {k: statistics.median(v) for k, v in res.items()}
    step = {s: (m[f"g33_{s}"] - m[f"g1_{s}"]) / 32 for s in ("base", "moa")}
    out = {
        "forward_ms": {"base": m["fwd_base"] * 1e3, "moa": m["fwd_moa"] * 1e3},
        "forward_ratio": m["fwd_moa"] / m["fwd_base"],
        "forward_ratio_medians": med["fwd_moa"] / med["fwd_base"],
        "decode_step_ms": {k: v * 1e3 for k, v in step.items()},
        "decode_ratio": step["moa"] / step["base"],
        "decode_ratio_medians": (med["g33_moa"] - med["g1_moa"]) / (med["g33_base"] - med["g1_base"]),
        "generate_tokens_per_s_ratio": m["g33_base"] / m["g33_moa"],
    }
    del bare, moa
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def training(base: Path, experts: list[Path], data: Path, device: torch.device, work: Path, steps: int) -> dict:
    from moa.cli import main as moa_main
    from moa.model import MoAModel

    assembled = work / "assembled"
    MoAModel.from_adapters(experts, domains=DOMAINS, base=base, device="cpu", dtype="float32").save_pretrained(assembled)
    # The demo data's domains are not the random experts' names: relabel the records round-robin
    # onto the experts' domains (lengths and mix as in the data).
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    relabelled = work / "train.jsonl"
    relabelled.write_text("".join(json.dumps({**r, "domain": DOMAINS[i % 4]}) + "\n" for i, r in enumerate(rows)),
                          encoding="utf-8")
    out = {}
    for bf16 in (False, True):
        for split in (1, 8):
            name = f"{'bf16' if bf16 else 'fp32'}_split{split}"
            run = work / name
            rc = moa_main(["train", "--moa", str(assembled), "--base", str(base), "--data", str(relabelled),
                           "--out", str(run), "--max-steps", str(steps), "--batch-size", "8", "--max-length", "192",
                           "--lr", "1e-3", "--device", str(device), "--length-split", str(split),
                           "--bf16" if bf16 else "--no-bf16", "--overwrite"])
            if rc:
                out[name] = {"error": f"moa train exited {rc}"}
                continue
            log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
            tps = [r["tokens_per_s"] for r in log[2:]]
            out[name] = {"tokens_per_s": statistics.mean(tps), "last_loss": log[-1].get("loss")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model directory (config + tokenizer; weights unless --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights of --base's architecture")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--data", default=None, help="training JSONL for part 3 (default: data/demo/train.jsonl)")
    p.add_argument("--only", default="equivalence,speed,training")
    p.add_argument("--dtypes", default="float32,bfloat16", help="base weight dtypes of part 2")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="moa_gpu_check_"))
    base = random_base(Path(args.base), work / "base") if args.random_weights else Path(args.base)
    experts = random_expert_dirs(str(base), str(work / "experts"), len(DOMAINS))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    from moa.layers import _choice, _onednn_ok

    gemm = "-" if device.type != "cpu" else "default" if _choice() == "default" else f"onednn (usable: {_onednn_ok()})"
    results: dict = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_gemm": gemm}
    print(f"CPU GEMM of the frozen projections: {gemm}", flush=True)
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)

    def save():  # after every part: what ran is kept if a later part fails
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    if "equivalence" in only:
        results["equivalence"] = equivalence(base, experts, device)
        print("equivalence:", json.dumps(results["equivalence"]), flush=True)
        save()
    if "speed" in only:
        for dtype in args.dtypes.split(","):
            results[f"speed_{dtype}"] = r = speed(base, experts, device, dtype, args.repeats)
            print(f"{dtype}: forward {r['forward_ms']['base']:.2f} / {r['forward_ms']['moa']:.2f} ms = "
                  f"{r['forward_ratio']:.3f} (medians {r['forward_ratio_medians']:.3f}); decode step "
                  f"{r['decode_step_ms']['base']:.2f} / {r['decode_step_ms']['moa']:.2f} ms = {r['decode_ratio']:.3f} "
                  f"(medians {r['decode_ratio_medians']:.3f}); generate tokens/s "
                  f"{r['generate_tokens_per_s_ratio']:.3f} of the base", flush=True)
            save()
    if "training" in only:
        data = Path(args.data) if args.data else Path(__file__).resolve().parents[1] / "data" / "demo" / "train.jsonl"
        results["training"] = training(base, experts, data, device, work, args.train_steps)
        for k, v in results["training"].items():
            print(f"stage 2, batch 8, {k}: {json.dumps(v)}", flush=True)
        save()


if __name__ == "__main__":
    main()
