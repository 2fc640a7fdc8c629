"""Throughput of `moa serve` with dynamic batching vs one request at a time, in one run.

    python benchmarks/serve_bench.py                  # a tiny random 3-expert MoA built on the fly
    python benchmarks/serve_bench.py --moa runs/demo/moa --max-tokens 64

Starts the real server in-process (uvicorn on a free loopback port) twice on the same model:
with --max-batch-size N and with --max-batch-size 1. Each round sends --requests concurrent greedy
chat requests, cycling over the experts (`moa:<domain>`, or `moa` with --routed), and times the
round from the first send to the last reply. Prints requests/s and generated tokens/s of both
servers and their ratio (best of --rounds); the replies of the two servers must be identical.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a background thread on a free loopback port; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


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


PROMPTS = [
    "What is an exchange-traded fund?", "Add 17 and 25.", "Summarise the causes of inflation.",
    "Write a Python function that reverses a string.", "What are the symptoms of anaemia?",
    "Translate 'good morning' into French.", "Explain what a contract is.", "REPEAT: river river",
]


def one_round(http, models: list[str], n: int, max_tokens: int) -> tuple[float, list[dict]]:
    def ask(i: int) -> dict:
        body = {"model": models[i % len(models)], "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
        r = http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        replies = list(pool.map(ask, range(n)))
        return time.perf_counter() - start, replies


def measure(model, batch_size: int, args, models: list[str]) -> dict:
    from moa.serve import create_app

    import httpx

    app = create_app(model, max_batch_size=batch_size, max_queue=max(64, args.requests))
    limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=args.requests)
    with serving(app) as url, httpx.Client(base_url=url, timeout=600, limits=limits) as http:
        one_round(http, models, args.requests, args.max_tokens)  # warm-up, and opens the connections
        before = dict(app.state.batcher.stats)
        times, replies = [], None
        for _ in range(args.rounds):
            seconds, replies = one_round(http, models, args.requests, args.max_tokens)
            times.append(seconds)
        stats = app.state.batcher.stats
    best = min(times)
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    batches = stats["batches"] - before["batches"]
    return {"batch_size": batch_size, "seconds": best, "median_seconds": statistics.median(times),
            "req_per_s": args.requests / best, "tok_per_s": tokens / best, "tokens": tokens,
            "mean_batch": (stats["requests"] - before["requests"]) / max(1, batches),
            "busy": (stats["busy_s"] - before["busy_s"]) / sum(times),
            "texts": [r["choices"][0]["message"]["content"] for r in replies]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moa", default=None, help="MoA checkpoint (default: build a tiny random one)")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests per round (default: 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: 32)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the batched server's limit (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per server; the best counts (default: 3)")
    p.add_argument("--routed", action="store_true", help="model 'moa' (routers choose) instead of moa:<domain>")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on a shared CPU)")
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
    models = ["moa"] if args.routed else [f"moa:{d}" for d in model.domains]
    print(f"serve_bench: {args.moa or 'tiny random MoA'} on {device} ({torch.get_num_threads()} CPU threads); "
          f"{args.requests} concurrent requests over {', '.join(models)}, greedy, max_tokens={args.max_tokens}, "
          f"best of {args.rounds} rounds", flush=True)
    batched = measure(model, args.max_batch_size, args, models)
    serial = measure(model, 1, args, models)
    for r in (batched, serial):
        print(f"  max-batch-size {r['batch_size']:>3}: {r['seconds']:7.3f} s (median {r['median_seconds']:.3f})  "
              f"{r['req_per_s']:7.2f} req/s  {r['tok_per_s']:8.1f} tok/s  mean batch {r['mean_batch']:.1f}  "
              f"model busy {r['busy']:.0%}")
    if batched["texts"] != serial["texts"]:
        print("serve_bench: warning: batched and one-at-a-time replies differ", file=sys.stderr)
    print(f"throughput ratio (batched / one at a time): {batched['tok_per_s'] / serial['tok_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
