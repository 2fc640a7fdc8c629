"""`moa serve` under streaming load: the continuous engine vs the static batcher vs one request at a
time, measured in one run.

    python benchmarks/serve_bench.py --threads 1                   # a tiny random 3-expert MoA built on the fly
    python benchmarks/serve_bench.py --moa runs/demo/moa --threads 2

Starts the real server in-process (uvicorn on a free loopback port) three times on the same model:
`--scheduler continuous` and `--scheduler static` with --max-batch-size N, and the static batcher with
--max-batch-size 1 (one request at a time). Load: --clients concurrent streaming clients, each sending
--per-client chat requests one after the other (model "moa": the routers choose), prompts cycling over
the demo domains (data/demo/test.jsonl), greedy, `ignore_eos`, max_tokens drawn once (seeded) from
--min-new..--max-new so that every server gets the same mixed lengths. Per server: generated tokens/s
over the whole load, p50/p95 time to first token (first chunk with text) and end-to-end latency.

Then the head-of-line check: a 4-token request sent while a 128-token one streams (after its first
token); its latency as a fraction of the long request's.

Prints each server's numbers and the ratios the issue targets: continuous/static throughput (>= 1.5),
continuous/static p95 time to first token (<= 0.25), and the short/long latency fraction (< 0.30).
"""

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_tiny_moa(root: Path) -> Path:
    """A tiny random base with three random q/v LoRA experts, saved as an MoA checkpoint."""
    import torch
    from peft import LoraConfig, get_peft_model

    from moa.base import load_base
    from moa.model import MoAModel
    from moa.testing import make_tiny_base

    base_dir = make_tiny_base(root / "base")
    dirs = []
    for seed, domain in enumerate(["math", "echo", "json"], start=1):
        base, _ = load_base(base_dir)
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(root / domain)
        dirs.append(root / domain)
    return MoAModel.from_adapters(dirs, base=base_dir).save_pretrained(root / "moa")


def demo_prompts(per_domain: int = 4) -> list[str]:
    """User prompts of data/demo/test.jsonl, interleaved across the domains."""
    by_domain: dict[str, list[str]] = {}
    path = ROOT / "data" / "demo" / "test.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = row.get("prompt") or next(m["content"] for m in row["messages"] if m["role"] == "user")
        rows = by_domain.setdefault(row["domain"], [])
        if len(rows) < per_domain and len(text) < 400:
            rows.append(text)
    return [p for group in zip(*by_domain.values()) for p in group]


def serving(app):
    from conftest import serving as run

    return run(app)


def stream(http, prompt: str, max_tokens: int) -> dict:
    """One streamed request: {submit, first, end (perf_counter), tokens}."""
    body = {"model": "moa", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    out = {"submit": time.perf_counter(), "first": None, "tokens": 0}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            if out["first"] is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                out["first"] = time.perf_counter()
    out["end"] = time.perf_counter()
    out["first"] = out["first"] or out["end"]
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(model, name: str, scheduler: str, batch: int, args, plan: list[list[tuple[str, int]]]) -> dict:
    import httpx

    from moa.serve import create_app

    app = create_app(model, scheduler=scheduler, max_batch_size=batch, max_queue=4 * args.clients,
                     max_new_tokens_limit=max(args.max_new, 128))
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    with serving(app) as url, httpx.Client(base_url=url, timeout=3600, limits=limits) as http:
        stream(http, plan[0][0][0], 4)  # warm-up

        def client(jobs):
            return [stream(http, prompt, n) for prompt, n in jobs]

        with ThreadPoolExecutor(args.clients) as pool:
            start = time.perf_counter()
            rows = [r for rs in pool.map(client, plan) for r in rs]
        seconds = max(r["end"] for r in rows) - start
        hol = None
        if not args.skip_hol:
            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(stream, http, plan[0][0][0], 128)
                while app.state.engine.running == 0 and not fut.done():  # the long one is in
                    time.sleep(0.001)
                time.sleep(0.05)
                short = stream(http, plan[1][0][0], 4)
                long = fut.result()
            hol = (short["end"] - short["submit"]) / (long["end"] - long["submit"])
    ttft = [r["first"] - r["submit"] for r in rows]
    latency = [r["end"] - r["submit"] for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    return {"name": name, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "lat_p50": pct(latency, 50),
            "lat_p95": pct(latency, 95), "hol": hol, "max_batch": app.state.engine.stats["max_batch"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moa", default=None, help="MoA checkpoint (default: build a tiny random one)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn (default: 2)")
    p.add_argument("--min-new", type=int, default=4, help="smallest max_tokens (default: 4)")
    p.add_argument("--max-new", type=int, default=128, help="largest max_tokens (default: 128)")
    p.add_argument("--max-batch-size", type=int, default=16, help="batched servers' limit (default: 16)")
    p.add_argument("--skip-serial", action="store_true", help="do not run the one-at-a-time server")
    p.add_argument("--skip-hol", action="store_true", help="do not run the 4-token-behind-128 check")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the max_tokens draw (default: 0)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from moa.model import MoAModel

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        moa_dir = Path(args.moa) if args.moa else build_tiny_moa(Path(tmp))
        model = MoAModel.from_pretrained(moa_dir, dtype=dtype).to(device)
    prompts = demo_prompts()
    rng = random.Random(args.seed)
    plan = [[(prompts[(c * args.per_client + k) % len(prompts)], rng.randint(args.min_new, args.max_new))
             for k in range(args.per_client)] for c in range(args.clients)]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"serve_bench: {args.moa or 'tiny random MoA'} on {device} ({cpu}, {torch.get_num_threads()} torch threads); "
          f"{args.clients} streaming clients x {args.per_client} requests, model 'moa', greedy, ignore_eos, "
          f"max_tokens {args.min_new}..{args.max_new} (seed {args.seed}), "
          f"{sum(n for jobs in plan for _, n in jobs)} tokens in all", flush=True)
    runs = [("continuous", "continuous", args.max_batch_size), ("static", "static", args.max_batch_size)]
    if not args.skip_serial:
        runs.append(("one at a time", "static", 1))
    results = []
    for name, scheduler, batch in runs:
        r = measure(model, name, scheduler, batch, args, plan)
        results.append(r)
        hol = "" if r["hol"] is None else f"  4-behind-128 {r['hol']:.2f}"
        print(f"  {name:<14} batch {batch:>2}: {r['seconds']:7.2f} s  {r['tok_s']:8.1f} tok/s  "
              f"TTFT p50 {r['ttft_p50']:6.3f} p95 {r['ttft_p95']:6.3f} s  "
              f"latency p50 {r['lat_p50']:6.2f} p95 {r['lat_p95']:6.2f} s  max batch {r['max_batch']}{hol}",
              flush=True)
    cont, static = results[0], results[1]
    print(f"throughput continuous / static: {cont['tok_s'] / static['tok_s']:.2f}x (target >= 1.5)")
    print(f"p95 TTFT continuous / static: {cont['ttft_p95'] / static['ttft_p95']:.3f} (target <= 0.25)")
    if len(results) > 2:
        print(f"throughput continuous / one at a time: {cont['tok_s'] / results[2]['tok_s']:.2f}x")
    if cont["hol"] is not None:
        print(f"4-token request behind a 128-token one, latency fraction: continuous {cont['hol']:.2f} "
              f"(target < 0.30), static {static['hol']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
