"""Routed requests/s of `moa gateway` against K (--route-layers), in one run.

    python benchmarks/gateway_bench.py --moa /tmp/pg_demo/moa --data data/demo/test.jsonl --ks 1,4,0

For each K (0 = all layers) the gateway app runs in-process (uvicorn, loopback) on the routing
part of the checkpoint, in front of a stand-in upstream that answers at once, so the time is
the gateway's own: HTTP, tokenization, the batched routing pass, forwarding. Each round sends
--requests chat requests (test prompts, --concurrency at a time) and times them from the first
send to the last answer; rounds of the K values are interleaved and the best is kept. Prints
requests/s per K, the ratio to K=1, and the share routed to the right domain.

--e2e N also runs N labelled prompts end to end with the OpenAI client against the default
gateway (K = --e2e-k) in front of a real `moa serve` of the same checkpoint (max_tokens 1), and
checks streamed text == non-streamed text on a few of them (max_tokens 8).
"""

import argparse
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

from moa.testing import serving


def instant_upstream():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                          "finish_reason": "stop"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moa", required=True)
    ap.add_argument("--data", default="data/demo/test.jsonl")
    ap.add_argument("--ks", default="1,4,0", help="comma-separated K values, 0 = all layers")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--e2e", type=int, default=0, help="labelled prompts to run end to end through moa serve")
    ap.add_argument("--e2e-k", type=int, default=4)
    args = ap.parse_args()

    import httpx
    import torch

    from moa.checkpoint import load_routing_part
    from moa.data import read_records
    from moa.gateway import create_gateway_app
    from moa.model import MoAModel

    records, _ = read_records(args.data)
    # Interleave the domains so that every round sees all of them.
    by_domain = {}
    for r in records:
        by_domain.setdefault(r.domain, []).append(r)
    mixed = [r for group in zip(*by_domain.values()) for r in group]
    batch = (mixed * (args.requests // len(mixed) + 1))[: args.requests]
    print(f"{args.moa}: {args.requests} requests x {args.rounds} rounds per K, concurrency {args.concurrency}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def round_trip(url: str) -> tuple[float, float]:
        def one(record):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                           json={"model": "moa", "messages": record.prompt_messages, "max_tokens": 1})
            r.raise_for_status()
            return r.json()["moa"]["domain"] == record.domain

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            right = list(pool.map(one, batch))
        return time.perf_counter() - start, sum(right) / len(right)

    ks = [int(k) for k in args.ks.split(",")]
    models = {K: load_routing_part(MoAModel, args.moa, K or None) for K in ks}
    best, acc = {K: float("inf") for K in ks}, {}
    with serving(instant_upstream()) as upstream, contextlib.ExitStack() as stack:
        urls = {K: stack.enter_context(serving(create_gateway_app(m, [upstream]))) for K, m in models.items()}
        for K in ks:  # warm-up: first-call costs out of the timings
            httpx.post(f"{urls[K]}/v1/chat/completions", timeout=600,
                       json={"model": "moa", "messages": batch[0].prompt_messages}).raise_for_status()
        for _ in range(args.rounds):
            for K in ks:
                seconds, acc[K] = round_trip(urls[K])
                best[K] = min(best[K], seconds)
    rate = {K: args.requests / best[K] for K in ks}
    base = rate[ks[0]]
    print("\n| K (routers deciding) | layers run | routed requests/s | vs K=%d | routed right |" % (ks[0] or models[ks[0]].num_layers))
    print("|---|---|---|---|---|")
    for K in ks:
        n = models[K].num_layers
        print(f"| {n}{' (all)' if K == 0 else ''} | {n - 1} | {rate[K]:.1f} | {rate[K] / base:.2f}x | {acc[K]:.1%} |")

    if args.e2e:
        import openai

        from moa.serve import create_app

        full = MoAModel.from_pretrained(args.moa)
        gateway_model = models.get(args.e2e_k) or load_routing_part(MoAModel, args.moa, args.e2e_k)
        sample = mixed[: args.e2e]
        with serving(create_app(full, max_batch_size=8)) as up, \
                serving(create_gateway_app(gateway_model, [up], template="moa:{domain}")) as gw:
            client = openai.OpenAI(base_url=f"{gw}/v1", api_key="unused", max_retries=0, timeout=600)

            def ask(record, **kw):
                return client.chat.completions.create(model="moa", messages=record.prompt_messages, temperature=0, **kw)

            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda r: ask(r, max_tokens=1), sample))
            seconds = time.perf_counter() - start
            right = sum(a.model_extra["moa"]["domain"] == r.domain for a, r in zip(answers, sample))
            same = 0
            for r in sample[:5]:
                whole = ask(r, max_tokens=8).choices[0].message.content
                streamed = "".join(c.choices[0].delta.content or "" for c in ask(r, max_tokens=8, stream=True)
                                   if c.choices)
                same += whole == streamed
        print(f"\nend to end (OpenAI client -> gateway K={args.e2e_k} -> moa serve): {right}/{len(sample)} routed "
              f"right ({right / len(sample):.1%}) in {seconds:.0f} s; streamed == non-streamed: {same}/5")


if __name__ == "__main__":
    main()
